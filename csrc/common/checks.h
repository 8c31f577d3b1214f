// Argument checks shared by the CPU and CUDA torch adapters: one vocabulary and one message
// format ("fastdecode.<op>: <argument> ..."), so a direct torch.ops.fastdecode.* caller gets the
// same shape / dtype / device / scalar checks on every device. Nothing here reads tensor
// contents: the CPU adapters check values on the host (csrc/cpu/value_checks.h), the CUDA
// kernels guard against bad values on the device instead of syncing.
// Shapes use the shared vocabulary: T tokens, B seqs, Hq / Hkv heads, D head_dim, N blocks,
// P block_size, M max_blocks_per_seq, V vocab_size.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "message.h"

// Python sees ValueError for a bad shape, size, device or value and TypeError for a bad dtype,
// as from the checks of fastdecode.ops.
// The message is built only when the check fails (csrc/common/message.h).
#define FASTDECODE_CHECK(cond, op, ...) \
  TORCH_CHECK_VALUE((cond), ::fastdecode::message::text("fastdecode.", op, ": ", __VA_ARGS__))
#define FASTDECODE_CHECK_TYPE(cond, op, ...) \
  TORCH_CHECK_TYPE((cond), ::fastdecode::message::text("fastdecode.", op, ": ", __VA_ARGS__))

namespace fastdecode::checks {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

inline void same_device(const char* op, const at::Tensor& t, const char* name,
                        const at::Tensor& like) {
  FASTDECODE_CHECK(t.device() == like.device(), op, name, " is on ", t.device(),
                   ", the other tensors on ", like.device(),
                   ": every tensor of a call must be on one device");
}

inline void dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  FASTDECODE_CHECK_TYPE(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ",
                   t.scalar_type());
}

inline void float_dtype(const char* op, const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  FASTDECODE_CHECK_TYPE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, name,
                   " must be float32, float16 or bfloat16, got ", d);
}

inline void shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                  const char* meaning) {
  FASTDECODE_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, " (", meaning,
                   "), got ", t.sizes());
}

// An index tensor: `dtype`, `shape`, contiguous, on `like`'s device.
inline void index(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape, const char* meaning, const at::Tensor& like) {
  same_device(op, t, name, like);
  checks::shape(op, t, name, shape, meaning);
  checks::dtype(op, t, name, dtype);
  FASTDECODE_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

inline void in_range(const char* op, int64_t value, const char* name, int64_t low,
                     int64_t high) {
  FASTDECODE_CHECK(value >= low && value <= high, op, name, " must be in [", low, ", ", high,
                   "], got ", value);
}

inline void finite(const char* op, double value, const char* name) {
  FASTDECODE_CHECK(std::isfinite(value) && std::abs(value) <= std::numeric_limits<float>::max(),
                   op, name, " must be a finite float32 number, got ", value);
}

struct CacheDims {
  int64_t num_blocks, block_size, num_kv_heads, head_dim;  // N, P, Hkv, D
};

// k_cache, v_cache: [N, P, Hkv, D], one float dtype, one device, contiguous, every size >= 1.
inline CacheDims kv_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  FASTDECODE_CHECK(k_cache.dim() == 4, op, "k_cache must be [num_blocks, block_size, "
                   "num_kv_heads, head_dim], got ", k_cache.sizes());
  FASTDECODE_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache shape ", v_cache.sizes(),
                   " != k_cache shape ", k_cache.sizes());
  same_device(op, v_cache, "v_cache", k_cache);
  float_dtype(op, k_cache, "k_cache");
  dtype(op, v_cache, "v_cache", k_cache.scalar_type());
  FASTDECODE_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op,
                   "k_cache and v_cache must be contiguous");
  const CacheDims c{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  in_range(op, c.num_blocks, "k_cache: num_blocks", 1, kInt32Max);
  in_range(op, c.block_size, "k_cache: block_size", 1, kInt32Max);
  in_range(op, c.num_kv_heads, "k_cache: num_kv_heads", 1, kInt32Max);
  in_range(op, c.head_dim, "k_cache: head_dim", 1, kMaxHeadDim);
  return c;
}

