// Torch adapters of the CPU kernels: check shapes / dtypes, dispatch on dtype, run the kernel.
// Shapes use the shared vocabulary (see README.md): T tokens, B seqs, Hq / Hkv heads, D head_dim,
// N blocks, P block_size, M max_blocks_per_seq, V vocab_size.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastdecode::cpu {

// key, value: [T, Hkv, D]; k_cache, v_cache: [N, P, Hkv, D]; slot_mapping: [T] int64 (< 0 skips).
void append_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
               at::Tensor& v_cache, const at::Tensor& slot_mapping);

// out, query: [B, Hq, D] (decode) or [T, Hq, D] with cu_seqlens_q [B + 1] int32 (packed);
// block_tables: [B, M] int32; seq_lens: [B] int32; alibi_slopes: [Hq] float32;
// relative_bias: [Hq, 2R + 1] float32 (key j of query i: entry R + clamp(j - i, -R, R)).
// softcap 0 = off; sliding_window 0 = off.
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                     double scale, bool causal, double softcap, int64_t sliding_window,
                     const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& relative_bias);

// paged_attention without window, ALiBi or bias that also writes lse: [B or T, Hq] float32,
// each row's log-sum-exp of its scaled (and soft-capped) logits, -inf for a row with no key:
// the state that merges attention over disjoint key sets (shared-prefix decode).
void paged_attention_lse(at::Tensor& out, at::Tensor& lse, const at::Tensor& query,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const std::optional<at::Tensor>& cu_seqlens_q, double scale, bool causal,
                         double softcap);

// logits: [B, V] any float dtype; seen_tokens: [B, L] int64 (-1 = padding); penalty: [B] f32.
// Returns [B, V] float32.
at::Tensor apply_repetition_penalty(const at::Tensor& logits,
                                    const std::optional<at::Tensor>& seen_tokens,
                                    const at::Tensor& penalty);

// Per-row parameters, all [B]: temperature f32 (0 = greedy), top_k int32 (0 = off),
// top_p f32 (1 = off), min_p f32 (0 = off), repetition_penalty f32 (1 = off).
// Returns [B, V] float32 processed scores (-inf where filtered).
at::Tensor process_logits(const at::Tensor& logits, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p,
                          const at::Tensor& min_p, const at::Tensor& repetition_penalty,
                          const std::optional<at::Tensor>& seen_tokens);

// As process_logits, then one draw per row: seeds, offsets [B] int64 key the Philox draw.
// Returns [B] int64 ids, -1 for rows with NaN logits or nothing finite left.
at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& repetition_penalty,
                  const std::optional<at::Tensor>& seen_tokens, const at::Tensor& seeds,
                  const at::Tensor& offsets);

// Weight-streaming linear product for few rows (linear_kernel.h has the packed layout).
// The output features per panel of the packed layout this build uses.
int64_t packed_linear_panel_width();
// packed: [ceil(out_features / panel), in_features, panel] float32, filled from
// weight [out_features, in_features] float32.
void pack_linear_weight(at::Tensor& packed, const at::Tensor& weight);
// x: [..., in_features] float32; bias: [out_features] float32. Returns x @ weight^T + bias,
// [..., out_features] float32.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias, int64_t out_features);

// The native decoder step's elementwise layers, float32 (layer_kernels.h).
// x: [..., H]; weight: [H]. Returns weight * x / sqrt(mean(x^2, -1) + eps), [..., H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// In place: x [T, H, D] (unit last stride, D even, <= 512) = x * cos + rotate_half(x) * sin
// for the tables of positions [T] int64 with inv_freq [D / 2] and the scaling.
void rotary_embedding(at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                      double scaling);
// gate_up: [..., 2I]. Returns silu(gate) * up, [..., I].
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// The Llama-family layer loop, float32 (decoder_step.h): hidden [T, H] updated in place by
// every layer. layers: 12 entries per layer (decoder.cpp's Slot order: input_norm, packed qkv,
// qkv_bias?, q_norm?, k_norm?, packed o, o_bias?, post_norm, packed gate_up, gate_up_bias?,
// packed down, down_bias?); k_caches, v_caches: [N, P, Hkv, D] per layer; sliding_windows: per
// layer, 0 = off; the step's metadata as paged_attention takes it (decode form without
// cu_seqlens_q) with slot_mapping [T] int64 and positions [T] int64; inv_freq: [D / 2].
// shared_prefix: empty, or (decode steps) the five int32 tensors of a shared-prefix plan
// (fastdecode/plan/cascade.py: tables [1, C], lens [1], cu_seqlens [2], suffix_tables
// [B, M - C], suffix_lens [B]).
void decoder_layers(at::Tensor& hidden, const at::Tensor& positions,
                    const c10::List<std::optional<at::Tensor>>& layers,
                    at::TensorList k_caches, at::TensorList v_caches,
                    at::IntArrayRef sliding_windows, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                    const at::Tensor& slot_mapping, const at::Tensor& inv_freq,
                    double rotary_scaling, int64_t num_heads, double eps, double scale,
                    at::TensorList shared_prefix);

// expert_logits, amateur_logits: [B, V] any float dtypes (each its own); alpha, plausibility:
// [B] float32 in [0, 1e6] / [0, 1]. Returns [B, V] float32 contrastive-decoding scores.
at::Tensor contrastive_logits(const at::Tensor& expert_logits, const at::Tensor& amateur_logits,
                              const at::Tensor& alpha, const at::Tensor& plausibility);

}  // namespace fastdecode::cpu
