// Torch adapters of append_kv and paged decode attention: check, fill Params, launch on the
// current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels/append_kv.cuh"
#include "../kernels/dispatch.cuh"
#include "../kernels/paged_attention.cuh"
#include "checks.h"
#include "ops.h"

namespace fastdecode::cuda {

namespace {

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "fastdecode (cuda): k_cache / v_cache must both be [N, P, Hkv, D], got ",
              k_cache.sizes(), " / ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(),
              "fastdecode (cuda): k_cache / v_cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "fastdecode (cuda): k_cache and v_cache must be contiguous");
  check_cuda(v_cache, k_cache, "v_cache");
}

}  // namespace

void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_cuda(k_cache, k_cache, "k_cache");
  check_cache(k_cache, v_cache);
  const int64_t hkv = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(key.dim() == 3 && key.size(1) == hkv && key.size(2) == d &&
                  value.sizes() == key.sizes(),
              "fastdecode (cuda): key / value must be [T, ", hkv, ", ", d, "], got ", key.sizes(),
              " / ", value.sizes());
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() &&
                  value.scalar_type() == k_cache.scalar_type(),
              "fastdecode (cuda): key / value dtype must match the cache dtype");
  check_cuda(key, k_cache, "key");
  check_cuda(value, k_cache, "value");
  check_index(slot_mapping, k_cache, "slot_mapping", at::kLong, 1);
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "fastdecode (cuda): slot_mapping has ",
              slot_mapping.size(0), " entries for ", key.size(0), " tokens");
  // The kernel copies whole head rows: their elements must be adjacent.
  const at::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();

  kernels::AppendKVParams p{};
  p.key = k.data_ptr();
  p.value = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.key_stride_token = k.stride(0);
  p.key_stride_head = k.stride(1);
  p.value_stride_token = v.stride(0);
  p.value_stride_head = v.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_token = k_cache.stride(1);
  p.cache_stride_head = k_cache.stride(2);
  p.num_tokens = k.size(0);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.block_size = static_cast<int>(k_cache.size(1));
  p.elem_bytes = static_cast<int>(k_cache.element_size());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  check_launch(kernels::append_kv(p, c10::cuda::getCurrentCUDAStream()), "append_kv");
}

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool /*causal: implied by the decode form*/, double softcap,
                     int64_t sliding_window, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(!cu_seqlens_q.has_value(),
              "fastdecode (cuda): paged_attention implements the decode form only; the packed "
              "(cu_seqlens_q) form runs on backend='triton'");
  check_cuda(query, query, "query");
  check_cache(k_cache, v_cache);
  check_cuda(k_cache, query, "k_cache");
  check_cuda(out, query, "out");
  const int64_t hkv = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(query.dim() == 3 && query.size(2) == d && query.size(1) % hkv == 0,
              "fastdecode (cuda): query must be [B, Hq, ", d, "] with Hq a multiple of ", hkv,
              ", got ", query.sizes());
  TORCH_CHECK(kernels::is_supported_head_dim(static_cast<int>(d)),
              "unsupported head_dim ", d, " (supported: " FASTDECODE_CUDA_HEAD_DIMS_STR ")");
  const int64_t num_seqs = query.size(0), hq = query.size(1);
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type() && out.sizes() == query.sizes(),
              "fastdecode (cuda): query / out / cache must share shape and dtype");
  TORCH_CHECK(query.stride(2) == 1, "fastdecode (cuda): query's last dim must be contiguous");
  TORCH_CHECK(aligned16(k_cache) && aligned16(v_cache),
              "fastdecode (cuda): k_cache / v_cache must be 16-byte aligned");
  check_index(block_tables, query, "block_tables", at::kInt, 2);
  check_index(seq_lens, query, "seq_lens", at::kInt, 1);
  TORCH_CHECK(block_tables.size(0) == num_seqs && seq_lens.size(0) == num_seqs,
              "fastdecode (cuda): block_tables / seq_lens must have ", num_seqs, " rows");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous(),
              "fastdecode (cuda): block_tables rows and seq_lens must be contiguous");
  if (alibi_slopes.has_value()) {
    check_cuda(*alibi_slopes, query, "alibi_slopes");
    TORCH_CHECK(alibi_slopes->scalar_type() == at::kFloat && alibi_slopes->dim() == 1 &&
                    alibi_slopes->size(0) == hq && alibi_slopes->is_contiguous(),
                "fastdecode (cuda): alibi_slopes must be a contiguous [", hq, "] float32 tensor");
  }
  // The kernel stores 16-byte vectors of each output head row.
  const bool out_ok = aligned16(out) && out.stride(2) == 1 &&
                      (out.stride(1) * out.element_size()) % 16 == 0 &&
                      (out.stride(0) * out.element_size()) % 16 == 0;
  at::Tensor dst = out_ok ? out : at::empty_like(query, query.options().memory_format(
                                                            at::MemoryFormat::Contiguous));

  kernels::PagedDecodeParams p{};
  p.out = dst.data_ptr();
  p.query = query.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.q_stride_seq = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.o_stride_seq = dst.stride(0);
  p.o_stride_head = dst.stride(1);
  p.kv_stride_block = k_cache.stride(0);
  p.kv_stride_token = k_cache.stride(1);
  p.kv_stride_head = k_cache.stride(2);
  p.block_tables_stride = block_tables.stride(0);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_qo_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.block_size = static_cast<int>(k_cache.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_blocks = k_cache.size(0);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.sliding_window = static_cast<int>(sliding_window);
  p.dtype = kernel_dtype(query);

  const int max_parts = kernels::paged_decode_max_partitions(p.max_blocks_per_seq, p.block_size);
  const int64_t ws_floats = kernels::paged_decode_workspace_floats(num_seqs, hq, d, max_parts);
  at::Tensor workspace;
  if (ws_floats > 0) {
    workspace = at::empty({ws_floats}, query.options().dtype(at::kFloat));
    p.partial_out = workspace.data_ptr<float>();
    p.partial_lse = p.partial_out + num_seqs * hq * max_parts * d;
  }
  const c10::cuda::CUDAGuard guard(query.device());
  check_launch(kernels::paged_decode_attention(p, c10::cuda::getCurrentCUDAStream()),
               "paged_attention");
  if (!out_ok) out.copy_(dst);
}

}  // namespace fastdecode::cuda