// t: [rows, heads, D] of the cache dtype and device, last dim contiguous.
inline void head_rows(const char* op, const at::Tensor& t, const char* name,
                      const at::Tensor& cache, int64_t heads) {
  same_device(op, t, name, cache);
  FASTDECODE_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == cache.size(3), op, name,
                   " must be [tokens, ", heads, ", ", cache.size(3), "], got ", t.sizes());
  dtype(op, t, name, cache.scalar_type());
  FASTDECODE_CHECK(t.stride(2) == 1, op, name, " must have a contiguous last dim, got strides ",
                   t.strides());
  in_range(op, t.size(0), "number of tokens", 0, kInt32Max);
}

// key, value: [T, Hkv, D] (last dim contiguous); slot_mapping: [T] int64.
inline CacheDims append_kv(const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slot_mapping) {
  constexpr const char* op = "append_kv";
  const CacheDims c = kv_cache(op, k_cache, v_cache);
  head_rows(op, key, "key", k_cache, c.num_kv_heads);
  head_rows(op, value, "value", k_cache, c.num_kv_heads);
  FASTDECODE_CHECK(value.size(0) == key.size(0), op, "value has ", value.size(0),
                   " tokens, key has ", key.size(0));
  index(op, slot_mapping, "slot_mapping", at::kLong, {key.size(0)}, "one slot per token",
        k_cache);
  return c;
}

struct PagedDims {
  CacheDims cache;
  int64_t num_seqs, max_blocks, num_qo_heads, num_tokens;  // B, M, Hq, T
};

// See csrc/cpu/ops.h for the shapes. Scalars: scale finite, softcap finite >= 0 (0 = off),
// sliding_window >= 0 (0 = off).
inline PagedDims paged_attention(const at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                 const std::optional<at::Tensor>& cu_seqlens_q, double scale,
                                 double softcap, int64_t sliding_window,
                                 const std::optional<at::Tensor>& alibi_slopes,
                                 const std::optional<at::Tensor>& relative_bias) {
  constexpr const char* op = "paged_attention";
  PagedDims d{};
  d.cache = kv_cache(op, k_cache, v_cache);
  FASTDECODE_CHECK(query.dim() == 3, op, "query must be [tokens, num_qo_heads, head_dim], got ",
                   query.sizes());
  d.num_qo_heads = query.size(1);
  d.num_tokens = query.size(0);
  FASTDECODE_CHECK(d.num_qo_heads >= 1 && d.num_qo_heads % d.cache.num_kv_heads == 0, op,
                   "num_qo_heads ", d.num_qo_heads, " must be a positive multiple of "
                   "num_kv_heads ", d.cache.num_kv_heads);
  head_rows(op, query, "query", k_cache, d.num_qo_heads);
  head_rows(op, out, "out", k_cache, d.num_qo_heads);
  FASTDECODE_CHECK(out.sizes() == query.sizes(), op, "out shape ", out.sizes(),
                   " != query shape ", query.sizes());
  FASTDECODE_CHECK(block_tables.dim() == 2, op, "block_tables must be [num_seqs, "
                   "max_blocks_per_seq], got ", block_tables.sizes());
  d.num_seqs = block_tables.size(0);
  d.max_blocks = block_tables.size(1);
  index(op, block_tables, "block_tables", at::kInt, {d.num_seqs, d.max_blocks},
        "[num_seqs, max_blocks_per_seq]", query);
  index(op, seq_lens, "seq_lens", at::kInt, {d.num_seqs}, "[num_seqs]", query);
  FASTDECODE_CHECK(d.max_blocks * d.cache.block_size < kInt32Max, op, "max_blocks_per_seq ",
                   d.max_blocks, " x block_size ", d.cache.block_size, " must be < 2^31 - 1");
  if (cu_seqlens_q) {
    index(op, *cu_seqlens_q, "cu_seqlens_q", at::kInt, {d.num_seqs + 1}, "[num_seqs + 1]",
          query);
  } else {
    FASTDECODE_CHECK(d.num_tokens == d.num_seqs, op, "query: the decode form takes one token "
                     "per sequence, got ", d.num_tokens, " tokens for ", d.num_seqs,
                     " sequences");
  }
  if (alibi_slopes) {
    index(op, *alibi_slopes, "alibi_slopes", at::kFloat, {d.num_qo_heads}, "[num_qo_heads]",
          query);
  }
  if (relative_bias) {
    const int64_t width = relative_bias->dim() == 2 ? relative_bias->size(1) : 0;
    FASTDECODE_CHECK(width % 2 == 1 && width < kInt32Max, op, "relative_bias must be "
                     "[num_qo_heads, 2 * R + 1] (the bias of distances -R .. R), got ",
                     relative_bias->sizes());
    index(op, *relative_bias, "relative_bias", at::kFloat, {d.num_qo_heads, width},
          "[num_qo_heads, 2 * R + 1]", query);
  }
  finite(op, scale, "scale");
  finite(op, softcap, "softcap");
  FASTDECODE_CHECK(softcap >= 0, op, "softcap must be >= 0 (0 = off), got ", softcap);
  in_range(op, sliding_window, "sliding_window (0 = off)", 0, kInt32Max);
  return d;
}

