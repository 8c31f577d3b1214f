// Fused sampling: repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw, no sort.
//
// Every filter keeps the tokens whose value is >= a threshold, so the kept set is one threshold:
// top-k's is the k-th largest value (ties kept), top-p's the largest value v whose mass
// sum(exp(x - max) for x >= v) reaches top_p of the top-k mass, min-p's max + log(min_p). The
// first two are found by a block-wide radix select over order-preserving 32-bit keys (4 passes
// of 8 bits), weighted by 1 (top-k) or by the probability mass (top-p).
//
// Work split: num_splits CTAs per row (enough to fill the GPU at small batch), each owning a
// slice of the vocabulary. Each computes its slice's scores (penalised logits / T, into the
// workspace), its (max, first argmax), and, for a sampled row with 0 < top_k <= kCandidates, its
// slice's top-k candidates (ties kept) in vocabulary order. The last CTA of a row to finish (a
// ticket counter, no inter-CTA waiting) merges: greedy rows take the argmax; sampled rows run
// the filters and the draw on the candidates -- every token of the row's top-k set is among its
// slice's top-k, so the result is the same -- or, without top-k or when ties overflow a slice's
// candidate buffer, on the whole row. Nothing depends on num_splits: thresholds, masses and the
// draw are exact functions of the row.
//
// Masses are fixed-point integers (exp(x - max) * 2^40 in uint64): integer sums do not depend on
// the order of the atomics, so a seeded row is a pure function of its inputs, and the running
// sum of the draw is exactly monotone, so the drawn id is always a kept, in-range token. Shared
// histograms use 32-bit atomics (a 64-bit shared atomic add is a compare-and-swap loop): counts
// fit in 32 bits, masses are added as low / high words with an explicit carry.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/philox.h"
#include "common.cuh"
#include "dispatch.cuh"

namespace fastdecode::kernels {

namespace detail {

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / kWarpSize;
constexpr int kRadixBins = 256;
constexpr float kMassScale = 1099511627776.0f;  // 2^40: V * 2^40 < 2^64 for V < 2^24
// Top-p drops a token when the mass strictly above it reaches top_p of the total; an exact tie
// (HF drops it) is decided up to this fraction of the total, whatever the rounding of the
// masses. The same rule as the CPU and Triton kernels.
constexpr double kTopPTolerance = 1e-6;

// Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b)); -0 maps like +0 so
// equal values tie.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct SampleSmem {
  uint32_t hist_lo[kRadixBins];  // low / high words of each bin's 64-bit weight
  uint32_t hist_hi[kRadixBins];
  unsigned long long warp_total[kSampleWarps];
  float warp_max[kSampleWarps];
  int warp_arg[kSampleWarps];
  unsigned long long sel_above;
  int sel_bin;
  int found;
  int is_last;
};

// A row's values as float4 vectors, and the token id of each element: the whole (or a slice
// of the) score workspace, or the gathered candidates. Reads bypass L1 (__ldcg): the values may
// have been written by another CTA of the row.
struct DenseValues {
  const float* values;  // 16-byte aligned
  int num_vecs;
  int first_id;  // token id of values[0]
  __device__ float4 load(int v) const {
    return __ldcg(reinterpret_cast<const float4*>(values) + v);
  }
  __device__ int id(int v, int i) const { return first_id + 4 * v + i; }
};
struct CandidateValues {
  const float* values;  // [num_splits * kCandidates], -inf past each slice's count
  const int32_t* ids;
  int num_vecs;
  __device__ float4 load(int v) const {
    return __ldcg(reinterpret_cast<const float4*>(values) + v);
  }
  __device__ int id(int v, int i) const { return __ldcg(ids + 4 * v + i); }
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

// bin += w on a 64-bit weight kept as two 32-bit words: the low add returns the old low word,
// which says whether it carried. Exact whatever the order of the adds.
__device__ __forceinline__ void add_u64(uint32_t* lo, uint32_t* hi, uint64_t w) {
  const auto w_lo = static_cast<uint32_t>(w);
  const uint32_t old = atomicAdd(lo, w_lo);
  const uint32_t carry_in = static_cast<uint32_t>(w >> 32) + (old + w_lo < old ? 1u : 0u);
  if (carry_in != 0u) atomicAdd(hi, carry_in);
}

// hist[digit] += w over the warp. Lanes sharing a digit are summed first when a warp holds few
// distinct digits (the top radix level puts most logits in 2-4 bins: one atomic per lane would
// serialise on those addresses).
__device__ __forceinline__ void hist_add(SampleSmem& sm, uint32_t digit, uint64_t w) {
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
      if (lane == src) add_u64(&sm.hist_lo[d], &sm.hist_hi[d], sum);
    }
  } else if (active) {
    add_u64(&sm.hist_lo[digit], &sm.hist_hi[digit], w);
  }
}

