// The launchers of the CUDA kernels: the one interface between the kernels (csrc/kernels/*.cuh,
// compiled by nvcc in csrc/cuda/*_kernels.cu) and the torch adapters (csrc/cuda/*.cpp, compiled by
// the host compiler like the CPU adapters). Only Params structs and a stream cross it, so no
// torch / ATen / c10 header is ever compiled by nvcc. Each returns the launch's status; an
// argument the kernels do not support returns cudaErrorInvalidValue (the adapters check first).
#pragma once

#include <cuda_runtime_api.h>

#include "../kernels/params.h"

namespace fastdecode::cuda {

cudaError_t launch_append_kv(const kernels::AppendKVParams& p, cudaStream_t stream);

// The caller provides the workspace when paged_decode_workspace_floats(...) > 0.
cudaError_t launch_paged_decode(const kernels::PagedDecodeParams& p, cudaStream_t stream);

// The caller binds the workspace (bind_sampling_workspace) and zeroes the tickets.
cudaError_t launch_sample(const kernels::SamplingParams& p, cudaStream_t stream);

cudaError_t launch_contrastive_logits(const kernels::ContrastiveParams& p, cudaStream_t stream);

}  // namespace fastdecode::cuda
