// CPU kernels of the native decoder step's elementwise layers, float32: RMSNorm, rotary
// embedding and SiLU-and-multiply, one pass each. Torch's own versions run as several ops (each
// a pass over the data and a parallel region), which on a decode step's few rows costs more
// than the work. Torch-free: raw pointers, int64 sizes and strides in elements; the torch
// adapters in layers.cpp check the tensors and fill the params.
#pragma once

#include <cstdint>

namespace fastdecode::cpu {

constexpr int64_t kMaxRotaryHeadDim = 512;

// out = weight * (x / sqrt(mean(x^2) + eps)) per row.
struct RmsNormParams {
  float* out;           // [R, H], row stride out_stride, last dim contiguous
  const float* x;       // [R, H], row stride x_stride, last dim contiguous
  const float* weight;  // [H], contiguous
  int64_t rows;         // R
  int64_t hidden;       // H
  int64_t x_stride, out_stride;
  float eps;
};

// In place, per token t and head h: x = x * cos + rotate_half(x) * sin, rotate_half(x) =
// (-x2, x1) for the halves x1, x2, with the tables of position p = positions[t] computed here:
// cos[i] = cos(p * inv_freq[i mod D/2]) * scaling (sin alike), as transformers' rotary modules
// compute them (float32 product, then cos / sin, then the scaling).
struct RotaryParams {
  float* x;                // [T, H, D], strides x_stride_token / x_stride_head, last contiguous
  const int64_t* positions;  // [T]
  const float* inv_freq;   // [D / 2]
  float scaling;
  int64_t tokens, heads, head_dim;
  int64_t x_stride_token, x_stride_head;
};

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i] for i < I.
struct SiluMulParams {
  float* out;            // [T, I], row stride out_stride, last dim contiguous
  const float* gate_up;  // [T, 2I], row stride in_stride, last dim contiguous
  int64_t tokens, width; // T, I
  int64_t in_stride, out_stride;
};

void rms_norm_kernel(const RmsNormParams& p);
void rotary_kernel(const RotaryParams& p);
void silu_mul_kernel(const SiluMulParams& p);

}  // namespace fastdecode::cpu
