// Torch adapter of the fused sampling kernel: check, fill Params, launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <atomic>

#include "../kernels/sampling.cuh"
#include "checks.h"
#include "ops.h"

namespace fastdecode::cuda {

namespace {

const at::Tensor& per_row(const at::Tensor& t, const at::Tensor& logits, const char* name,
                          at::ScalarType dtype) {
  check_index(t, logits, name, dtype, 1);
  TORCH_CHECK(t.size(0) == logits.size(0) && t.is_contiguous(), "fastdecode (cuda): ", name,
              " must be a contiguous [", logits.size(0), "] tensor");
  return t;
}

// SMs of `device`, queried once per device (the kernel's CTAs per row depend on it).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};
  int n = device >= 0 && device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
                 "sample (SM count)");
    if (device >= 0 && device < 64) cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& repetition_penalty,
                  const std::optional<at::Tensor>& seen_tokens, const at::Tensor& seeds,
                  const at::Tensor& offsets) {
  check_cuda(logits, logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fastdecode (cuda): logits must be [B, V], got ",
              logits.sizes());
  const at::Tensor rows = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t num_rows = rows.size(0), vocab = rows.size(1);

  kernels::SamplingParams p{};
  p.dtype = kernel_dtype(rows);
  p.logits = rows.data_ptr();
  p.temperature = per_row(temperature, rows, "temperature", at::kFloat).data_ptr<float>();
  p.top_k = per_row(top_k, rows, "top_k", at::kInt).data_ptr<int32_t>();
  p.top_p = per_row(top_p, rows, "top_p", at::kFloat).data_ptr<float>();
  p.min_p = per_row(min_p, rows, "min_p", at::kFloat).data_ptr<float>();
  p.repetition_penalty =
      per_row(repetition_penalty, rows, "repetition_penalty", at::kFloat).data_ptr<float>();
  p.seeds = per_row(seeds, rows, "seeds", at::kLong).data_ptr<int64_t>();
  p.offsets = per_row(offsets, rows, "offsets", at::kLong).data_ptr<int64_t>();
  if (seen_tokens.has_value() && seen_tokens->numel() > 0) {
    check_index(*seen_tokens, rows, "seen_tokens", at::kLong, 2);
    TORCH_CHECK(seen_tokens->size(0) == num_rows && seen_tokens->stride(1) == 1,
                "fastdecode (cuda): seen_tokens must be [", num_rows, ", L] with contiguous rows");
    p.seen_tokens = seen_tokens->data_ptr<int64_t>();
    p.seen_stride = seen_tokens->stride(0);
    p.num_seen = static_cast<int>(seen_tokens->size(1));
  }
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 24),
              "fastdecode (cuda): sample supports 0 < V < 2^24, got V = ", vocab);
  p.logits_stride = rows.stride(0);
  p.scores_stride = kernels::sampling_scores_stride(vocab);
  p.num_rows = static_cast<int>(num_rows);
  p.vocab_size = static_cast<int>(vocab);

  const c10::cuda::CUDAGuard guard(rows.device());
  p.num_splits = kernels::sampling_num_splits(num_rows, vocab, sm_count(rows.get_device()));

  // Workspace through torch's caching allocator (no sync, CUDA-graph capturable); the tickets
  // must start at zero (the kernel leaves them at zero).
  at::Tensor out = at::empty({num_rows}, rows.options().dtype(at::kLong));
  at::Tensor floats = at::empty(
      {kernels::sampling_float_workspace(num_rows, vocab, p.num_splits)},
      rows.options().dtype(at::kFloat));
  at::Tensor ints = at::empty({kernels::sampling_int_workspace(num_rows, p.num_splits)},
                              rows.options().dtype(at::kInt));
  at::Tensor tickets = at::zeros({num_rows}, rows.options().dtype(at::kInt));
  p.out = out.data_ptr<int64_t>();
  kernels::bind_sampling_workspace(p, floats.data_ptr<float>(), ints.data_ptr<int32_t>());
  p.tickets = reinterpret_cast<uint32_t*>(tickets.data_ptr<int32_t>());
  check_launch(kernels::sample(p, c10::cuda::getCurrentCUDAStream()), "sample");
  return out;
}

}  // namespace fastdecode::cuda
