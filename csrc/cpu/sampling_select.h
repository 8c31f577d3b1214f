// Selection primitives of the CPU sampling kernels (internal to sampling_*.cpp): the streaming
// top-k candidate buffer, the top-p threshold search and the inverse-CDF draw. All work on float
// values already penalised and divided by the temperature; none sorts the vocabulary.
#pragma once

#include <cstdint>
#include <limits>

#include "sampling_kernel.h"

namespace fastdecode::cpu::sampling {

// Lowest finite float: the "keep every finite value" threshold. -inf values are never candidates.
constexpr float kLowest = std::numeric_limits<float>::lowest();

// Streaming top-k: values >= a running threshold go to a buffer (ws.cand_vals / ws.cand_ids, in
// vocabulary order); when it fills, nth_element on a copy of its values raises the threshold to
// the k-th largest seen so far and the buffer is filtered in place (order kept). Ties with the
// k-th value are all kept, so the buffer grows when ties fill it.
class TopKCollector {
 public:
  TopKCollector(int32_t k, Workspace& ws);
  // x: [n] processed values of tokens [begin, begin + n); chunk_max: their maximum.
  void add(const float* x, int64_t begin, int64_t n, float chunk_max);
  // Leaves exactly the kept tokens in the buffer and returns the threshold (the k-th largest
  // value, or kLowest when fewer than k finite values exist).
  float finish();
  int64_t size() const { return static_cast<int64_t>(vals_.size()); }

 private:
  float kth_largest();
  void keep_at_least(float threshold);

  int64_t k_;
  size_t capacity_;
  float threshold_ = kLowest;
  std::vector<float>& vals_;
  std::vector<int32_t>& ids_;
  std::vector<float>& tmp_;
};

// Threshold t such that {x >= t} among vals [n] is the set HF's top-p and min-p keep (max: the
// row maximum, finite): top-p keeps x iff the tokens strictly above x hold < top_p of the mass
// (always the maximum; ties kept), min-p keeps x >= max + log(min_p). kLowest when both are off.
float top_p_min_p_threshold(const float* vals, int64_t n, float max, float top_p, float min_p,
                            Workspace& ws);

// Inverse-CDF draw: weights exp(x - max) for x >= threshold (0 elsewhere, written over vals),
// returns ids[i] (or i when ids is null) for the first i whose running sum exceeds u * total.
// Rounding can never return a token outside the kept set: the fallback is the last kept token.
int64_t draw(float* vals, const int32_t* ids, int64_t n, float max, float threshold, float u,
             Workspace& ws);

}  // namespace fastdecode::cpu::sampling