__device__ __forceinline__ uint64_t bin_weight(const SampleSmem& sm, int bin) {
  return (static_cast<uint64_t>(sm.hist_hi[bin]) << 32) | sm.hist_lo[bin];
}

// Fixed-point probability mass of x relative to the row max.
__device__ __forceinline__ uint64_t mass(float x, float row_max) {
  return __float2ull_rn(expf(x - row_max) * kMassScale);
}

// Fixed-point mass of the values with order_key >= keep_key, summed over the block (every thread
// gets the total).
template <typename Values>
__device__ uint64_t kept_mass(const Values& vals, float row_max, uint32_t keep_key,
                              SampleSmem& sm) {
  uint64_t part = 0;
  for (int v = threadIdx.x; v < vals.num_vecs; v += kSampleThreads) {
    const float4 x4 = vals.load(v);
    const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) part += order_key(xs[i]) >= keep_key ? mass(xs[i], row_max) : 0;
  }
  return block_sum(part, sm);
}

// The largest key K such that the weight of {x : key(x) >= K, key(x) >= floor_key} reaches
// `target`; weight is 1 per element (by_mass false) or mass(x). Returns false when even the
// whole candidate set weighs less than `target` (rounding), leaving *key untouched.
template <typename Values>
__device__ bool radix_select(const Values& vals, float row_max, uint32_t floor_key, bool by_mass,
                             uint64_t target, SampleSmem& sm, uint32_t* key) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  uint32_t prefix = 0;
  uint64_t above = 0;  // weight of the candidates whose high digits exceed `prefix`
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
    for (int i = threadIdx.x; i < kRadixBins; i += kSampleThreads) {
      sm.hist_lo[i] = sm.hist_hi[i] = 0;
    }
    __syncthreads();
    for (int v0 = 0; v0 < vals.num_vecs; v0 += kSampleThreads) {  // trip count uniform per warp
      const int v = v0 + static_cast<int>(threadIdx.x);
      const float4 x4 = v < vals.num_vecs
                            ? vals.load(v)
                            : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t k = order_key(xs[i]);
        const bool candidate = v < vals.num_vecs && k >= floor_key && (k & high_mask) == prefix;
        const uint64_t w = candidate ? (by_mass ? mass(xs[i], row_max) : uint64_t{1}) : 0;
        hist_add(sm, (k >> shift) & 0xffu, w);
      }
    }
    __syncthreads();
    if (warp == 0) {  // lane l owns bins [8l, 8l + 8); find the highest bin reaching target
      uint64_t lane_total = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) lane_total += bin_weight(sm, lane * 8 + i);
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
        const uint64_t w = bin_weight(sm, lane * 8 + i);
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

