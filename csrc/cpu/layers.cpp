// Torch adapters of the native decoder step's elementwise layers (layer_kernels.h): check every
// tensor (errors name the argument), fill the params, run the kernel.
#include <ATen/ATen.h>

#include <cmath>

#include "../common/checks.h"
#include "layer_kernels.h"
#include "ops.h"

namespace fastdecode::cpu {
namespace {

void check_float_cpu(const char* op, const at::Tensor& t, const char* name) {
  FASTDECODE_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  checks::dtype(op, t, name, at::kFloat);
}

// [..., W] as [R, W] rows with a unit last stride (a view where the strides allow).
at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor rows = t.reshape({-1, t.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  check_float_cpu(op, x, "x");
  check_float_cpu(op, weight, "weight");
  FASTDECODE_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, "x must be [..., H] with H >= 1, got ",
                   x.sizes());
  const int64_t hidden = x.size(-1);
  checks::shape(op, weight, "weight", {hidden}, "[H]");
  FASTDECODE_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be finite and >= 0, got ", eps);
  const at::Tensor rows = as_rows(x), w = weight.contiguous();
  at::Tensor out = at::empty({rows.size(0), hidden}, x.options());
  RmsNormParams p{};
  p.out = out.data_ptr<float>();
  p.x = rows.const_data_ptr<float>();
  p.weight = w.const_data_ptr<float>();
  p.rows = rows.size(0);
  p.hidden = hidden;
  p.x_stride = rows.stride(0);
  p.out_stride = out.stride(0);
  p.eps = static_cast<float>(eps);
  rms_norm_kernel(p);
  return out.view(x.sizes());
}

void rotary_embedding(at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                      double scaling) {
  constexpr const char* op = "rotary_embedding";
  check_float_cpu(op, x, "x");
  check_float_cpu(op, inv_freq, "inv_freq");
  FASTDECODE_CHECK(positions.device().is_cpu(), op, "positions must be a CPU tensor, got ",
                   positions.device());
  checks::dtype(op, positions, "positions", at::kLong);
  FASTDECODE_CHECK(x.dim() == 3 && x.stride(2) == 1, op,
                   "x must be [T, H, D] with a unit last stride, got sizes ", x.sizes(),
                   " strides ", x.strides());
  const int64_t tokens = x.size(0), head_dim = x.size(2);
  FASTDECODE_CHECK(head_dim % 2 == 0 && head_dim <= kMaxRotaryHeadDim, op,
                   "x's head_dim must be even and at most ", kMaxRotaryHeadDim, ", got ",
                   head_dim);
  checks::shape(op, positions, "positions", {tokens}, "[T]");
  checks::shape(op, inv_freq, "inv_freq", {head_dim / 2}, "[D / 2]");
  FASTDECODE_CHECK(std::isfinite(scaling), op, "scaling must be finite, got ", scaling);
  const at::Tensor pos = positions.contiguous(), freq = inv_freq.contiguous();
  RotaryParams p{};
  p.x = x.data_ptr<float>();
  p.positions = pos.const_data_ptr<int64_t>();
  p.inv_freq = freq.const_data_ptr<float>();
  p.scaling = static_cast<float>(scaling);
  p.tokens = tokens;
  p.heads = x.size(1);
  p.head_dim = head_dim;
  p.x_stride_token = x.stride(0);
  p.x_stride_head = x.stride(1);
  rotary_kernel(p);
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  constexpr const char* op = "silu_and_mul";
  check_float_cpu(op, gate_up, "gate_up");
  FASTDECODE_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
                   "gate_up must be [..., 2I], got ", gate_up.sizes());
  const at::Tensor rows = as_rows(gate_up);
  const int64_t width = gate_up.size(-1) / 2;
  at::Tensor out = at::empty({rows.size(0), width}, gate_up.options());
  SiluMulParams p{};
  p.out = out.data_ptr<float>();
  p.gate_up = rows.const_data_ptr<float>();
  p.tokens = rows.size(0);
  p.width = width;
  p.in_stride = rows.stride(0);
  p.out_stride = out.stride(0);
  silu_mul_kernel(p);
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = width;
  return out.view(shape);
}

}  // namespace fastdecode::cpu
