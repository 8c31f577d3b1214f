// Fused sampling: repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw, one CTA
// per row, no sort.
//
// Every filter keeps the tokens whose value is >= a threshold, so the kept set is one threshold:
// top-k's is the k-th largest value (ties kept), top-p's the largest value v whose mass
// sum(exp(x - max) for x >= v) reaches top_p of the top-k mass, min-p's max + log(min_p). The
// first two are found by a block-wide radix select over order-preserving 32-bit keys (4 passes
// of 8 bits), weighted by 1 (top-k) or by the probability mass (top-p).
//
// Masses are fixed-point integers (exp(x - max) * 2^40 in uint64): integer sums do not depend on
// the order of the atomics, so a seeded row is a pure function of its inputs, and the running
// sum of the draw is exactly monotone, so the drawn id is always a kept, in-range token.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/philox.h"
#include "common.cuh"
#include "dispatch.cuh"

namespace fastdecode::kernels {

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
  int64_t logits_stride;            // elements between rows of logits (innermost stride 1)
  int64_t seen_stride;              // elements between rows of seen_tokens
  int64_t scores_stride;            // sampling_scores_stride(V): row stride of the workspace
  int num_rows;                     // B
  int vocab_size;                   // V
  int num_seen;                     // L (0 when seen_tokens is null)
  DType dtype;                      // dtype of logits
};

// Row stride of the float32 score workspace: V rounded up to whole float4 vectors (the padding
// holds -inf, which no filter keeps with any mass).
inline int64_t sampling_scores_stride(int64_t vocab_size) { return (vocab_size + 3) / 4 * 4; }

namespace detail {

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / kWarpSize;
constexpr int kRadixBins = 256;
constexpr float kMassScale = 1099511627776.0f;  // 2^40: V * 2^40 < 2^64 for V < 2^24

// Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b)); -0 maps like +0 so
// equal values tie.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct SampleSmem {
  unsigned long long hist[kRadixBins];
  unsigned long long warp_total[kSampleWarps];
  float warp_max[kSampleWarps];
  int warp_arg[kSampleWarps];
  unsigned long long sel_above;
  int sel_bin;
  int found;
};

// Sum of a per-thread value over the block, in a fixed order. Ends with a barrier.
__device__ uint64_t block_sum(uint64_t x, SampleSmem& sm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) sm.warp_total[warp] = x;
  __syncthreads();
  uint64_t total = 0;
  for (int w = 0; w < kSampleWarps; ++w) total += sm.warp_total[w];
  __syncthreads();
  return total;
}

// hist[digit] += w over the warp. Lanes sharing a digit are summed first when a warp holds few
// distinct digits (the top radix level puts most logits in 2-4 bins: one atomic per lane would
// serialise on those addresses).
__device__ __forceinline__ void hist_add(unsigned long long* hist, uint32_t digit, uint64_t w) {
  const int lane = threadIdx.x % kWarpSize;
  const bool active = w != 0;
  if (__ballot_sync(kFullMask, active) == 0u) return;
  const unsigned peers = __match_any_sync(kFullMask, active ? digit : 0xffffffffu);
  const bool leader = active && lane == __ffs(peers) - 1;
  unsigned todo = __ballot_sync(kFullMask, leader);
  if (__popc(todo) <= 4) {
    while (todo) {
      const int src = __ffs(todo) - 1;
      todo &= todo - 1;
      const uint32_t d = __shfl_sync(kFullMask, digit, src);
      const uint64_t sum = warp_sum(active && digit == d ? w : uint64_t{0});
      if (lane == src) atomicAdd(&hist[d], static_cast<unsigned long long>(sum));
    }
  } else if (active) {
    atomicAdd(&hist[digit], static_cast<unsigned long long>(w));
  }
}

// Fixed-point probability mass of x relative to the row max.
__device__ __forceinline__ uint64_t mass(float x, float row_max) {
  return __float2ull_rn(expf(x - row_max) * kMassScale);
}

// Fixed-point mass of the tokens with order_key >= keep_key, summed over the block (every thread
// gets the total). scores: [num_vecs * 4] float32 in shared/global scratch.
__device__ uint64_t kept_mass(const float* scores, int num_vecs, float row_max, uint32_t keep_key,
                              SampleSmem& sm) {
  uint64_t part = 0;
  for (int v = threadIdx.x; v < num_vecs; v += kSampleThreads) {
    const float4 x4 = reinterpret_cast<const float4*>(scores)[v];
    const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) part += order_key(xs[i]) >= keep_key ? mass(xs[i], row_max) : 0;
  }
  return block_sum(part, sm);
}