// Block-wide (max, first index of the max) of scores[4 * v_begin, 4 * v_end); a NaN anywhere
// makes the max NaN.
__device__ void block_argmax(const float* scores, int v_begin, int v_end, SampleSmem& sm,
                             float* max_out, int* arg_out) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float best = -INFINITY;
  int arg = 0x7fffffff;
  bool nan = false;
  for (int v = v_begin + threadIdx.x; v < v_end; v += kSampleThreads) {
    const float4 x4 = reinterpret_cast<const float4*>(scores)[v];
    const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      nan |= isnan(xs[i]);
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
  nan = __syncthreads_or(nan);
  best = -INFINITY;
  arg = 0x7fffffff;
  for (int w = 0; w < kSampleWarps; ++w) {
    if (sm.warp_max[w] > best || (sm.warp_max[w] == best && sm.warp_arg[w] < arg)) {
      best = sm.warp_max[w];
      arg = sm.warp_arg[w];
    }
  }
  __syncthreads();
  *max_out = nan ? __uint_as_float(0x7fc00000u) : best;
  *arg_out = arg;
}

// Inclusive scan of a 64-bit value over the warp.
__device__ __forceinline__ uint64_t warp_inclusive_scan(uint64_t x) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const uint64_t t = __shfl_up_sync(kFullMask, x, d);
    if (lane >= d) x += t;
  }
  return x;
}

// Per tile of kSampleThreads vectors: (weight before this thread's vector, tile total), in
// vocabulary order, given this thread's `local` weight. Ends with a barrier.
__device__ void tile_scan(uint64_t local, SampleSmem& sm, uint64_t* before, uint64_t* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const uint64_t incl = warp_inclusive_scan(local);
  if (lane == kWarpSize - 1) sm.warp_total[warp] = incl;
  __syncthreads();
  uint64_t b = 0, t = 0;
  for (int i = 0; i < kSampleWarps; ++i) {
    if (i < warp) b += sm.warp_total[i];
    t += sm.warp_total[i];
  }
  __syncthreads();
  *before = b + incl - local;
  *total = t;
}

