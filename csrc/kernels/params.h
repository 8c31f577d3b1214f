// Host-side interface of the CUDA kernels (csrc/kernels/*.cuh): the Params structs the launchers
// take, the dtype tag, the head dims the attention kernel is built for, and the workspace sizes
// the callers allocate. Plain C++ (no CUDA, no torch), so the torch adapters, compiled by the host
// compiler, fill Params without seeing any device code, and the kernels include it too.
#pragma once

#include <cstdint>

// Head dims the CUDA attention kernels are built for (Triton / CPU serve any other).
#define FASTDECODE_CUDA_HEAD_DIMS 64, 80, 96, 128, 256
#define FASTDECODE_CUDA_HEAD_DIMS_STR "64, 80, 96, 128, 256"

namespace fastdecode::kernels {

// Floating dtype of a call's tensors; the adapters map torch dtypes onto it.
enum class DType : int { kFloat32, kFloat16, kBFloat16 };

constexpr bool is_supported_head_dim(int head_dim) {
  for (int d : {FASTDECODE_CUDA_HEAD_DIMS}) {
    if (d == head_dim) return true;
  }
  return false;
}

// ---- append_kv (append_kv.cuh)

struct AppendKVParams {
  const void* key;              // [T, Hkv, D], element strides below, innermost stride 1
  const void* value;            // [T, Hkv, D], element strides below, innermost stride 1
  void* k_cache;                // [N, P, Hkv, D], element strides below
  void* v_cache;                // [N, P, Hkv, D], same strides as k_cache
  const int64_t* slot_mapping;  // [T]: block * P + offset; outside [0, num_slots) skips the token
  int64_t key_stride_token;     // elements between tokens of `key`
  int64_t key_stride_head;      // elements between heads of `key`
  int64_t value_stride_token;   // elements between tokens of `value`
  int64_t value_stride_head;    // elements between heads of `value`
  int64_t cache_stride_block;   // elements between blocks of the caches (P * Hkv * D contiguous)
  int64_t cache_stride_token;   // elements between tokens of a block
  int64_t cache_stride_head;    // elements between heads of a token
  int64_t num_tokens;           // T
  int64_t num_slots;            // N * P
  int num_kv_heads;             // Hkv
  int head_dim;                 // D
  int block_size;               // P
  int elem_bytes;               // 2 (fp16 / bf16) or 4 (fp32)
};

// ---- paged decode attention (paged_attention.cuh)

struct PagedDecodeParams {
  void* out;                    // [B, Hq, D] query dtype, strides below, 16-byte aligned rows
  const void* query;            // [B, Hq, D] query dtype, strides below, innermost stride 1
  const void* k_cache;          // [N, P, Hkv, D], kv strides below, innermost stride 1
  const void* v_cache;          // [N, P, Hkv, D], same strides as k_cache
  const int32_t* block_tables;  // [B, M], row stride block_tables_stride; ids outside [0, N) ->
                                // NaN rows
  const int32_t* seq_lens;      // [B] KV length including the query token; 0 -> zeros; outside
                                // [0, M * P] -> NaN rows
  const float* alibi_slopes;    // [Hq] or nullptr; bias slope * (j - i)
  float* partial_out;           // [B, Hq, max_partitions, D] workspace; unused if 1 partition
  float* partial_lse;           // [B, Hq, max_partitions] workspace; unused if 1 partition
  int64_t q_stride_seq;         // elements between sequences of `query`
  int64_t q_stride_head;        // elements between heads of `query`
  int64_t o_stride_seq;         // elements between sequences of `out`
  int64_t o_stride_head;        // elements between heads of `out`
  int64_t kv_stride_block;      // elements between blocks of k_cache / v_cache
  int64_t kv_stride_token;      // elements between tokens of a block
  int64_t kv_stride_head;       // elements between heads of a token
  int64_t block_tables_stride;  // elements between rows of block_tables
  int num_seqs;                 // B
  int num_qo_heads;             // Hq
  int num_kv_heads;             // Hkv (Hq % Hkv == 0)
  int head_dim;                 // D, one of FASTDECODE_CUDA_HEAD_DIMS
  int block_size;               // P
  int max_blocks_per_seq;       // M
  int64_t num_blocks;           // N: block ids are checked against it
  float scale;                  // logits multiplier (usually D ** -0.5)
  float softcap;                // logits = softcap * tanh(logits / softcap); 0 = off
  int sliding_window;           // w: the query at position i sees i - w < j <= i; 0 = off
  DType dtype;                  // dtype of query / out / caches
};

// KV tokens per split-KV partition. Fixed, so partitions never depend on the batch.
constexpr int kPartitionTokens = 256;
// Query heads of one KV group handled by one CTA; larger groups use several CTAs.
constexpr int kMaxGroupHeads = 8;

// Partitions the longest possible sequence (M * P tokens) needs: the grid's x extent and the
// workspace's partition dimension.
inline int paged_decode_max_partitions(int64_t max_blocks_per_seq, int64_t block_size) {
  const int64_t tokens = max_blocks_per_seq * block_size;
  return static_cast<int>((tokens + kPartitionTokens - 1) / kPartitionTokens);
}

// float32 elements of workspace a call needs: partial_out then partial_lse. 0 when every
// sequence fits in one partition (then the kernel writes `out` directly and no merge runs).
inline int64_t paged_decode_workspace_floats(int64_t num_seqs, int64_t num_qo_heads,
                                             int64_t head_dim, int max_partitions) {
  if (max_partitions <= 1) return 0;
  return num_seqs * num_qo_heads * max_partitions * (head_dim + 1);
}

// ---- fused sampling (sampling.cuh)

// Candidates a CTA keeps for its slice (top_k <= kCandidates takes the candidate path).
constexpr int kCandidates = 1024;
constexpr int kMaxSplits = 16;

struct SamplingParams {
  const void* logits;               // [B, V] logits dtype, row stride logits_stride; read only
  float* scores;                    // [B, scores_stride] float32 workspace (penalised / T)
  int64_t* out;                     // [B] ids; -1 for NaN rows or nothing finite left
  const float* temperature;         // [B], 0 = greedy row
  const int32_t* top_k;             // [B], 0 = off (values in [0, V))
  const float* top_p;               // [B] in (0, 1], 1 = off
  const float* min_p;               // [B] in [0, 1], 0 = off
  const float* repetition_penalty;  // [B] > 0, 1 = off
  const int64_t* seen_tokens;       // [B, L] ids, -1 = padding, row stride seen_stride; or null
  const int64_t* seeds;             // [B] Philox keys (>= 0)
  const int64_t* offsets;           // [B] Philox counters
  float* split_max;                 // [B, num_splits] workspace: slice max (NaN: slice has NaN)
  int32_t* split_arg;               // [B, num_splits] workspace: first index of the slice max
  float* cand_values;               // [B, num_splits, kCandidates] workspace
  int32_t* cand_ids;                // [B, num_splits, kCandidates] workspace
  int32_t* cand_count;              // [B, num_splits] workspace: -1 = not collected / overflow
  uint32_t* tickets;                // [B], zero before the launch (and again after it)
  int64_t logits_stride;            // elements between rows of logits (innermost stride 1)
  int64_t seen_stride;              // elements between rows of seen_tokens
  int64_t scores_stride;            // sampling_scores_stride(V): row stride of the workspace
  int num_rows;                     // B
  int vocab_size;                   // V
  int num_seen;                     // L (0 when seen_tokens is null)
  int num_splits;                   // CTAs per row, sampling_num_splits(...)
  DType dtype;                      // dtype of logits
};

// Row stride of the float32 score workspace: V rounded up to whole float4 vectors (the padding
// holds -inf, which no filter keeps with any mass).
inline int64_t sampling_scores_stride(int64_t vocab_size) { return (vocab_size + 3) / 4 * 4; }

// CTAs per row: about two 1024-thread CTAs per SM over the batch, slices of >= 4096 tokens.
inline int sampling_num_splits(int64_t num_rows, int64_t vocab_size, int num_sms) {
  const int64_t fill = (2 * static_cast<int64_t>(num_sms) + num_rows - 1) / num_rows;
  const int64_t by_vocab = (vocab_size + 4095) / 4096;
  const int64_t splits = fill < by_vocab ? fill : by_vocab;
  return static_cast<int>(splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits));
}

