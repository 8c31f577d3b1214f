// Torch adapter of the fused sampling kernel: check (csrc/common/checks.h), fill Params, launch
// on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <atomic>

#include "checks.h"
#include "launchers.h"
#include "ops.h"

namespace fastdecode::cuda {

namespace {

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

  // An empty grid is not a valid launch.
  if (num_rows == 0) return at::empty({0}, rows.options().dtype(at::kLong));
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
  check_launch(launch_sample(p, c10::cuda::getCurrentCUDAStream()), "sample");
  return out;
}

}  // namespace fastdecode::cuda