// logits: [B, V] with a float dtype, 1 <= V <= 2^31 - 1 (token ids are int32 inside).
inline void logits(const char* op, const at::Tensor& logits) {
  FASTDECODE_CHECK(logits.dim() == 2, op, "logits must be [num_seqs, vocab_size], got shape ",
                   logits.sizes());
  float_dtype(op, logits, "logits");
  in_range(op, logits.size(1), "vocab_size", 1, kInt32Max);
}

// t: [B] of `dtype`, contiguous, on the logits' device.
inline void per_row(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype,
                    const at::Tensor& logits) {
  index(op, t, name, dtype, {logits.size(0)}, "one value per row", logits);
}

// seen_tokens: [B, L] int64 ids on the logits' device, rows contiguous; absent or empty = none.
inline bool seen_tokens(const char* op, const std::optional<at::Tensor>& seen,
                        const at::Tensor& logits) {
  if (!seen.has_value() || seen->numel() == 0) return false;
  same_device(op, *seen, "seen_tokens", logits);
  FASTDECODE_CHECK(seen->dim() == 2 && seen->size(0) == logits.size(0), op,
                   "seen_tokens must be [", logits.size(0), ", L], got shape ", seen->sizes());
  dtype(op, *seen, "seen_tokens", at::kLong);
  FASTDECODE_CHECK(seen->stride(1) == 1, op, "seen_tokens must have contiguous rows");
  return true;
}

// expert_logits, amateur_logits: [B, V] float (each its own dtype), one shape and device,
// 1 <= V <= 2^31 - 1; alpha, plausibility: [B] float32, contiguous.
inline void contrastive_logits(const at::Tensor& expert, const at::Tensor& amateur,
                               const at::Tensor& alpha, const at::Tensor& plausibility) {
  constexpr const char* op = "contrastive_logits";
  for (const auto& [t, name] : {std::pair{&expert, "expert_logits"},
                                std::pair{&amateur, "amateur_logits"}}) {
    FASTDECODE_CHECK(t->dim() == 2, op, name, " must be [num_seqs, vocab_size], got shape ",
                     t->sizes());
    float_dtype(op, *t, name);
  }
  same_device(op, amateur, "amateur_logits", expert);
  FASTDECODE_CHECK(amateur.sizes() == expert.sizes(), op, "amateur_logits must have the shape "
                   "of expert_logits ", expert.sizes(), ", got ", amateur.sizes());
  in_range(op, expert.size(1), "vocab_size", 1, kInt32Max);
  per_row(op, alpha, "alpha", at::kFloat, expert);
  per_row(op, plausibility, "plausibility", at::kFloat, expert);
}

}  // namespace fastdecode::checks
