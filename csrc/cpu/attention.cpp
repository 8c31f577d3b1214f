// Torch adapters of the CPU KV-cache kernels: check every tensor (errors name the argument),
// fill the kernel params, dispatch on the storage dtype. The math lives in attention_kernels.cpp.
#include <ATen/ATen.h>

#include "attention_kernels.h"
#include "ops.h"

namespace fastdecode::cpu {
namespace {

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", dtype,
                  " (supported: float32, bfloat16, float16)");
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_index(const at::Tensor& t, const char* name, at::ScalarType dtype,
                 at::IntArrayRef shape) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// k_cache / v_cache: [N, P, Hkv, D], contiguous, one float dtype.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, num_kv_heads, "
              "head_dim], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
              " != k_cache shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache dtype ",
              v_cache.scalar_type(), " != k_cache dtype ", k_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous(), "k_cache must be contiguous");
  TORCH_CHECK(v_cache.is_contiguous(), "v_cache must be contiguous");
}

// t: [rows, heads, D] of the cache dtype with a contiguous last dim.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& cache, int64_t heads) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == cache.size(3), name,
              " must be [tokens, ", heads, ", ", cache.size(3), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == cache.scalar_type(), name, " dtype ", t.scalar_type(),
              " != cache dtype ", cache.scalar_type());
  TORCH_CHECK(t.stride(2) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

}  // namespace

void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_caches(k_cache, v_cache);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  // The kernel reads rows through their strides; only an inner stride needs a copy.
  const at::Tensor k = key.dim() == 3 && key.stride(2) != 1 ? key.contiguous() : key;
  const at::Tensor v = value.dim() == 3 && value.stride(2) != 1 ? value.contiguous() : value;
  check_rows(k, "key", k_cache, k_cache.size(2));
  check_rows(v, "value", k_cache, k_cache.size(2));
  TORCH_CHECK(v.size(0) == k.size(0), "value has ", v.size(0), " tokens, key has ", k.size(0));
  check_index(slot_mapping, "slot_mapping", at::kLong, {k.size(0)});
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is outside the cache (", num_slots, " slots)");
  }
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

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool causal, double softcap, int64_t sliding_window,
                     const std::optional<at::Tensor>& alibi_slopes) {
  check_caches(k_cache, v_cache);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(query.dim() == 3, "query must be [tokens, num_qo_heads, head_dim], got ",
              query.sizes());
  const int64_t num_qo_heads = query.size(1);
  TORCH_CHECK(num_qo_heads % num_kv_heads == 0, "query: num_qo_heads ", num_qo_heads,
              " must be a multiple of num_kv_heads ", num_kv_heads);
  check_rows(query, "query", k_cache, num_qo_heads);
  check_rows(out, "out", k_cache, num_qo_heads);
  TORCH_CHECK(out.sizes() == query.sizes(), "out shape ", out.sizes(), " != query shape ",
              query.sizes());
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be [num_seqs, max_blocks_per_seq], "
              "got ", block_tables.sizes());
  const int64_t num_seqs = block_tables.size(0), max_blocks = block_tables.size(1);
  check_index(block_tables, "block_tables", at::kInt, {num_seqs, max_blocks});
  check_index(seq_lens, "seq_lens", at::kInt, {num_seqs});
  const int32_t* cu = nullptr;
  if (cu_seqlens_q) {
    check_index(*cu_seqlens_q, "cu_seqlens_q", at::kInt, {num_seqs + 1});
    cu = cu_seqlens_q->data_ptr<int32_t>();
    TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == query.size(0), "cu_seqlens_q must run from 0 to "
                "the number of query tokens ", query.size(0), ", got ", cu[0], " .. ",
                cu[num_seqs]);
    for (int64_t b = 0; b < num_seqs; ++b) {
      TORCH_CHECK(cu[b] <= cu[b + 1], "cu_seqlens_q must be non-decreasing, got ", cu[b],
                  " then ", cu[b + 1], " at seq ", b);
    }
  } else {
    TORCH_CHECK(query.size(0) == num_seqs, "query: the decode form takes one token per "
                "sequence, got ", query.size(0), " tokens for ", num_seqs, " sequences");
  }
  const float* slopes = nullptr;
  if (alibi_slopes) {
    check_index(*alibi_slopes, "alibi_slopes", at::kFloat, {num_qo_heads});
    slopes = alibi_slopes->data_ptr<float>();
  }
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0 = off), got ",
              sliding_window);
  // Every block a sequence reads must exist: a bad table would read outside the cache.
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= max_blocks * block_size, "seq_lens[", b, "] = ",
                lens[b], " does not fit in ", max_blocks, " blocks of ", block_size);
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int32_t id = table[b * max_blocks + i];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", b, ", ", i, "] = ", id,
                  " is outside the cache (", num_blocks, " blocks)");
    }
  }
  PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = table;
  p.seq_lens = lens;
  p.cu_seqlens_q = cu;
  p.alibi_slopes = slopes;
  p.num_seqs = num_seqs;
  p.num_qo_heads = num_qo_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = k_cache.size(3);
  p.block_size = block_size;
  p.max_blocks_per_seq = max_blocks;
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.o_stride_t = out.stride(0);
  p.o_stride_h = out.stride(1);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.sliding_window = sliding_window;
  p.causal = causal;
  dispatch_dtype(query.scalar_type(), "paged_attention", [&](auto tag) {
    paged_attention_kernel<decltype(tag)>(p);
  });
}

}  // namespace fastdecode::cpu
