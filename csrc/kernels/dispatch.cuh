// Compile-time dispatch on the runtime dtype and head_dim: the only place that lists which
// instantiations exist (DISPATCH_HEAD_DIM's cases are FASTDECODE_CUDA_HEAD_DIMS of params.h). Each macro expands to a switch whose cases run the lambda-like body with
// a type alias / constexpr bound; an unlisted value makes the enclosing launcher return
// cudaErrorInvalidValue (the torch adapters check first and raise a readable error).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"

// DISPATCH_DTYPE(dtype, T, ...): runs `...` with `using T = float | __half | __nv_bfloat16`.
#define DISPATCH_DTYPE(dtype, T, ...)                                          \
  [&]() -> cudaError_t {                                                       \
    switch (dtype) {                                                           \
      case ::fastdecode::kernels::DType::kFloat32: {                           \
        using T = float;                                                       \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case ::fastdecode::kernels::DType::kFloat16: {                           \
        using T = __half;                                                      \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case ::fastdecode::kernels::DType::kBFloat16: {                          \
        using T = __nv_bfloat16;                                               \
        return __VA_ARGS__();                                                  \
      }                                                                        \
    }                                                                          \
    return cudaErrorInvalidValue;                                              \
  }()

// DISPATCH_HEAD_DIM(head_dim, D, ...): runs `...` with `constexpr int D = head_dim` for each
// value of FASTDECODE_CUDA_HEAD_DIMS.
#define FASTDECODE_HEAD_DIM_CASE(value, D, ...) \
  case value: {                                 \
    constexpr int D = value;                    \
    return __VA_ARGS__();                       \
  }
#define DISPATCH_HEAD_DIM(head_dim, D, ...)               \
  [&]() -> cudaError_t {                                  \
    switch (head_dim) {                                   \
      FASTDECODE_HEAD_DIM_CASE(64, D, __VA_ARGS__)        \
      FASTDECODE_HEAD_DIM_CASE(80, D, __VA_ARGS__)        \
      FASTDECODE_HEAD_DIM_CASE(96, D, __VA_ARGS__)        \
      FASTDECODE_HEAD_DIM_CASE(128, D, __VA_ARGS__)       \
      FASTDECODE_HEAD_DIM_CASE(256, D, __VA_ARGS__)       \
      default:                                            \
        return cudaErrorInvalidValue;                     \
    }                                                     \
  }()
