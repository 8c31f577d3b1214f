// Torch adapters of the weight-streaming linear kernel (linear_kernel.h): check every tensor
// (errors name the argument), fill the params, run the kernel.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "linear_kernel.h"
#include "ops.h"

namespace fastdecode::cpu {
namespace {

void check_float_cpu(const char* op, const at::Tensor& t, const char* name) {
  FASTDECODE_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  checks::dtype(op, t, name, at::kFloat);
}

}  // namespace

int64_t packed_linear_panel_width() { return linear_panel_width(); }

void pack_linear_weight(at::Tensor& packed, const at::Tensor& weight) {
  constexpr const char* op = "pack_linear_weight";
  check_float_cpu(op, weight, "weight");
  check_float_cpu(op, packed, "packed");
  FASTDECODE_CHECK(weight.dim() == 2, op, "weight must be 2-D [out_features, in_features], got ",
                   weight.sizes());
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t out_features = w.size(0), in_features = w.size(1);
  FASTDECODE_CHECK(in_features >= 1, op, "weight must have in_features >= 1, got ", w.sizes());
  const int64_t panel = linear_panel_width();
  checks::shape(op, packed, "packed", {(out_features + panel - 1) / panel, in_features, panel},
                "[ceil(out_features / panel), in_features, panel]");
  FASTDECODE_CHECK(packed.is_contiguous(), op, "packed must be contiguous");
  pack_linear_weight_kernel(packed.data_ptr<float>(), w.const_data_ptr<float>(), out_features,
                            in_features, w.stride(0));
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias, int64_t out_features) {
  constexpr const char* op = "packed_linear";
  check_float_cpu(op, x, "x");
  check_float_cpu(op, packed, "packed");
  const int64_t panel = linear_panel_width();
  FASTDECODE_CHECK(packed.dim() == 3 && packed.size(1) >= 1 && packed.size(2) == panel &&
                       packed.is_contiguous(),
                   op,
                   "packed must be a contiguous [panels, in_features, ", panel,
                   "] tensor from pack_linear_weight, got ", packed.sizes());
  const int64_t in_features = packed.size(1);
  FASTDECODE_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op,
                   "x must be [..., in_features] with in_features = ", in_features, ", got ",
                   x.sizes());
  FASTDECODE_CHECK(out_features > (packed.size(0) - 1) * panel &&
                       out_features <= packed.size(0) * panel,
                   op, "out_features must be in [", (packed.size(0) - 1) * panel + 1, ", ",
                   packed.size(0) * panel, "] for ", packed.size(0), " panels, got ",
                   out_features);
  if (bias) {
    check_float_cpu(op, *bias, "bias");
    checks::shape(op, *bias, "bias", {out_features}, "[out_features]");
  }
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor rows = x.reshape({-1, in_features});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  at::Tensor out = at::empty({rows.size(0), out_features}, x.options());
  PackedLinearParams p{};
  p.out = out.data_ptr<float>();
  p.x = rows.const_data_ptr<float>();
  p.packed = packed.const_data_ptr<float>();
  p.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
  p.num_tokens = rows.size(0);
  p.in_features = in_features;
  p.out_features = out_features;
  p.x_stride = rows.stride(0);
  p.out_stride = out.stride(0);
  packed_linear_kernel(p);
  return out.view(out_shape);
}

}  // namespace fastdecode::cpu
