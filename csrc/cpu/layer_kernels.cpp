// Elementwise layers of the native decoder step (see layer_kernels.h).
//
// Rows (tokens) are independent: threads split them only when there are enough elements to pay
// for waking the team (prefill), never inside a row, so every result has one fixed order of
// operations. The arithmetic follows the transformers modules' order (RMSNorm: x * inv, then
// the weight; rotary: both products, then the sum; SiLU: x / (1 + exp(-x)), then the product).
#include "vec.h"  // first: it selects at::vec's instruction set

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "layer_kernels.h"

namespace fastdecode::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Elements below which one thread does every row: a parallel region costs a few us, more than
// a decode step's rows of a small model take.
constexpr int64_t kMinParallelElements = 1 << 16;
// Largest head_dim / 2 the rotary kernel takes (its tables live on the stack).
constexpr int64_t kMaxHalf = kMaxRotaryHeadDim / 2;

// f(row) for every row in [0, rows), on the thread team when rows * row_elements is large.
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& f) {
  if (rows * row_elements < kMinParallelElements) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / (2 * row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

void norm_row(const RmsNormParams& p, int64_t r) {
  const float* x = p.x + r * p.x_stride;
  float* out = p.out + r * p.out_stride;
  const int64_t h = p.hidden, body = h - h % kVec;
  Vec lanes(0.f);
  for (int64_t i = 0; i < body; i += kVec) {
    const Vec v = Vec::loadu(x + i);
    lanes = at::vec::fmadd(v, v, lanes);
  }
  float lane[kVec];
  lanes.store(lane);
  float squares = 0.f;
  for (int64_t i = 0; i < kVec; ++i) squares += lane[i];
  for (int64_t i = body; i < h; ++i) squares += x[i] * x[i];
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + p.eps);
  const Vec vinv(inv);
  for (int64_t i = 0; i < body; i += kVec) {
    (Vec::loadu(p.weight + i) * (Vec::loadu(x + i) * vinv)).store(out + i);
  }
  for (int64_t i = body; i < h; ++i) out[i] = p.weight[i] * (x[i] * inv);
}

// One token's rotary tables: cos / sin of position * inv_freq (times scaling) for the D / 2
// frequencies, with at::vec's cos / sin (those of torch's own CPU kernels). The partial last
// vector goes through the same functions, so every position's tables have one formula.
void rotary_tables(const RotaryParams& p, int64_t t, float* cos, float* sin) {
  const int64_t half = p.head_dim / 2;
  const Vec position(static_cast<float>(p.positions[t])), scaling(p.scaling);
  for (int64_t i = 0; i < half; i += kVec) {
    const int count = static_cast<int>(std::min<int64_t>(kVec, half - i));
    const Vec freq = position * Vec::loadu(p.inv_freq + i, count);
    (freq.cos() * scaling).store(cos + i, count);
    (freq.sin() * scaling).store(sin + i, count);
  }
}

// One head row: the first half pairs with the second. `half` need not be a multiple of the
// vector width (head_dim 80, 96 ...).
void rotate_head(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += kVec) {
    const int count = static_cast<int>(std::min<int64_t>(kVec, half - i));
    const Vec a = Vec::loadu(x + i, count), b = Vec::loadu(x + half + i, count);
    const Vec c = Vec::loadu(cos + i, count), s = Vec::loadu(sin + i, count);
    (a * c + b.neg() * s).store(x + i, count);
    (b * c + a * s).store(x + half + i, count);
  }
}

void silu_mul_row(const SiluMulParams& p, int64_t t) {
  const float* gate = p.gate_up + t * p.in_stride;
  const float* up = gate + p.width;
  float* out = p.out + t * p.out_stride;
  const int64_t body = p.width - p.width % kVec;
  const Vec one(1.f);
  for (int64_t i = 0; i < body; i += kVec) {
    const Vec g = Vec::loadu(gate + i);
    ((g / (one + g.neg().exp())) * Vec::loadu(up + i)).store(out + i);
  }
  for (int64_t i = body; i < p.width; ++i) {
    out[i] = (gate[i] / (1.f + std::exp(-gate[i]))) * up[i];
  }
}

}  // namespace

void rms_norm_kernel(const RmsNormParams& p) {
  for_rows(p.rows, p.hidden, [&](int64_t r) { norm_row(p, r); });
}

void rotary_kernel(const RotaryParams& p) {
  const int64_t half = p.head_dim / 2;
  for_rows(p.tokens, p.heads * p.head_dim, [&](int64_t t) {
    float cos[kMaxHalf], sin[kMaxHalf];
    rotary_tables(p, t, cos, sin);
    for (int64_t h = 0; h < p.heads; ++h) {
      rotate_head(p.x + t * p.x_stride_token + h * p.x_stride_head, cos, sin, half);
    }
  });
}

void silu_mul_kernel(const SiluMulParams& p) {
  for_rows(p.tokens, p.width, [&](int64_t t) { silu_mul_row(p, t); });
}

}  // namespace fastdecode::cpu
