// Torch adapter of the CPU contrastive-decoding kernel: checks, the expert x amateur dtype
// dispatch, rows in parallel (at::parallel_for).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/checks.h"
#include "contrastive_kernel.h"
#include "ops.h"

namespace fastdecode::cpu {
namespace {

constexpr const char* kOp = "contrastive_logits";

template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(c10::Half{});
  }
}

}  // namespace

at::Tensor contrastive_logits(const at::Tensor& expert_logits, const at::Tensor& amateur_logits,
                              const at::Tensor& alpha, const at::Tensor& plausibility) {
  FASTDECODE_CHECK(expert_logits.device().is_cpu(), kOp, "expert_logits must be a CPU tensor, "
                   "got ", expert_logits.device());
  checks::contrastive_logits(expert_logits, amateur_logits, alpha, plausibility);
  const auto unit_stride = [](const at::Tensor& t) {
    return t.stride(1) == 1 ? t : t.contiguous();
  };
  const at::Tensor expert = unit_stride(expert_logits), amateur = unit_stride(amateur_logits);
  const int64_t batch = expert.size(0), vocab = expert.size(1);
  const float* alphas = alpha.const_data_ptr<float>();
  const float* plaus = plausibility.const_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {  // the ranges of fastdecode/ops/_rules.py
    FASTDECODE_CHECK(alphas[b] >= 0.f && alphas[b] <= 1e6f, kOp, "alpha must be in [0, 1e6], "
                     "got ", alphas[b], " at row ", b);
    FASTDECODE_CHECK(plaus[b] >= 0.f && plaus[b] <= 1.f, kOp, "plausibility must be in [0, 1], "
                     "got ", plaus[b], " at row ", b);
  }
  at::Tensor out = at::empty({batch, vocab}, expert.options().dtype(at::kFloat));
  float* out_base = out.data_ptr<float>();
  dispatch_float(expert.scalar_type(), [&](auto e_tag) {
    using TE = decltype(e_tag);
    dispatch_float(amateur.scalar_type(), [&](auto a_tag) {
      using TA = decltype(a_tag);
      const TE* e_base = expert.const_data_ptr<TE>();
      const TA* a_base = amateur.const_data_ptr<TA>();
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          contrastive::scores_row(e_base + b * expert.stride(0), a_base + b * amateur.stride(0),
                                  vocab, alphas[b], plaus[b], out_base + b * vocab);
        }
      });
    });
  });
  return out;
}

}  // namespace fastdecode::cpu
