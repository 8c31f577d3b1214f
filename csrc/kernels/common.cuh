// Device helpers shared by the CUDA kernels: the dtype tag the adapters pass in, conversions to
// float32, 16-byte vector loads and warp reductions. CUDA only (no torch), so nvcc alone builds it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdecode::kernels {

// Floating dtype of a call's tensors; the adapters map torch dtypes onto it.
enum class DType : int { kFloat32, kFloat16, kBFloat16 };

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

// Unpacks a 16-byte vector of T into kVecElems<T> floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) out[i] = to_float(elems[i]);
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