// Inverse-CDF draw in vocabulary order: the first token whose running kept mass exceeds
// `threshold` (< the total, so some token always qualifies). Returns -1 if none did.
template <typename Values>
__device__ int draw(const Values& vals, float row_max, uint32_t keep_key, uint64_t threshold,
                    SampleSmem& sm) {
  if (threadIdx.x == 0) sm.found = -1;
  uint64_t base = 0;  // kept mass before this tile
  for (int v0 = 0; v0 < vals.num_vecs; v0 += kSampleThreads) {
    const int v = v0 + static_cast<int>(threadIdx.x);
    uint64_t w[4] = {0, 0, 0, 0};
    if (v < vals.num_vecs) {
      const float4 x4 = vals.load(v);
      const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = order_key(xs[i]) >= keep_key ? mass(xs[i], row_max) : 0;
    }
    const uint64_t local = w[0] + w[1] + w[2] + w[3];
    uint64_t before, tile_total;
    tile_scan(local, sm, &before, &tile_total);
    before += base;
    if (local > 0 && before <= threshold && threshold < before + local) {
      uint64_t run = before;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        run += w[i];
        if (run > threshold && w[i] > 0) {
          sm.found = vals.id(v, i);
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

// The tokens of scores[4 * v_begin, 4 * v_end) with order_key >= keep_key, in vocabulary order,
// into values / ids (at most kCandidates; the rest padded with -inf). Returns how many there
// were, or -1 if more than kCandidates.
__device__ int collect_candidates(const float* scores, int v_begin, int v_end, uint32_t keep_key,
                                  float* values, int32_t* ids, SampleSmem& sm) {
  uint64_t base = 0;
  for (int v0 = v_begin; v0 < v_end; v0 += kSampleThreads) {
    const int v = v0 + static_cast<int>(threadIdx.x);
    float xs[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    if (v < v_end) {
      const float4 x4 = reinterpret_cast<const float4*>(scores)[v];
      xs[0] = x4.x, xs[1] = x4.y, xs[2] = x4.z, xs[3] = x4.w;
    }
    bool keep[4];
    uint64_t local = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      keep[i] = v < v_end && order_key(xs[i]) >= keep_key;
      local += keep[i];
    }
    uint64_t before, tile_total;
    tile_scan(local, sm, &before, &tile_total);
    uint64_t at = base + before;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (keep[i] && at < kCandidates) {
        values[at] = xs[i];
        ids[at] = 4 * v + i;
      }
      at += keep[i];
    }
    base += tile_total;
  }
  for (uint64_t i = base + threadIdx.x; i < kCandidates; i += kSampleThreads) {
    values[i] = -INFINITY;
    ids[i] = -1;
  }
  return base <= kCandidates ? static_cast<int>(base) : -1;
}

// Filters and draw of one sampled row on `vals`; returns the drawn id, or `fallback` (the row's
// argmax: always kept) if rounding left none.
template <typename Values>
__device__ int filter_and_draw(const SamplingParams& p, int row, const Values& vals,
                               float row_max, int fallback, SampleSmem& sm) {
  uint32_t keep_key = 0;  // keep x iff order_key(x) >= keep_key; 0 keeps everything
  const int top_k = p.top_k[row];
  if (top_k > 0) radix_select(vals, row_max, 0u, false, top_k, sm, &keep_key);
  const float top_p = p.top_p[row];
  if (top_p < 1.f) {
    const uint64_t total = kept_mass(vals, row_max, keep_key, sm);
    const double frac = fmax(static_cast<double>(top_p) - kTopPTolerance, 0.0);
    const auto scaled = static_cast<uint64_t>(ceil(frac * total));
    const uint64_t target = scaled > 0 ? scaled : 1;  // a tiny top_p keeps the max's group
    uint32_t key_p;
    if (radix_select(vals, row_max, keep_key, true, target, sm, &key_p)) {
      keep_key = max(keep_key, key_p);
    }
  }
  const float min_p = p.min_p[row];
  if (min_p > 0.f) keep_key = max(keep_key, order_key(row_max + logf(min_p)));

  const uint64_t total = kept_mass(vals, row_max, keep_key, sm);  // max always kept
  const float u = philox_uniform(static_cast<uint64_t>(p.seeds[row]),
                                 static_cast<uint64_t>(p.offsets[row]));
  const auto threshold = static_cast<uint64_t>(static_cast<double>(u) * total);
  const int id = draw(vals, row_max, keep_key, threshold, sm);
  return id >= 0 ? id : fallback;
}

// Grid (num_splits, B). Slice work, then the row's last CTA merges (see the file comment).
template <typename T>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(SamplingParams p) {
  __shared__ SampleSmem sm;
  const int split = blockIdx.x, row = blockIdx.y, splits = p.num_splits;
  const T* logits = static_cast<const T*>(p.logits) + row * p.logits_stride;
  float* scores = p.scores + row * p.scores_stride;
  const int row_vecs = static_cast<int>(p.scores_stride / 4);
  const int slice_vecs = ceil_div(row_vecs, splits);
  const int v_begin = min(split * slice_vecs, row_vecs);
  const int v_end = min(v_begin + slice_vecs, row_vecs);
  const float temperature = p.temperature[row];
  const bool greedy = temperature == 0.f;
  const float t_eff = greedy ? 1.f : temperature;  // greedy rows get the penalty only

  // Scores = logits / T (IEEE division, as torch), -inf padding.
  for (int j = 4 * v_begin + threadIdx.x; j < 4 * v_end; j += kSampleThreads) {
    const float x = j < p.vocab_size ? to_float(logits[j]) : -INFINITY;
    scores[j] = __fdiv_rn(x, t_eff);
  }
  // Repetition penalty of the ids in this slice, recomputed from the original logit: a repeated
  // id writes the same value, so each distinct id is penalised exactly once. Ids outside the
  // vocabulary are skipped (guard).
  const float penalty = p.repetition_penalty[row];
  __syncthreads();
  if (p.seen_tokens != nullptr && penalty != 1.f) {
    const int64_t* seen = p.seen_tokens + row * p.seen_stride;
    for (int i = threadIdx.x; i < p.num_seen; i += kSampleThreads) {
      const int64_t id = seen[i];
      if (id < 4 * v_begin || id >= 4 * v_end || id >= p.vocab_size) continue;
      const float x = to_float(logits[id]);
      scores[id] = __fdiv_rn(x < 0.f ? x * penalty : __fdiv_rn(x, penalty), t_eff);
    }
    __syncthreads();
  }

  float slice_max;
  int slice_arg;
  block_argmax(scores, v_begin, v_end, sm, &slice_max, &slice_arg);
  const int top_k = p.top_k[row];
  int count = -1;
  if (!greedy && !isnan(slice_max) && top_k > 0 && top_k <= kCandidates) {
    const DenseValues slice{scores + 4 * v_begin, v_end - v_begin, 4 * v_begin};
    uint32_t keep_key = 0;  // fewer than top_k tokens in the slice: all are candidates
    radix_select(slice, 0.f, 0u, false, top_k, sm, &keep_key);
    const int64_t at = (static_cast<int64_t>(row) * splits + split) * kCandidates;
    count = collect_candidates(scores, v_begin, v_end, keep_key, p.cand_values + at,
                               p.cand_ids + at, sm);
  }
  if (threadIdx.x == 0) {
    p.split_max[row * splits + split] = slice_max;
    p.split_arg[row * splits + split] = slice_arg;
    p.cand_count[row * splits + split] = count;
  }
  __threadfence();  // every thread's writes (scores, candidates) are visible before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    sm.is_last = atomicAdd(&p.tickets[row], 1u) == static_cast<unsigned>(splits - 1);
  }
  __syncthreads();
  if (!sm.is_last) return;
  __threadfence();

  // The row's last CTA: merge the slices.
  float row_max = -INFINITY;
  int arg = 0x7fffffff;
  bool nan = false, all_collected = true;
  for (int s = 0; s < splits; ++s) {  // slice order: the first index wins ties
    const float m = __ldcg(p.split_max + row * splits + s);
    nan |= isnan(m);
    all_collected &= __ldcg(p.cand_count + row * splits + s) >= 0;
    if (m > row_max) {
      row_max = m;
      arg = __ldcg(p.split_arg + row * splits + s);
    }
  }
  if (threadIdx.x == 0) p.tickets[row] = 0u;  // ready for the next launch (graph replays)
  if (nan || greedy || isinf(row_max)) {  // -inf: nothing finite; +inf: no distribution
    if (threadIdx.x == 0) p.out[row] = !nan && greedy && row_max != -INFINITY ? arg : -1;
    return;
  }
  int id;
  if (all_collected) {
    const int64_t at = static_cast<int64_t>(row) * splits * kCandidates;
    const CandidateValues cands{p.cand_values + at, p.cand_ids + at, splits * kCandidates / 4};
    id = filter_and_draw(p, row, cands, row_max, arg, sm);
  } else {
    id = filter_and_draw(p, row, DenseValues{scores, row_vecs, 0}, row_max, arg, sm);
  }
  if (threadIdx.x == 0) p.out[row] = id;
}

}  // namespace detail

// Launches the fused sampler on `stream`; the workspace pointers (bind_sampling_workspace) must
// hold sampling_float_workspace / sampling_int_workspace elements and `tickets` B zeros.
inline cudaError_t sample(const SamplingParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.vocab_size <= 0 || p.vocab_size >= (1 << 24) || p.num_splits < 1 ||
      p.num_splits > kMaxSplits || p.scores_stride != sampling_scores_stride(p.vocab_size) ||
      p.tickets == nullptr) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.num_rows));
  return DISPATCH_DTYPE(p.dtype, T, [&] {
    return launch(detail::sample_kernel<T>, grid, dim3(detail::kSampleThreads), stream, p);
  });
}

}  // namespace fastdecode::kernels
