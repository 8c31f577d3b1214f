#include "vec.h"  // first: it selects at::vec's instruction set

#include "sampling_select.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace fastdecode::cpu::sampling {
namespace {

using Vec = at::vec::Vectorized<float>;

// Candidate sets up to this size are sorted for the top-p search; larger ones go through the
// mass histogram (only reached with top-k off or very large k).
constexpr int64_t kSortLimit = 4096;
// Histogram buckets over [max - kRange, max]: exp(-88) is about the smallest normal float, so
// tokens further below carry no weight and share the last bucket.
constexpr int kBuckets = 4096;
constexpr float kRange = 88.0f;
// Tokens per partial sum of the draw.
constexpr int64_t kDrawChunk = 1024;
// Top-p drops a token when the mass strictly above it reaches top_p of the total; an exact tie
// (HF drops it: its ascending cumulative sum is <= 1 - top_p) is decided up to this fraction of
// the total, so float rounding of the mass sums cannot keep it. Every backend uses this rule.
constexpr double kTopPTolerance = 1e-6;

// The mass above which top-p drops a token; at least the max's own group is always kept.
inline double top_p_limit(float top_p, double total) {
  return (static_cast<double>(top_p) - kTopPTolerance) * total;
}

inline float weight(float x, float max) { return std::exp(x - max); }

// Smallest kept value of top-p, walking distinct values of sorted [n] (descending) with `above`
// mass already above them: a value is kept while the mass strictly above it is < limit.
float walk_groups(const float* sorted, int64_t n, float max, double limit, double above) {
  float kept = sorted[0];
  for (int64_t i = 0; i < n && above < limit;) {
    kept = sorted[i];
    for (; i < n && sorted[i] == kept; ++i) above += weight(sorted[i], max);
  }
  return kept;
}

float top_p_by_sort(const float* vals, int64_t n, float max, float top_p, Workspace& ws) {
  ws.tmp.assign(vals, vals + n);
  std::sort(ws.tmp.begin(), ws.tmp.end(), std::greater<float>());
  double total = 0.0;
  for (float x : ws.tmp) total += weight(x, max);
  return walk_groups(ws.tmp.data(), n, max, top_p_limit(top_p, total), 0.0);
}

// Bucket index (as a float) of each value: (max - x) scaled, clamped; monotone in x, so equal
// values share a bucket and every bucket holds one value range. Both histogram passes call this,
// so a value lands in the same bucket each time.
inline void bucket_of(const float* x, int64_t n, float max, float* out) {
  const Vec vmax(max), scale(kBuckets / kRange), last(kBuckets - 1);
  at::vec::map([&](Vec v) { return at::vec::minimum((vmax - v) * scale, last); }, out, x, n);
}

// Top-p on a large set: one pass builds the mass histogram by value bucket, which locates the
// bucket holding the boundary; only that bucket's values are sorted.
float top_p_by_histogram(const float* vals, int64_t n, float max, float top_p, Workspace& ws) {
  ws.hist.assign(kBuckets, 0.0);
  float bucket[kDrawChunk], w[kDrawChunk];
  const Vec vmax(max);
  for (int64_t begin = 0; begin < n; begin += kDrawChunk) {
    const int64_t len = std::min(kDrawChunk, n - begin);
    bucket_of(vals + begin, len, max, bucket);
    at::vec::map([&](Vec v) { return (v - vmax).exp(); }, w, vals + begin, len);
    for (int64_t i = 0; i < len; ++i) ws.hist[static_cast<int>(bucket[i])] += w[i];
  }
  double total = 0.0;
  for (double h : ws.hist) total += h;
  const double limit = top_p_limit(top_p, total);
  int boundary = 0;
  double above = 0.0;
  for (; boundary < kBuckets && above + ws.hist[boundary] < limit; ++boundary) {
    above += ws.hist[boundary];
  }
  if (boundary == kBuckets) return kLowest;  // rounding: top_p reached nowhere, keep all
  ws.tmp.clear();
  for (int64_t begin = 0; begin < n; begin += kDrawChunk) {
    const int64_t len = std::min(kDrawChunk, n - begin);
    bucket_of(vals + begin, len, max, bucket);
    for (int64_t i = 0; i < len; ++i) {
      if (static_cast<int>(bucket[i]) == boundary) ws.tmp.push_back(vals[begin + i]);
    }
  }
  std::sort(ws.tmp.begin(), ws.tmp.end(), std::greater<float>());
  return walk_groups(ws.tmp.data(), static_cast<int64_t>(ws.tmp.size()), max, limit, above);
}

}  // namespace

TopKCollector::TopKCollector(int32_t k, Workspace& ws)
    : k_(k),
      // Each compaction costs O(capacity) and raises the threshold to the k-th largest seen so
      // far; about 4k balances the compactions against the tokens the stale threshold admits.
      capacity_(std::max<size_t>(4 * static_cast<size_t>(k), 64)),
      vals_(ws.cand_vals),
      ids_(ws.cand_ids),
      tmp_(ws.tmp) {
  vals_.clear();
  ids_.clear();
}

