// Torch adapters of append_kv and paged decode attention: check (the shared shape / dtype /
// device checks of csrc/common/checks.h; values are not read on the host, the kernels guard
// against out-of-range ids), fill Params, launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "launchers.h"
#include "ops.h"

namespace fastdecode::cuda {

void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_cuda("append_kv", k_cache, "k_cache");
  // The kernel copies whole head rows: their elements must be adjacent.
  const at::Tensor k = key.dim() == 3 && key.stride(2) != 1 ? key.contiguous() : key;
  const at::Tensor v = value.dim() == 3 && value.stride(2) != 1 ? value.contiguous() : value;
  const checks::CacheDims c = checks::append_kv(k, v, k_cache, v_cache, slot_mapping);
  if (k.size(0) == 0) return;  // an empty grid is not a valid launch

  kernels::AppendKVParams p{};
  p.key = k.data_ptr();
  p.value = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.key_stride_token = k.stride(0);
  p.key_stride_head = k.stride(1);
  p.value_stride_token = v.stride(0);
  p.value_stride_head = v.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_token = k_cache.stride(1);
  p.cache_stride_head = k_cache.stride(2);
  p.num_tokens = k.size(0);
  p.num_slots = c.num_blocks * c.block_size;
  p.num_kv_heads = static_cast<int>(c.num_kv_heads);
  p.head_dim = static_cast<int>(c.head_dim);
  p.block_size = static_cast<int>(c.block_size);
  p.elem_bytes = static_cast<int>(k_cache.element_size());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  check_launch(launch_append_kv(p, c10::cuda::getCurrentCUDAStream()), "append_kv");
}

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool /*causal: implied by the decode form*/, double softcap,
                     int64_t sliding_window, const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& relative_bias) {
  FASTDECODE_CHECK(!cu_seqlens_q.has_value(), "paged_attention", "the CUDA kernel implements "
                   "the decode form only; the packed (cu_seqlens_q) form runs on "
                   "backend='triton'");
  FASTDECODE_CHECK(!relative_bias.has_value(), "paged_attention", "the CUDA kernel has no "
                   "relative_bias; it runs on backend='triton'");
  check_cuda("paged_attention", query, "query");
  const checks::PagedDims dims = checks::paged_attention(
      out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, softcap,
      sliding_window, alibi_slopes, relative_bias);
  const int64_t num_seqs = dims.num_seqs, hq = dims.num_qo_heads, d = dims.cache.head_dim;
  if (num_seqs == 0) return;  // an empty grid is not a valid launch
  FASTDECODE_CHECK(kernels::is_supported_head_dim(static_cast<int>(d)), "paged_attention",
                   "unsupported head_dim ", d, " (supported: " FASTDECODE_CUDA_HEAD_DIMS_STR ")");
  FASTDECODE_CHECK(aligned16(k_cache) && aligned16(v_cache), "paged_attention",
                   "k_cache / v_cache must be 16-byte aligned");
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
  p.num_kv_heads = static_cast<int>(dims.cache.num_kv_heads);
  p.head_dim = static_cast<int>(d);
  p.block_size = static_cast<int>(dims.cache.block_size);
  p.max_blocks_per_seq = static_cast<int>(dims.max_blocks);
  p.num_blocks = dims.cache.num_blocks;
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
  check_launch(launch_paged_decode(p, c10::cuda::getCurrentCUDAStream()), "paged_attention");
  if (!out_ok) out.copy_(dst);
}

}  // namespace fastdecode::cuda
