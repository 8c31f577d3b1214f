// nvcc translation unit of append_kv and paged decode attention: every instantiation their
// dispatch reaches, behind the plain launchers of launchers.h.
#include "../kernels/append_kv.cuh"
#include "../kernels/paged_attention.cuh"
#include "launchers.h"

namespace fastdecode::cuda {

cudaError_t launch_append_kv(const kernels::AppendKVParams& p, cudaStream_t stream) {
  return kernels::append_kv(p, stream);
}

cudaError_t launch_paged_decode(const kernels::PagedDecodeParams& p, cudaStream_t stream) {
  return kernels::paged_decode_attention(p, stream);
}

}  // namespace fastdecode::cuda
