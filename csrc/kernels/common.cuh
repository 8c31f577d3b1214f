// Device helpers shared by the CUDA kernels: the dtype tag the adapters pass in, conversions to
// float32, 16-byte vector loads and warp reductions. CUDA only (no torch), so nvcc alone builds it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "params.h"

namespace fastdecode::kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector (the widest single load instruction).
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// Unpacks a 16-byte vector of T into kVecElems<T> floats. `raw` is taken by value: the caller
// loads it with one 128-bit instruction (LDS.128 from shared memory) and the conversions below
// work on registers; element-wise reads through a T* into shared memory would compile to one
// 16-bit load per element.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4 raw, float* out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 4) {
      out[w] = __uint_as_float(words[w]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of a float
      out[2 * w] = __uint_as_float(words[w] << 16);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    } else {
      out[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w])));
      out[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] >> 16)));
    }
  }
}

// Packs kVecElems<T> floats into a 16-byte vector of T.
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) elems[i] = from_float<T>(in[i]);
  return raw;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, d));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) x += __shfl_xor_sync(kFullMask, x, d);
  return x;
}

__device__ __forceinline__ uint64_t warp_sum(uint64_t x) {
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) x += __shfl_xor_sync(kFullMask, x, d);
  return x;
}

// tanh with float32 accuracy (relative error below 2^-21) also under --use_fast_math, which
// compiles tanhf to the MUFU.TANH approximation (relative error up to 2^-11: too coarse for
// softcapped logits of large magnitude). |x| < 0.625: odd polynomial of degree 11 (Cephes
// coefficients); above, 1 - 2 / (e^2|x| + 1), whose expf (MUFU.EX2 under fast math, relative
// error ~2^-22 plus 2^-24 per unit of 2|x| log2 e) enters with weight 2 / (e^2|x| + 1) < 0.45,
// and an IEEE division. tools/sass_check.py asserts that no MUFU.TANH is emitted.
__device__ __forceinline__ float accurate_tanh(float x) {
  const float a = fabsf(x);
  if (a < 0.625f) {
    const float z = x * x;
    float poly = -5.70498872745e-3f;
    poly = fmaf(poly, z, 2.06390887954e-2f);
    poly = fmaf(poly, z, -5.37397155531e-2f);
    poly = fmaf(poly, z, 1.33314422036e-1f);
    poly = fmaf(poly, z, -3.33332819422e-1f);
    return fmaf(poly * z, x, x);
  }
  const float t = 1.f - __fdiv_rn(2.f, expf(2.f * a) + 1.f);  // NaN stays NaN
  return copysignf(t, x);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The one kernel-launch site of the launchers. tests/cuda_emu (a CPU model of the CUDA execution
// model that runs these kernels in CI, where there is no GPU) defines FASTDECODE_CUDA_EMULATOR
// and provides its own `launch`.
#ifndef FASTDECODE_CUDA_EMULATOR
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}
#endif

}  // namespace fastdecode::kernels