// The largest key K such that the weight of {x : key(x) >= K, key(x) >= floor_key} reaches
// `target`; weight is 1 per element (by_mass false) or mass(x). Returns false when even the
// whole candidate set weighs less than `target` (rounding), leaving *key untouched.
__device__ bool radix_select(const float* scores, int num_vecs, float row_max, uint32_t floor_key,
                             bool by_mass, uint64_t target, SampleSmem& sm, uint32_t* key) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  uint32_t prefix = 0;
  uint64_t above = 0;  // weight of the candidates whose high digits exceed `prefix`
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
    for (int i = threadIdx.x; i < kRadixBins; i += kSampleThreads) sm.hist[i] = 0;
    __syncthreads();
    for (int v0 = 0; v0 < num_vecs; v0 += kSampleThreads) {  // trip count uniform per warp
      const int v = v0 + static_cast<int>(threadIdx.x);
      const float4 x4 = v < num_vecs ? reinterpret_cast<const float4*>(scores)[v]
                                     : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t k = order_key(xs[i]);
        const bool candidate = v < num_vecs && k >= floor_key && (k & high_mask) == prefix;
        const uint64_t w = candidate ? (by_mass ? mass(xs[i], row_max) : uint64_t{1}) : 0;
        hist_add(sm.hist, (k >> shift) & 0xffu, w);
      }
    }
    __syncthreads();
    if (warp == 0) {  // lane l owns bins [8l, 8l + 8); find the highest bin reaching target
      uint64_t lane_total = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) lane_total += sm.hist[lane * 8 + i];
      uint64_t from_here = lane_total;  // weight of bins owned by lanes >= this one
#pragma unroll
      for (int d = 1; d < kWarpSize; d *= 2) {
        const uint64_t t = __shfl_down_sync(kFullMask, from_here, d);
        if (lane + d < kWarpSize) from_here += t;
      }
      uint64_t run = above + from_here - lane_total;
      int bin = -1;
      uint64_t bin_above = 0;
#pragma unroll
      for (int i = 7; i >= 0; --i) {
        const uint64_t w = sm.hist[lane * 8 + i];
        if (bin < 0 && run + w >= target) {
          bin = lane * 8 + i;
          bin_above = run;
        }
        run += w;
      }
      const unsigned hit = __ballot_sync(kFullMask, bin >= 0);
      if (hit == 0u) {
        if (lane == 0) sm.found = 0;
      } else {
        const int src = 31 - __clz(hit);
        const int chosen = __shfl_sync(kFullMask, bin, src);
        const uint64_t chosen_above = __shfl_sync(kFullMask, bin_above, src);
        if (lane == 0) {
          sm.found = 1;
          sm.sel_bin = chosen;
          sm.sel_above = chosen_above;
        }
      }
    }
    __syncthreads();
    if (!sm.found) return false;  // only possible at the top level
    prefix |= static_cast<uint32_t>(sm.sel_bin) << shift;
    above = sm.sel_above;
    __syncthreads();  // sm.* is rewritten by the next level
  }
  *key = prefix;
  return true;
}

// Block-wide (max, first index of the max) of scores[0, 4 * num_vecs).
__device__ void block_argmax(const float* scores, int num_vecs, SampleSmem& sm, float* max_out,
                             int* arg_out) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float best = -INFINITY;
  int arg = 0x7fffffff;
  for (int v = threadIdx.x; v < num_vecs; v += kSampleThreads) {
    const float4 x4 = reinterpret_cast<const float4*>(scores)[v];
    const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (xs[i] > best || (xs[i] == best && 4 * v + i < arg)) {
        best = xs[i];
        arg = 4 * v + i;
      }
    }
  }
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) {
    const float ob = __shfl_xor_sync(kFullMask, best, d);
    const int oa = __shfl_xor_sync(kFullMask, arg, d);
    if (ob > best || (ob == best && oa < arg)) {
      best = ob;
      arg = oa;
    }
  }
  if (lane == 0) {
    sm.warp_max[warp] = best;
    sm.warp_arg[warp] = arg;
  }
  __syncthreads();
  best = -INFINITY;
  arg = 0x7fffffff;
  for (int w = 0; w < kSampleWarps; ++w) {
    if (sm.warp_max[w] > best || (sm.warp_max[w] == best && sm.warp_arg[w] < arg)) {
      best = sm.warp_max[w];
      arg = sm.warp_arg[w];
    }
  }
  __syncthreads();
  *max_out = best;
  *arg_out = arg;
}

