// Argument checks and dtype mapping shared by the CUDA torch adapters.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/common.cuh"

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
      TORCH_CHECK(false, "fastdecode (cuda): unsupported dtype ", t.scalar_type(),
                  " (float32, float16 or bfloat16)");
  }
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fastdecode (cuda): ", name,
              " must be on ", like.device(), ", got ", t.device());
}

inline void check_index(const at::Tensor& t, const at::Tensor& like, const char* name,
                        at::ScalarType dtype, int64_t dim) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == dim, "fastdecode (cuda): ", name,
              " must be a ", dim, "-D ", dtype, " tensor, got ", t.scalar_type(), " ", t.sizes());
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastdecode (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

}  // namespace fastdecode::cuda
