#include "vec.h"  // first: it selects at::vec's instruction set

#include "sampling_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "sampling_select.h"

namespace fastdecode::cpu::sampling {
namespace {

using Vec = at::vec::Vectorized<float>;

// Values processed per step; a multiple of 64 (one word of the seen-token mask) that stays in L1.
constexpr int64_t kChunk = 2048;
constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename T>
inline Vec load_vec(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(src);
  } else {
    Vec v;
    at::vec::load_to_float(src, v);
    return v;
  }
}

// dst [n] = src converted to float, divided by the temperature when `divide` (HF divides even
// by 1; greedy rows are not divided at all), in one sweep.
template <typename T>
void load_chunk(const T* src, int64_t n, bool divide, float temperature, float* dst) {
  const Vec t(temperature);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = load_vec(src + i);
    (divide ? v / t : v).store(dst + i);
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(src[i]);
    dst[i] = divide ? x / temperature : x;
  }
}

// HF RepetitionPenaltyLogitsProcessor on one value.
inline float penalize(float x, float penalty) { return x < 0.0f ? x * penalty : x / penalty; }

// The row's distinct seen ids as a bitmask in ws.seen_bits (so each id is penalised once),
// cleared again on destruction, also on early returns. Ids outside [0, V) count as padding.
class SeenMask {
 public:
  template <typename T>
  SeenMask(const RowInput<T>& in, float penalty, Workspace& ws)
      : seen_(in.seen), n_(penalty == 1.0f ? 0 : in.num_seen), vocab_(in.vocab), ws_(ws) {
    ws_.seen_bits.resize((vocab_ + 63) / 64, 0);
    for (int64_t i = 0; i < n_; ++i) {
      const int64_t id = seen_[i];
      if (id >= 0 && id < vocab_) {
        ws_.seen_bits[id >> 6] |= uint64_t{1} << (id & 63);
        any_ = true;
      }
    }
  }
  ~SeenMask() {
    for (int64_t i = 0; i < n_; ++i) {
      const int64_t id = seen_[i];
      if (id >= 0 && id < vocab_) ws_.seen_bits[id >> 6] = 0;
    }
  }
  SeenMask(const SeenMask&) = delete;
  SeenMask& operator=(const SeenMask&) = delete;

  // Penalises dst [n], the processed values of tokens [begin, begin + n) (begin a multiple of
  // 64), recomputing each marked value from the source: penalty first, then the temperature.
  template <typename T>
  void apply(const T* src, int64_t begin, int64_t n, float penalty, bool divide,
             float temperature, float* dst) const {
    if (!any_) return;
    for (int64_t word = begin >> 6; word << 6 < begin + n; ++word) {
      for (uint64_t bits = ws_.seen_bits[word]; bits != 0; bits &= bits - 1) {
        const int64_t i = (word << 6) + __builtin_ctzll(bits) - begin;
        const float x = penalize(static_cast<float>(src[i]), penalty);
        dst[i] = divide ? x / temperature : x;
      }
    }
  }

 private:
  const int64_t* seen_;
  int64_t n_;
  int64_t vocab_;
  Workspace& ws_;
  bool any_ = false;
};

// Running maximum of a row streamed chunk by chunk; the argmax is the first index of the
// maximum, and NaN anywhere marks the row.
struct RowMax {
  float max = -kInf;
  int64_t argmax = -1;
  bool nan = false;

  // x: [n] values of tokens [begin, begin + n) with maximum chunk_max (NaN if they hold one).
  void update(const float* x, int64_t begin, int64_t n, float chunk_max) {
    if (std::isnan(chunk_max)) {
      nan = true;
    } else if (chunk_max > max) {
      max = chunk_max;
      argmax = begin + (std::find(x, x + n, chunk_max) - x);
    }
  }
};

// Maximum of x [n]; ATen's maximum propagates NaN, so one reduction also detects NaN.
inline float chunk_max(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
}

// One pass over the row: converted, penalised, divided by the temperature (sampled rows), written
// to `row` when given (else to a chunk buffer), with the running max and top-k candidates.
template <typename T>
struct RowPass {
  RowMax stats;

