// CUDA-only adapter helpers: dtype mapping, alignment, launch errors. The argument checks
// shared with the CPU adapters are csrc/common/checks.h.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/checks.h"
#include "../kernels/params.h"

namespace fastdecode::cuda {

inline kernels::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::DType::kFloat32;
    case at::kHalf:
      return kernels::DType::kFloat16;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    default:
      TORCH_CHECK(false, message::text("fastdecode (cuda): unsupported dtype ",
                                       t.scalar_type(), " (float32, float16 or bfloat16)"));
  }
}

// The tensor that anchors a call's device is a CUDA tensor (the shared checks then hold every
// other tensor to its device).
inline void check_cuda(const char* op, const at::Tensor& anchor, const char* name) {
  FASTDECODE_CHECK(anchor.is_cuda(), op, name, " must be a CUDA tensor, got ", anchor.device());
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, message::text("fastdecode (cuda): ", what, " failed: ",
                                               cudaGetErrorString(err)));
}

}  // namespace fastdecode::cuda
