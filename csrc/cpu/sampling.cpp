// Placeholder until the CPU sampling kernels land (replaced, not kept).
#include "ops.h"
namespace fastdecode::cpu {
at::Tensor apply_repetition_penalty(const at::Tensor&, const std::optional<at::Tensor>&,
                                    const at::Tensor&) {
  TORCH_CHECK(false, "fastdecode: CPU sampling not built yet");
}
at::Tensor process_logits(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fastdecode: CPU sampling not built yet");
}
at::Tensor sample(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                  const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "fastdecode: CPU sampling not built yet");
}
}  // namespace fastdecode::cpu