  RowPass(const RowInput<T>& in, const RowParams& p, bool greedy, float* row,
          TopKCollector* top_k, bool stop_at_nan, Workspace& ws) {
    const SeenMask seen(in, p.repetition_penalty, ws);
    if (row == nullptr) ws.chunk.resize(kChunk);
    for (int64_t begin = 0; begin < in.vocab; begin += kChunk) {
      const int64_t n = std::min(kChunk, in.vocab - begin);
      float* x = row != nullptr ? row + begin : ws.chunk.data();
      const T* src = in.logits + begin;
      load_chunk(src, n, !greedy, p.temperature, x);
      seen.apply(src, begin, n, p.repetition_penalty, !greedy, p.temperature, x);
      stats.update(x, begin, n, top_k != nullptr ? top_k->add(x, begin, n) : chunk_max(x, n));
      if (stats.nan && stop_at_nan) return;  // the row yields -1 whatever follows
    }
  }
};

}  // namespace

template <typename T>
void penalize_row(const RowInput<T>& in, float penalty, float* out, Workspace& ws) {
  const SeenMask seen(in, penalty, ws);
  for (int64_t begin = 0; begin < in.vocab; begin += kChunk) {
    const int64_t n = std::min(kChunk, in.vocab - begin);
    load_chunk(in.logits + begin, n, false, 1.0f, out + begin);
    seen.apply(in.logits + begin, begin, n, penalty, false, 1.0f, out + begin);
  }
}

template <typename T>
void process_row(const RowInput<T>& in, const RowParams& p, float* out, Workspace& ws) {
  const bool greedy = p.temperature == 0.0f;
  std::optional<TopKCollector> top_k;
  if (!greedy && p.top_k > 0) top_k.emplace(p.top_k, ws);
  const RowPass<T> pass(in, p, greedy, out, top_k ? &*top_k : nullptr, false, ws);
  if (greedy || pass.stats.nan) return;  // NaN rows are left unfiltered (sample yields -1)
  float threshold = top_k ? top_k->finish() : kLowest;
  const float max = pass.stats.max;
  if (std::isfinite(max)) {  // top-p / min-p need probabilities
    const bool restricted = top_k.has_value();
    const float* vals = restricted ? ws.cand_vals.data() : out;
    const int64_t n = restricted ? top_k->size() : in.vocab;
    threshold = std::max(threshold, top_p_min_p_threshold(vals, n, max, p.top_p, p.min_p, ws));
  }
  if (threshold == kLowest) return;  // nothing filtered (-inf stays -inf)
  const Vec vthr(threshold), neg_inf(-kInf);
  at::vec::map([&](Vec v) { return Vec::blendv(neg_inf, v, v >= vthr); }, out, out, in.vocab);
}

template <typename T>
int64_t sample_row(const RowInput<T>& in, const RowParams& p, float u, Workspace& ws) {
  const bool greedy = p.temperature == 0.0f;
  std::optional<TopKCollector> top_k;
  if (!greedy && p.top_k > 0) top_k.emplace(p.top_k, ws);
  // Without top-k, top-p / min-p and the draw need the whole processed row.
  float* row = nullptr;
  if (!greedy && !top_k) {
    ws.row.resize(in.vocab);
    row = ws.row.data();
  }
  const RowPass<T> pass(in, p, greedy, row, top_k ? &*top_k : nullptr, true, ws);
  const RowMax& stats = pass.stats;
  if (stats.nan || stats.max == -kInf) return -1;
  if (greedy) return stats.argmax;
  if (stats.max == kInf) return -1;
  float threshold = kLowest;
  float* vals = row;
  const int32_t* ids = nullptr;
  int64_t n = in.vocab;
  if (top_k) {
    threshold = top_k->finish();
    vals = ws.cand_vals.data();
    ids = ws.cand_ids.data();
    n = top_k->size();
  }
  threshold = std::max(threshold, top_p_min_p_threshold(vals, n, stats.max, p.top_p, p.min_p, ws));
  return draw(vals, ids, n, stats.max, threshold, u, ws);
}

#define FASTDECODE_INSTANTIATE(T)                                                       \
  template void penalize_row<T>(const RowInput<T>&, float, float*, Workspace&);         \
  template void process_row<T>(const RowInput<T>&, const RowParams&, float*, Workspace&); \
  template int64_t sample_row<T>(const RowInput<T>&, const RowParams&, float, Workspace&);
FASTDECODE_INSTANTIATE(float)
FASTDECODE_INSTANTIATE(c10::BFloat16)
FASTDECODE_INSTANTIATE(c10::Half)
#undef FASTDECODE_INSTANTIATE

}  // namespace fastdecode::cpu::sampling
