// nvcc translation unit of the contrastive-decoding kernel, behind the plain launcher of
// launchers.h.
#include "../kernels/contrastive.cuh"
#include "launchers.h"

namespace fastdecode::cuda {

cudaError_t launch_contrastive_logits(const kernels::ContrastiveParams& p, cudaStream_t stream) {
  return kernels::contrastive_logits(p, stream);
}

}  // namespace fastdecode::cuda
