// Contrastive-decoding scores (fastdecode/ops/contrastive.py has the formula and its sources):
// one CTA per row, two passes over the vocabulary. Pass 1 keeps each thread's running (max,
// sum of exp(x - max)) of the expert and the amateur row, merged across the CTA once; pass 2
// writes log p_e - alpha * log p_a where the expert's logit clears max + log(plausibility) (and
// is > -inf), -inf elsewhere, and NaN for the whole row when either normaliser is not finite.
// CUDA only (no torch).
#pragma once

#include "common.cuh"
#include "dispatch.cuh"

namespace fastdecode::kernels {

constexpr int kContrastiveThreads = 256;
constexpr int kContrastiveWarps = kContrastiveThreads / kWarpSize;

namespace detail {

// (m, s) <- the pair of the union of two (max, sum of exp(x - max)) pairs; a pair that has seen
// only -inf shifts by 0 (no -inf - -inf).
__device__ __forceinline__ void merge_normaliser(float& m, float& s, float m2, float s2) {
  const float top = fmaxf(m, m2);
  const float shift = top == -INFINITY ? 0.f : top;
  s = s * expf(m - shift) + s2 * expf(m2 - shift);
  m = top;
}

struct RowNormaliser {
  float max;  // the row's largest logit
  float lse;  // log sum exp of the row; NaN or +-inf for a bad row
};

// The row's normaliser over the CTA. `sm`: 2 * kContrastiveWarps floats of shared memory owned
// by this call.
template <typename T>
__device__ RowNormaliser row_normaliser(const T* row, int vocab, float* sm) {
  float m = -INFINITY, s = 0.f;
  bool nan = false;
  for (int v = threadIdx.x; v < vocab; v += kContrastiveThreads) {
    const float x = to_float(row[v]);
    nan |= x != x;  // fmaxf drops NaN: remember it
    merge_normaliser(m, s, x, 1.f);
  }
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) {
    const float m2 = __shfl_xor_sync(kFullMask, m, d), s2 = __shfl_xor_sync(kFullMask, s, d);
    merge_normaliser(m, s, m2, s2);
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    sm[warp] = m;
    sm[kContrastiveWarps + warp] = s;
  }
  nan = __syncthreads_or(nan);
  m = sm[0];
  s = sm[kContrastiveWarps];
  for (int w = 1; w < kContrastiveWarps; ++w) {
    merge_normaliser(m, s, sm[w], sm[kContrastiveWarps + w]);
  }
  const float shift = m == -INFINITY ? 0.f : m;
  return {m, nan ? NAN : shift + logf(s)};
}

template <typename T>
__global__ void __launch_bounds__(kContrastiveThreads) contrastive_kernel(ContrastiveParams p) {
  __shared__ float sm[2][2 * kContrastiveWarps];  // expert, amateur
  const int64_t row = blockIdx.x;
  const T* expert = static_cast<const T*>(p.expert) + row * p.expert_stride;
  const T* amateur = static_cast<const T*>(p.amateur) + row * p.amateur_stride;
  float* out = p.out + row * p.out_stride;
  const RowNormaliser e = row_normaliser(expert, p.vocab_size, sm[0]);
  const RowNormaliser a = row_normaliser(amateur, p.vocab_size, sm[1]);
  const bool bad = !(fabsf(e.lse) < INFINITY && fabsf(a.lse) < INFINITY);  // NaN fails too
  const float alpha = p.alpha[row];
  // log(0) = -inf: every x > -inf. Clamped at 0: fast-math logf(1) may come out above 0, and
  // the expert's argmax is always plausible.
  const float threshold = e.max + fminf(logf(p.plausibility[row]), 0.f);
  for (int v = threadIdx.x; v < p.vocab_size; v += kContrastiveThreads) {
    const float x_e = to_float(expert[v]), x_a = to_float(amateur[v]);
    // alpha 0 must not meet a -inf amateur logit (0 * -inf = NaN).
    const float penalty = alpha > 0.f ? alpha * (x_a - a.lse) : 0.f;
    const float score = x_e >= threshold && x_e > -INFINITY ? (x_e - e.lse) - penalty : -INFINITY;
    out[v] = bad ? NAN : score;
  }
}

}  // namespace detail

// Launches one CTA per row on `stream`; an empty batch launches nothing.
inline cudaError_t contrastive_logits(const ContrastiveParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.vocab_size <= 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.num_rows));
  return DISPATCH_DTYPE(p.dtype, T, [&] {
    return launch(detail::contrastive_kernel<T>, grid, dim3(kContrastiveThreads), stream, p);
  });
}

}  // namespace fastdecode::kernels
