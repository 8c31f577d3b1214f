// CPU kernels of the paged KV cache: append_kv and paged attention (decode and packed forms).
// Torch-free: raw pointers, int64 sizes and strides (in elements). The torch adapters in
// attention.cpp check the tensors, fill these structs and pick the storage type T
// (float, c10::BFloat16 or c10::Half; accumulation is always float32).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastdecode::cpu {

struct AppendKvParams {
  const void* key;              // [T, Hkv, D], last dim contiguous
  const void* value;            // [T, Hkv, D], last dim contiguous
  void* k_cache;                // [N, P, Hkv, D], contiguous
  void* v_cache;                // [N, P, Hkv, D], contiguous
  const int64_t* slot_mapping;  // [T], block * P + offset; < 0 skips the token
  int64_t num_tokens;           // T
  int64_t num_kv_heads;         // Hkv
  int64_t head_dim;             // D
  int64_t key_stride_t, key_stride_h;      // key strides of dims 0, 1
  int64_t value_stride_t, value_stride_h;  // value strides of dims 0, 1
};

struct PagedAttentionParams {
  void* out;                     // [B or T, Hq, D]
  const void* query;             // [B or T, Hq, D], last dim contiguous
  const void* k_cache;           // [N, P, Hkv, D], contiguous
  const void* v_cache;           // [N, P, Hkv, D], contiguous
  const int32_t* block_tables;   // [B, M]
  const int32_t* seq_lens;       // [B], KV length including the query tokens
  const int32_t* cu_seqlens_q;   // [B + 1] (packed form) or nullptr (decode: one token per seq)
  const float* alibi_slopes;     // [Hq] or nullptr
  const float* relative_bias;    // [Hq, 2R + 1] or nullptr; key j of query i: R + clamp(j - i)
  int64_t relative_radius;       // R
  int64_t num_seqs;              // B
  int64_t num_qo_heads;          // Hq
  int64_t num_kv_heads;          // Hkv
  int64_t head_dim;              // D
  int64_t block_size;            // P
  int64_t max_blocks_per_seq;    // M
  int64_t q_stride_t, q_stride_h;  // query strides of dims 0, 1
  int64_t o_stride_t, o_stride_h;  // out strides of dims 0, 1
  float scale;                   // applied to q . k
  float softcap;                 // 0 = off; else logits = softcap * tanh(logits / softcap)
  int64_t sliding_window;        // 0 = off; else query at i sees keys i - w < j <= i
  bool causal;                   // bottom-right aligned: query t of q_len sits at n - q_len + t
  float* lse;                    // [B or T, Hq] contiguous, or nullptr: each row's log-sum-exp
                                 // of its final logits (-inf: no key), to merge partial results
};

template <typename T>
void append_kv_kernel(const AppendKvParams& p);

template <typename T>
void paged_attention_kernel(const PagedAttentionParams& p);

}  // namespace fastdecode::cpu