// Inverse-CDF draw in vocabulary order: the first token whose running kept mass exceeds
// `threshold` (< the total, so some token always qualifies). Returns -1 if none did.
__device__ int draw(const float* scores, int num_vecs, float row_max, uint32_t keep_key,
                    uint64_t threshold, SampleSmem& sm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (threadIdx.x == 0) sm.found = -1;
  uint64_t base = 0;  // kept mass before this tile
  for (int v0 = 0; v0 < num_vecs; v0 += kSampleThreads) {
    const int v = v0 + static_cast<int>(threadIdx.x);
    uint64_t w[4] = {0, 0, 0, 0};
    if (v < num_vecs) {
      const float4 x4 = reinterpret_cast<const float4*>(scores)[v];
      const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = order_key(xs[i]) >= keep_key ? mass(xs[i], row_max) : 0;
    }
    const uint64_t local = w[0] + w[1] + w[2] + w[3];
    uint64_t incl = local;  // inclusive scan over the warp
#pragma unroll
    for (int d = 1; d < kWarpSize; d *= 2) {
      const uint64_t t = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += t;
    }
    if (lane == kWarpSize - 1) sm.warp_total[warp] = incl;
    __syncthreads();
    uint64_t before = base, tile_total = 0;
    for (int i = 0; i < kSampleWarps; ++i) {
      if (i < warp) before += sm.warp_total[i];
      tile_total += sm.warp_total[i];
    }
    before += incl - local;
    if (local > 0 && before <= threshold && threshold < before + local) {
      uint64_t run = before;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        run += w[i];
        if (run > threshold && w[i] > 0) {
          sm.found = 4 * v + i;
          break;
        }
      }
    }
    base += tile_total;
    __syncthreads();
    if (sm.found >= 0) break;
  }
  return sm.found;
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(SamplingParams p) {
  __shared__ SampleSmem sm;
  const int row = blockIdx.x;
  const T* logits = static_cast<const T*>(p.logits) + row * p.logits_stride;
  float* scores = p.scores + row * p.scores_stride;
  const int num_vecs = static_cast<int>(p.scores_stride / 4);
  const float temperature = p.temperature[row];
  const bool greedy = temperature == 0.f;
  const float t_eff = greedy ? 1.f : temperature;  // greedy rows get the penalty only

  // Scores = logits / T (IEEE division, as torch), -inf padding; flag NaN rows.
  bool has_nan = false;
  for (int j = threadIdx.x; j < p.scores_stride; j += kSampleThreads) {
    const float x = j < p.vocab_size ? to_float(logits[j]) : -INFINITY;
    has_nan |= isnan(x);
    scores[j] = __fdiv_rn(x, t_eff);
  }
  if (__syncthreads_or(has_nan)) {
    if (threadIdx.x == 0) p.out[row] = -1;
    return;
  }
  // Repetition penalty, recomputed from the original logit: a repeated id writes the same value,
  // so each distinct id is penalised exactly once.
  const float penalty = p.repetition_penalty[row];
  if (p.seen_tokens != nullptr && penalty != 1.f) {
    const int64_t* seen = p.seen_tokens + row * p.seen_stride;
    for (int i = threadIdx.x; i < p.num_seen; i += kSampleThreads) {
      const int64_t id = seen[i];
      if (id < 0 || id >= p.vocab_size) continue;
      const float x = to_float(logits[id]);
      scores[id] = __fdiv_rn(x < 0.f ? x * penalty : __fdiv_rn(x, penalty), t_eff);
    }
    __syncthreads();
  }

  float row_max;
  int arg;
  block_argmax(scores, num_vecs, sm, &row_max, &arg);
  if (greedy || isinf(row_max)) {  // -inf: nothing finite; +inf: no defined distribution
    if (threadIdx.x == 0) p.out[row] = greedy && row_max != -INFINITY ? arg : -1;
    return;
  }

  uint32_t keep_key = 0;  // keep x iff order_key(x) >= keep_key; 0 keeps everything
  const int top_k = p.top_k[row];
  if (top_k > 0) radix_select(scores, num_vecs, row_max, 0u, false, top_k, sm, &keep_key);
  const float top_p = p.top_p[row];
  if (top_p < 1.f) {
    const uint64_t total = kept_mass(scores, num_vecs, row_max, keep_key, sm);
    const auto target = static_cast<uint64_t>(ceil(static_cast<double>(top_p) * total));
    uint32_t key_p;
    if (radix_select(scores, num_vecs, row_max, keep_key, true, target, sm, &key_p)) {
      keep_key = max(keep_key, key_p);
    }
  }
  const float min_p = p.min_p[row];
  if (min_p > 0.f) keep_key = max(keep_key, order_key(row_max + logf(min_p)));

  const uint64_t total = kept_mass(scores, num_vecs, row_max, keep_key, sm);  // max always kept
  const float u = philox_uniform(static_cast<uint64_t>(p.seeds[row]),
                                 static_cast<uint64_t>(p.offsets[row]));
  const auto threshold = static_cast<uint64_t>(static_cast<double>(u) * total);
  const int id = draw(scores, num_vecs, row_max, keep_key, threshold, sm);
  if (threadIdx.x == 0) p.out[row] = id >= 0 ? id : arg;  // the max is kept: a safe fallback
}

}  // namespace detail

// Launches the fused sampler on `stream`; `scores` must hold B * sampling_scores_stride(V)
// floats.
inline cudaError_t sample(const SamplingParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.vocab_size <= 0 || p.vocab_size >= (1 << 24) ||
      p.scores_stride != sampling_scores_stride(p.vocab_size)) {
    return cudaErrorInvalidValue;
  }
  return DISPATCH_DTYPE(p.dtype, T, [&] {
    return launch(detail::sample_kernel<T>, dim3(static_cast<unsigned>(p.num_rows)),
                  dim3(detail::kSampleThreads), stream, p);
  });
}

}  // namespace fastdecode::kernels