// Workspace elements (float32, then int32) a launch with `num_splits` needs; the caller points
// the SamplingParams fields at them with bind_sampling_workspace. Tickets are separate: they
// must be zero.
// The per-split maxima are padded to whole float4 vectors so that the candidates after them
// stay 16-byte aligned (they are read as float4).
inline int64_t sampling_split_max_stride(int64_t num_rows, int num_splits) {
  return (num_rows * num_splits + 3) / 4 * 4;
}
inline int64_t sampling_float_workspace(int64_t num_rows, int64_t vocab_size, int num_splits) {
  return num_rows * sampling_scores_stride(vocab_size) +
         sampling_split_max_stride(num_rows, num_splits) + num_rows * num_splits * kCandidates;
}
inline int64_t sampling_int_workspace(int64_t num_rows, int num_splits) {
  return num_rows * num_splits * (2 + kCandidates);
}
inline void bind_sampling_workspace(SamplingParams& p, float* floats, int32_t* ints) {
  const int64_t rows = p.num_rows, splits = rows * p.num_splits;
  p.scores = floats;
  p.split_max = floats + rows * p.scores_stride;
  p.cand_values = p.split_max + sampling_split_max_stride(rows, p.num_splits);
  p.split_arg = ints;
  p.cand_count = ints + splits;
  p.cand_ids = p.cand_count + splits;
}

// ---- contrastive decoding scores (contrastive.cuh)

struct ContrastiveParams {
  const void* expert;          // [B, V] `dtype`, unit stride along V
  const void* amateur;         // [B, V] `dtype`, unit stride along V
  const float* alpha;          // [B] in [0, 1e6]
  const float* plausibility;   // [B] in [0, 1]
  float* out;                  // [B, V] float32
  int64_t expert_stride;       // elements between rows of `expert`
  int64_t amateur_stride;      // elements between rows of `amateur`
  int64_t out_stride;          // elements between rows of `out`
  int num_rows;                // B
  int vocab_size;              // V >= 1
  DType dtype;                 // of expert and amateur (the adapter makes them one)
};

}  // namespace fastdecode::kernels
