// CUDA implementations of the op schemas defined in csrc/bindings.cpp. Only the ops the CUDA
// backend covers are registered; process_logits, apply_repetition_penalty and the packed
// (prefill) form of paged_attention run on Triton for CUDA tensors.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastdecode, CUDA, m) {
  m.impl("append_kv", &fastdecode::cuda::append_kv);
  m.impl("paged_attention", &fastdecode::cuda::paged_attention);
  m.impl("sample", &fastdecode::cuda::sample);
  m.impl("contrastive_logits", &fastdecode::cuda::contrastive_logits);
}
