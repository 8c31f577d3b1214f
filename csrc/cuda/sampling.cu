// Torch adapter of the fused sampling kernel: check (csrc/common/checks.h), fill Params, launch
// on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../kernels/sampling.cuh"
#include "checks.h"
#include "ops.h"

namespace fastdecode::cuda {

at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& repetition_penalty,
                  const std::optional<at::Tensor>& seen_tokens, const at::Tensor& seeds,
                  const at::Tensor& offsets) {
  constexpr const char* op = "sample";
  check_cuda(op, logits, "logits");
  checks::logits(op, logits);
  const at::Tensor rows = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t num_rows = rows.size(0), vocab = rows.size(1);
  FASTDECODE_CHECK(vocab < (int64_t{1} << 24), op, "the CUDA kernel supports vocab_size < 2^24, "
                   "got ", vocab);

  kernels::SamplingParams p{};
  p.dtype = kernel_dtype(rows);
  p.logits = rows.data_ptr();
  const auto row_ptr = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    checks::per_row(op, t, name, dtype, rows);
    return t.data_ptr();
  };
  p.temperature = static_cast<float*>(row_ptr(temperature, "temperature", at::kFloat));
  p.top_k = static_cast<int32_t*>(row_ptr(top_k, "top_k", at::kInt));
  p.top_p = static_cast<float*>(row_ptr(top_p, "top_p", at::kFloat));
  p.min_p = static_cast<float*>(row_ptr(min_p, "min_p", at::kFloat));
  p.repetition_penalty =
      static_cast<float*>(row_ptr(repetition_penalty, "repetition_penalty", at::kFloat));
  p.seeds = static_cast<int64_t*>(row_ptr(seeds, "seeds", at::kLong));
  p.offsets = static_cast<int64_t*>(row_ptr(offsets, "offsets", at::kLong));
  if (checks::seen_tokens(op, seen_tokens, rows)) {
    p.seen_tokens = seen_tokens->data_ptr<int64_t>();
    p.seen_stride = seen_tokens->stride(0);
    p.num_seen = static_cast<int>(seen_tokens->size(1));
  }
  p.logits_stride = rows.stride(0);
  p.scores_stride = kernels::sampling_scores_stride(vocab);
  p.num_rows = static_cast<int>(num_rows);
  p.vocab_size = static_cast<int>(vocab);

  at::Tensor out = at::empty({num_rows}, rows.options().dtype(at::kLong));
  at::Tensor scores = at::empty({num_rows, p.scores_stride}, rows.options().dtype(at::kFloat));
  if (num_rows == 0) return out;  // an empty grid is not a valid launch
  p.out = out.data_ptr<int64_t>();
  p.scores = scores.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(rows.device());
  check_launch(kernels::sample(p, c10::cuda::getCurrentCUDAStream()), "sample");
  return out;
}

}  // namespace fastdecode::cuda
