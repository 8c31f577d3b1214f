// Compile check for the CUDA kernel headers with nvcc alone (no torch): calling each public
// launcher emits every template instantiation its dispatch switch can reach (each dtype x
// head_dim for attention, each dtype for sampling, each copy width for append_kv).
// tools/compile_check.py builds this file for every target architecture with warnings as errors
// and checks the resulting kernels.
#include "../kernels/append_kv.cuh"
#include "../kernels/contrastive.cuh"
#include "../kernels/paged_attention.cuh"
#include "../kernels/sampling.cuh"

namespace fk = fastdecode::kernels;

cudaError_t compile_check_append_kv(const fk::AppendKVParams& p, cudaStream_t s) {
  return fk::append_kv(p, s);
}

cudaError_t compile_check_paged_decode(const fk::PagedDecodeParams& p, cudaStream_t s) {
  return fk::paged_decode_attention(p, s);
}

cudaError_t compile_check_contrastive(const fk::ContrastiveParams& p, cudaStream_t s) {
  return fk::contrastive_logits(p, s);
}

cudaError_t compile_check_sample(const fk::SamplingParams& p, cudaStream_t s) {
  return fk::sample(p, s);
}
