// Torch adapter of the CUDA contrastive-decoding kernel: check (csrc/common/checks.h; values are
// not read: no host sync), one dtype for both rows, fill Params, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "checks.h"
#include "launchers.h"
#include "ops.h"

namespace fastdecode::cuda {

at::Tensor contrastive_logits(const at::Tensor& expert_logits, const at::Tensor& amateur_logits,
                              const at::Tensor& alpha, const at::Tensor& plausibility) {
  constexpr const char* op = "contrastive_logits";
  check_cuda(op, expert_logits, "expert_logits");
  checks::contrastive_logits(expert_logits, amateur_logits, alpha, plausibility);
  // The kernel reads both rows in one dtype: mixed calls (rare) read float32 copies.
  const bool mixed = expert_logits.scalar_type() != amateur_logits.scalar_type();
  const auto rows = [&](const at::Tensor& t) {
    const at::Tensor u = mixed ? t.to(at::kFloat) : t;
    return u.stride(1) == 1 ? u : u.contiguous();
  };
  const at::Tensor expert = rows(expert_logits), amateur = rows(amateur_logits);
  const int64_t batch = expert.size(0), vocab = expert.size(1);
  at::Tensor out = at::empty({batch, vocab}, expert.options().dtype(at::kFloat));
  if (batch == 0) return out;  // an empty grid is not a valid launch
  FASTDECODE_CHECK(batch <= std::numeric_limits<int>::max() / 2, op, "num_seqs must be < 2^30, "
                   "got ", batch);
  const c10::cuda::CUDAGuard guard(expert.device());
  kernels::ContrastiveParams p{};
  p.expert = expert.data_ptr();
  p.amateur = amateur.data_ptr();
  p.alpha = alpha.data_ptr<float>();
  p.plausibility = plausibility.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.expert_stride = expert.stride(0);
  p.amateur_stride = amateur.stride(0);
  p.out_stride = out.stride(0);
  p.num_rows = static_cast<int>(batch);
  p.vocab_size = static_cast<int>(vocab);
  p.dtype = kernel_dtype(expert);
  check_launch(launch_contrastive_logits(p, c10::cuda::getCurrentCUDAStream()),
               "contrastive_logits");
  return out;
}

}  // namespace fastdecode::cuda
