// The layer loop of a Llama-family decoder step (llama, mistral, qwen2, qwen3), float32, on the
// torch-free kernels: per layer RMSNorm, packed q/k/v product (+ bias), (qwen3) q/k RMSNorm,
// rotary, append_kv + paged attention, o product + residual, RMSNorm, packed gate/up product,
// SiLU * up, down product + residual. One call runs every layer, so a decode step pays one
// dispatch instead of ~10 per layer. Torch-free: raw pointers, int64 sizes; the torch adapter
// (decoder.cpp) checks the tensors and fills the params.
#pragma once

#include <cstdint>

namespace fastdecode::cpu {

// One decoder layer's weights. Packed products use the layout of linear_kernel.h.
struct DecoderLayerWeights {
  const float* input_norm;  // [H]
  const float* qkv;         // packed [(Hq + 2 Hkv) * D] x [H]
  const float* qkv_bias;    // [(Hq + 2 Hkv) * D] or nullptr
  const float* q_norm;      // [D] or nullptr (then k_norm is nullptr too)
  const float* k_norm;      // [D] or nullptr
  const float* o;           // packed [H] x [Hq * D]
  const float* o_bias;      // [H] or nullptr
  const float* post_norm;   // [H]
  const float* gate_up;     // packed [2I] x [H]
  const float* gate_up_bias;  // [2I] or nullptr
  const float* down;        // packed [H] x [I]
  const float* down_bias;   // [H] or nullptr
  float* k_cache;           // [N, P, Hkv, D], contiguous
  float* v_cache;           // [N, P, Hkv, D], contiguous
  int64_t sliding_window;   // 0 = off
};

// A decode step whose B sequences all start with the same C cache blocks (a shared system
// prompt): each layer without a window attends to those blocks in one packed, non-causal call
// of all B query rows, to each sequence's remaining blocks in a decode call, and merges the two
// exactly by their log-sum-exps (fastdecode/plan/cascade.py; layers with a window take the
// plain decode call).
struct SharedPrefixParams {
  const int32_t* tables;         // [1, C]: the shared block ids
  const int32_t* lens;           // [1]: C * P
  const int32_t* cu_seqlens;     // [2]: 0, B (the B query rows as one packed sequence)
  const int32_t* suffix_tables;  // [B, M - C]: each sequence's remaining blocks
  const int32_t* suffix_lens;    // [B]: its KV length past the shared blocks (>= 1)
  int64_t num_blocks;            // C
  int64_t suffix_max_blocks;     // M - C
};

struct DecoderStepParams {
  float* hidden;                 // [T, H] contiguous: the residual stream, updated in place
  float* scratch;                // decoder_step_scratch_size(...) floats
  const DecoderLayerWeights* layers;
  int64_t num_layers;
  const int64_t* positions;      // [T]
  const int32_t* block_tables;   // [B, M]
  const int32_t* seq_lens;       // [B], KV lengths including this step's tokens
  const int32_t* cu_seqlens_q;   // [B + 1] (packed form) or nullptr (decode: T == B)
  const int64_t* slot_mapping;   // [T]; < 0 skips the token
  const SharedPrefixParams* shared_prefix;  // decode steps (T == B) only, or nullptr
  const float* inv_freq;         // [D / 2]
  float rotary_scaling;
  int64_t num_tokens;            // T
  int64_t num_seqs;              // B
  int64_t hidden_size;           // H
  int64_t intermediate_size;     // I
  int64_t num_heads, num_kv_heads, head_dim;  // Hq, Hkv, D
  int64_t num_blocks, block_size, max_blocks_per_seq;  // N, P, M
  float eps;                     // RMSNorm epsilon
  float scale;                   // attention's q . k scale
};

// Floats of scratch one call needs for T tokens (shared-prefix steps included).
int64_t decoder_step_scratch_size(int64_t num_tokens, int64_t hidden_size,
                                  int64_t intermediate_size, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim);

void decoder_step_kernel(const DecoderStepParams& p);

}  // namespace fastdecode::cpu