float TopKCollector::add(const float* x, int64_t begin, int64_t n) {
  // One sweep computes the chunk maximum and screens groups of kGroup vectors with a single
  // compare of their maximum against the threshold: once the threshold has settled, candidates
  // are rare and almost every group is skipped.
  constexpr int64_t kGroup = 4;
  constexpr int64_t kSpan = kGroup * Vec::size();
  const auto max_op = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kSpan <= n; i += kSpan) {
    const Vec g = max_op(max_op(Vec::loadu(x + i), Vec::loadu(x + i + Vec::size())),
                         max_op(Vec::loadu(x + i + 2 * Vec::size()),
                                Vec::loadu(x + i + 3 * Vec::size())));
    vmax = max_op(vmax, g);
    if ((g >= Vec(threshold_)).zero_mask() != (1 << Vec::size()) - 1) collect(x, begin, i, kSpan);
  }
  if (i < n) collect(x, begin, i, n - i);
  float m = at::vec::vec_reduce_all<float>(max_op, vmax);
  for (; i < n; ++i) m = (std::isnan(x[i]) || x[i] > m) ? x[i] : m;  // NaN wins
  return m;
}

void TopKCollector::collect(const float* x, int64_t begin, int64_t from, int64_t len) {
  for (int64_t i = from; i < from + len; i += Vec::size()) {
    const int lanes = static_cast<int>(std::min<int64_t>(Vec::size(), from + len - i));
    const Vec v = Vec::loadu(x + i, lanes);
    uint32_t hits = ~static_cast<uint32_t>((v >= Vec(threshold_)).zero_mask());
    for (hits &= (1u << lanes) - 1; hits != 0; hits &= hits - 1) {  // lanes <= 16
      const int64_t j = i + __builtin_ctz(hits);
      if (!(x[j] >= threshold_)) continue;  // a compaction below raised the threshold
      vals_.push_back(x[j]);
      ids_.push_back(static_cast<int32_t>(begin + j));
      if (vals_.size() >= capacity_) {
        keep_at_least(kth_largest());
        // Ties with the k-th value can keep the buffer full: grow instead of looping.
        if (vals_.size() > capacity_ / 2) capacity_ *= 2;
      }
    }
  }
}

float TopKCollector::finish() {
  if (size() > k_) keep_at_least(kth_largest());
  return threshold_;
}

float TopKCollector::kth_largest() {
  tmp_.assign(vals_.begin(), vals_.end());
  std::nth_element(tmp_.begin(), tmp_.begin() + (k_ - 1), tmp_.end(), std::greater<float>());
  return tmp_[k_ - 1];
}

void TopKCollector::keep_at_least(float threshold) {
  threshold_ = threshold;
  size_t kept = 0;
  for (size_t i = 0; i < vals_.size(); ++i) {
    if (vals_[i] >= threshold) {
      vals_[kept] = vals_[i];
      ids_[kept] = ids_[i];
      ++kept;
    }
  }
  vals_.resize(kept);
  ids_.resize(kept);
}

float top_p_min_p_threshold(const float* vals, int64_t n, float max, float top_p, float min_p,
                            Workspace& ws) {
  float threshold = kLowest;
  if (top_p < 1.0f) {
    threshold = n <= kSortLimit ? top_p_by_sort(vals, n, max, top_p, ws)
                                : top_p_by_histogram(vals, n, max, top_p, ws);
  }
  // HF drops p < min_p * p_max, i.e. exp(x - max) < min_p: in logit space x < max + log(min_p).
  if (min_p > 0.0f) threshold = std::max(threshold, max + std::log(min_p));
  return threshold;
}

int64_t draw(float* vals, const int32_t* ids, int64_t n, float max, float threshold, float u,
             Workspace& ws) {
  const int64_t num_chunks = (n + kDrawChunk - 1) / kDrawChunk;
  ws.hist.resize(num_chunks);
  const Vec vmax(max), vthr(threshold), zero(0.0f);
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    float* x = vals + c * kDrawChunk;
    const int64_t len = std::min(kDrawChunk, n - c * kDrawChunk);
    at::vec::map([&](Vec v) { return Vec::blendv(zero, (v - vmax).exp(), v >= vthr); }, x, x,
                 len);
    ws.hist[c] = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, len);
    total += ws.hist[c];
  }
  const double target = static_cast<double>(u) * total;
  // Skip whole chunks, then walk token by token. The walk only stops on a positive weight, so
  // the drawn token is always kept even when the partial sums and the walk round differently.
  int64_t c = 0;
  double cum = 0.0;
  for (; c + 1 < num_chunks && cum + ws.hist[c] <= target; ++c) cum += ws.hist[c];
  int64_t last = -1;
  for (int64_t i = c * kDrawChunk; i < n; ++i) {
    if (vals[i] > 0.0f) {
      last = i;
      cum += vals[i];
      if (cum > target) break;
    }
  }
  if (last < 0) return -1;  // unreachable: the maximum always carries weight 1
  return ids != nullptr ? ids[last] : last;
}

}  // namespace fastdecode::cpu::sampling
