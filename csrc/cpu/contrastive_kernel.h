// Contrastive-decoding scores of one row (no torch): log p_e - alpha * log p_a where the
// expert's logit clears max + log(plausibility) (and is > -inf), -inf elsewhere, NaN for the
// whole row when either model's log-normaliser is not finite (a NaN or +inf logit, or nothing
// finite). The formula and its sources: fastdecode/ops/contrastive.py.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastdecode::cpu::contrastive {

struct Normaliser {
  float max;  // the row's largest logit (meaningless when lse is not finite)
  float lse;  // log sum exp of the row, float32
};

template <typename T>
Normaliser normaliser(const T* row, int64_t vocab) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float top = kNegInf;
  bool nan = false;
  for (int64_t v = 0; v < vocab; ++v) {
    const float x = static_cast<float>(row[v]);
    nan |= x != x;
    top = std::max(top, x);
  }
  // Shift by 0 when nothing is finite, so that -inf - -inf never occurs (the sum is then 0).
  const float shift = top == kNegInf ? 0.f : top;
  // A float64 sum: a float32 running sum over a 50k-token vocabulary drifts by ~1e-5.
  double sum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<float>(row[v]) - shift);
  const float lse = shift + static_cast<float>(std::log(sum));
  return {top, nan ? std::numeric_limits<float>::quiet_NaN() : lse};
}

// out: [vocab] float32.
template <typename TE, typename TA>
void scores_row(const TE* expert, const TA* amateur, int64_t vocab, float alpha,
                float plausibility, float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const Normaliser e = normaliser(expert, vocab), a = normaliser(amateur, vocab);
  if (!std::isfinite(e.lse) || !std::isfinite(a.lse)) {
    std::fill(out, out + vocab, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float threshold = e.max + std::log(plausibility);  // log(0) = -inf: every x > -inf
  for (int64_t v = 0; v < vocab; ++v) {
    const float x_e = static_cast<float>(expert[v]), x_a = static_cast<float>(amateur[v]);
    // alpha 0 must not meet a -inf amateur logit (0 * -inf = NaN).
    const float penalty = alpha > 0.f ? alpha * (x_a - a.lse) : 0.f;
    out[v] = x_e >= threshold && x_e > kNegInf ? (x_e - e.lse) - penalty : kNegInf;
  }
}

}  // namespace fastdecode::cpu::contrastive
