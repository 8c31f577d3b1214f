// nvcc translation unit of the fused sampling kernel, behind the plain launcher of launchers.h.
#include "../kernels/sampling.cuh"
#include "launchers.h"

namespace fastdecode::cuda {

cudaError_t launch_sample(const kernels::SamplingParams& p, cudaStream_t stream) {
  return kernels::sample(p, stream);
}

}  // namespace fastdecode::cuda
