// Torch adapters of the CUDA kernels (csrc/kernels/*.cuh): same signatures as the CPU adapters
// in csrc/cpu/ops.h, registered for the CUDA dispatch key by csrc/cuda/registration.cpp.
// Shapes use the shared vocabulary: T tokens, B seqs, Hq / Hkv heads, D head_dim, N blocks,
// P block_size, M max_blocks_per_seq, V vocab_size.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastdecode::cuda {

// key, value: [T, Hkv, D]; k_cache, v_cache: [N, P, Hkv, D]; slot_mapping: [T] int64 (< 0 skips).
void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping);

// Decode form only (cu_seqlens_q must be None), no relative_bias (both run on Triton): out,
// query: [B, Hq, D]; block_tables: [B, M] int32; seq_lens: [B] int32; alibi_slopes: [Hq]
// float32. softcap 0 = off; sliding_window 0 = off. `causal` is implied: the single query is
// the last KV position. Allocates a float32
// workspace of B * Hq * ceil(M * P / 256) * (D + 1) elements when M * P > 256 (through torch's
// caching allocator: no sync, capturable in a CUDA graph).
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool causal, double softcap, int64_t sliding_window,
                     const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& relative_bias);

// logits: [B, V]; per-row parameters [B]: temperature f32, top_k int32, top_p f32, min_p f32,
// repetition_penalty f32; seen_tokens: [B, L] int64 (-1 = padding); seeds, offsets: [B] int64.
// Returns [B] int64 ids, -1 for rows with NaN logits or nothing finite left. Allocates the
// kernel's workspace (scores B * round_up(V, 4) float32, plus per-CTA candidates).
at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& repetition_penalty,
                  const std::optional<at::Tensor>& seen_tokens, const at::Tensor& seeds,
                  const at::Tensor& offsets);

// expert_logits, amateur_logits: [B, V] any float dtypes; alpha, plausibility: [B] float32
// (ranges checked by the public op, not here: no host sync). Returns [B, V] float32.
at::Tensor contrastive_logits(const at::Tensor& expert_logits, const at::Tensor& amateur_logits,
                              const at::Tensor& alpha, const at::Tensor& plausibility);

}  // namespace fastdecode::cuda
