// Torch adapters of the CPU KV-cache kernels: check every tensor (the shared checks of
// csrc/common/checks.h, then the host value checks of value_checks.h; errors name the argument),
// fill the kernel params, dispatch on the storage dtype. The math lives in
// attention_kernels.cpp.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "attention_kernels.h"
#include "ops.h"
#include "value_checks.h"

namespace fastdecode::cpu {
namespace {

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default:
      TORCH_CHECK(false, message::text(what, ": unsupported dtype ", dtype,
                                       " (supported: float32, bfloat16, float16)"));
  }
}

void check_cpu(const char* op, const at::Tensor& anchor, const char* name) {
  FASTDECODE_CHECK(anchor.device().is_cpu(), op, name, " must be a CPU tensor, got ",
                   anchor.device());
}

}  // namespace

void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_cpu("append_kv", k_cache, "k_cache");
  // The kernel reads rows through their strides; only an inner stride needs a copy.
  const at::Tensor k = key.dim() == 3 && key.stride(2) != 1 ? key.contiguous() : key;
  const at::Tensor v = value.dim() == 3 && value.stride(2) != 1 ? value.contiguous() : value;
  const checks::CacheDims c = checks::append_kv(k, v, k_cache, v_cache, slot_mapping);
  values::slots(slot_mapping, c);
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  AppendKvParams p{};
  p.key = k.data_ptr();
  p.value = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slots;
  p.num_tokens = k.size(0);
  p.num_kv_heads = k_cache.size(2);
  p.head_dim = k_cache.size(3);
  p.key_stride_t = k.stride(0);
  p.key_stride_h = k.stride(1);
  p.value_stride_t = v.stride(0);
  p.value_stride_h = v.stride(1);
  dispatch_dtype(k_cache.scalar_type(), "append_kv", [&](auto tag) {
    append_kv_kernel<decltype(tag)>(p);
  });
}

namespace {

// The checked call of both ops; lse: the float pointer of a checked [rows, Hq] tensor, or
// nullptr.
void run_paged_attention(at::Tensor& out, float* lse, const at::Tensor& query,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& cu_seqlens_q, double scale, bool causal,
                         double softcap, int64_t sliding_window,
                         const std::optional<at::Tensor>& alibi_slopes,
                         const std::optional<at::Tensor>& relative_bias) {
  check_cpu("paged_attention", query, "query");
  const checks::PagedDims d = checks::paged_attention(
      out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, softcap,
      sliding_window, alibi_slopes, relative_bias);
  values::paged_attention(block_tables, seq_lens, cu_seqlens_q, alibi_slopes, relative_bias,
                          causal, d);
  PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.const_data_ptr<int32_t>();
  p.seq_lens = seq_lens.const_data_ptr<int32_t>();
  p.cu_seqlens_q = cu_seqlens_q ? cu_seqlens_q->const_data_ptr<int32_t>() : nullptr;
  p.alibi_slopes = alibi_slopes ? alibi_slopes->const_data_ptr<float>() : nullptr;
  p.relative_bias = relative_bias ? relative_bias->const_data_ptr<float>() : nullptr;
  p.relative_radius = relative_bias ? relative_bias->size(1) / 2 : 0;
  p.num_seqs = d.num_seqs;
  p.num_qo_heads = d.num_qo_heads;
  p.num_kv_heads = d.cache.num_kv_heads;
  p.head_dim = d.cache.head_dim;
  p.block_size = d.cache.block_size;
  p.max_blocks_per_seq = d.max_blocks;
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.o_stride_t = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.sliding_window = sliding_window;
  p.causal = causal;
  p.lse = lse;
  dispatch_dtype(query.scalar_type(), "paged_attention", [&](auto tag) {
    paged_attention_kernel<decltype(tag)>(p);
  });
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool causal, double softcap, int64_t sliding_window,
                     const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& relative_bias) {
  run_paged_attention(out, nullptr, query, k_cache, v_cache, block_tables, seq_lens,
                      cu_seqlens_q, scale, causal, softcap, sliding_window, alibi_slopes,
                      relative_bias);
}

void paged_attention_lse(at::Tensor& out, at::Tensor& lse, const at::Tensor& query,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& cu_seqlens_q, double scale, bool causal,
                         double softcap) {
  const char* op = "paged_attention_lse";
  FASTDECODE_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                       lse.is_contiguous() && lse.dim() == 2 &&
                       lse.size(0) == query.size(0) && lse.size(1) == query.size(1),
                   op, "lse must be a contiguous CPU float32 tensor of shape [",
                   query.size(0), ", ", query.size(1), "] (query's rows and heads), got ",
                   lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  run_paged_attention(out, lse.data_ptr<float>(), query, k_cache, v_cache, block_tables,
                      seq_lens, cu_seqlens_q, scale, causal, softcap, 0, std::nullopt,
                      std::nullopt);
}

}  // namespace fastdecode::cpu
