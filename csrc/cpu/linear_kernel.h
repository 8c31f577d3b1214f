// CPU kernel of the weight-streaming linear product y = x @ weight^T (+ bias) for few rows (the
// tokens of a decode step). Torch-free: raw pointers, int64 sizes and strides in elements. The
// torch adapters in linear.cpp check the tensors and fill the params.
//
// Packed weight layout ("panels"): weight [out_features, in_features] cut into panels of
// kLinearPanel output features; panel p is stored as [in_features, kLinearPanel], so
//   packed[p, k, j] = weight[p * kLinearPanel + j, k]   (0 where that row is past out_features).
// One step along k reads one contiguous run of the panel, and the whole packed tensor is one
// sequential stream.
#pragma once

#include <cstdint>

namespace fastdecode::cpu {

// Output features per panel: two SIMD vectors of the widest instruction set the build targets
// (32 floats with AVX-512, 16 with AVX2 and the portable path).
int64_t linear_panel_width();

struct PackedLinearParams {
  float* out;            // [T, out_features], row stride out_stride, last dim contiguous
  const float* x;        // [T, in_features], row stride x_stride, last dim contiguous
  const float* packed;   // [ceil(out_features / panel), in_features, panel], contiguous
  const float* bias;     // [out_features] or nullptr
  int64_t num_tokens;    // T (rows of x and out)
  int64_t in_features;
  int64_t out_features;
  int64_t x_stride, out_stride;
};

// packed (layout above) from weight [out_features, in_features] with row stride weight_stride.
void pack_linear_weight_kernel(float* packed, const float* weight, int64_t out_features,
                               int64_t in_features, int64_t weight_stride);

void packed_linear_kernel(const PackedLinearParams& p);

}  // namespace fastdecode::cpu
