// Placeholder until the CPU attention kernels land (replaced, not kept).
#include "ops.h"
namespace fastdecode::cpu {
void append_kv(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "fastdecode: CPU append_kv not built yet");
}
void paged_attention(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     double, bool, double, int64_t, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fastdecode: CPU paged_attention not built yet");
}
}  // namespace fastdecode::cpu
