// CPU paged attention and append_kv: the kernels behind attention.cpp's torch adapters.
//
// Paged attention is memory bound, so the work is shaped around reading each KV row once:
// a work item is (sequence, chunk of its query tokens, run of kv heads), and every query row of
// the item (tokens x heads x the Hq / Hkv query heads of each GQA group) is served from one pass
// over those heads' KV. The pass walks KV positions in tiles of kTile: per tile it computes all
// rows' scores, applies softcap -> ALiBi -> masks, takes one online-softmax step per row, then
// streams the V rows once into every row's float32 accumulator, while the next tile's rows are
// prefetched (blocks are scattered, so hardware prefetchers alone cannot follow the table).
// With many rows per kv head (prefill, shared-prefix decode) the work is arithmetic, not reads:
// the score and P @ V loops then take several rows per register tile, so that every K / V
// vector loaded serves them all, without changing any row's arithmetic.
#include "vec.h"  // first: it selects at::vec's instruction set

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_kernels.h"

namespace fastdecode::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// KV positions per online-softmax step. Tiles are aligned to absolute KV positions, not to
// blocks: block size 1 costs no extra softmax steps, and a row's arithmetic never depends on how
// the batch or its own query tokens were cut into work items (batch invariance).
constexpr int64_t kTile = 32;
static_assert(kTile % kVec == 0, "score tiles are processed in whole vectors");
// Query rows (tokens x heads of one GQA group) per packed-form work item: one pass over the KV
// serves them all, while their scratch still fits in L2 and long prefills split into many items.
// With register tiles the per-tile work shared by the rows (locating, prefetching, converting
// K / V) shows: 128 ran one-thread prefill 13-18% faster than 64; 256 was no faster.
constexpr int64_t kChunkRows = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One row of d elements as float32, zero-padded to dp = round_up(d, kVec) so that the score and
// accumulate loops run whole vectors only. fp32 rows that need no padding are read in place.
template <typename T>
inline const float* row_f32(const T* src, float* buf, int64_t d, int64_t dp) {
  if constexpr (std::is_same_v<T, float>) {
    if (d == dp) return src;
  }
  int64_t i = 0;
  for (; i + kVec <= d; i += kVec) {
    Vec v;
    if constexpr (std::is_same_v<T, float>) {
      v = Vec::loadu(src + i);
    } else {
      at::vec::load_to_float<T>(src + i, v);
    }
    v.store(buf + i);
  }
  for (; i < d; ++i) buf[i] = static_cast<float>(src[i]);
  for (; i < dp; ++i) buf[i] = 0.f;
  return buf;
}

// Lane t of the result = the sum of acc[t]'s lanes. On AVX-512 the 16 horizontal sums share
// one transpose folded into the additions (45 shuffles / adds instead of ~9 per sum).
inline Vec hsum_lanes(const Vec* acc) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane: [x02, y02, x13, y13] for tokens 2i, 2i+1
    const __m512 x = acc[2 * i], y = acc[2 * i + 1];
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane: partial sums of tokens 4i .. 4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                                  _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88),
                                  _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
#else
  __at_align__ float sums[kVec];
  for (int64_t t = 0; t < kVec; ++t) {
    sums[t] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[t]);
  }
  return Vec::loadu(sums);
#endif
}

// Lane i of the result = op over x[i]'s lanes, in vec_reduce_all's order (lane j with j + kVec / 2,
// then j + kVec / 4, ...), so a sum has the bits of reducing the row alone. On AVX-512 the 16
// reductions share one transposition: ~3 shuffles / ops per row instead of a latency chain of 8.
template <typename Op>
inline Vec reduce_rows(const Vec* x, const Op& op) {
#if defined(CPU_CAPABILITY_AVX512)
  // Lane 4q + j of the last step holds input 4j + q: inputs are taken in that order.
  auto in = [&](int s) -> __m512 { return x[s % 4 * 4 + s / 4]; };
  __m512 y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: input 2i's j + (j + 8); lanes 8-15: input 2i + 1's
    const __m512 a = in(2 * i), b = in(2 * i + 1);
    y[i] = op(Vec(_mm512_shuffle_f32x4(a, b, 0x44)), Vec(_mm512_shuffle_f32x4(a, b, 0xEE)));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lane q: input 4i + q's j + (j + 4)
    z[i] = op(Vec(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88)),
              Vec(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD)));
  }
  for (int i = 0; i < 2; ++i) {  // 128-bit lane q: j + (j + 2) of inputs 8i + q, 8i + 4 + q
    const __m512d a = _mm512_castps_pd(z[2 * i]), b = _mm512_castps_pd(z[2 * i + 1]);
    w[i] = op(Vec(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b))),
              Vec(_mm512_castpd_ps(_mm512_unpackhi_pd(a, b))));
  }
  return op(Vec(_mm512_shuffle_ps(w[0], w[1], 0x88)), Vec(_mm512_shuffle_ps(w[0], w[1], 0xDD)));
#else
  __at_align__ float r[kVec];
  for (int64_t t = 0; t < kVec; ++t) {
    r[t] = at::vec::vec_reduce_all<float>([&](Vec& a, Vec& b) { return op(a, b); }, x[t]);
  }
  return Vec::loadu(r);
#endif
}

// Register tiles. Scores: kScoreRows query rows x kVec / kScoreRows keys, one accumulator per
// (row, key) (a full hsum_lanes input), so each K vector loaded serves kScoreRows rows and each
// q vector kVec / kScoreRows keys: ~0.5 loads per FMA instead of ~1 for one row at a time.
// P @ V: kAccRows rows' output vectors stay in registers while each V vector is loaded once
// for all of them. Remainder rows take smaller tiles of the same arithmetic (below).
// The scores keep the one-row loop's arithmetic (lane-wise chains, then a fixed reduction tree)
// rather than transposing each K tile to drop the reductions: a decode step has 1-8 rows per kv
// head, too few to pay for a transposition per tile, and both forms must give a row the same
// bits (a token decoded alone or in a packed mixed step).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kScoreRows = 4;  // 16 accumulators + 4 K vectors + 1 q of 32 zmm
constexpr int kAccRows = 6;    // 6 x 4 accumulators + 4 V vectors + 1 broadcast of 32 zmm
                               // (5-9% faster prefill than 4 rows)
#else
constexpr int kScoreRows = 2;  // 8 accumulators + 4 K vectors + 1 q of 16 ymm
constexpr int kAccRows = 2;    // 2 x 4 accumulators + 4 V vectors + 1 broadcast
#endif
static_assert(kVec % kScoreRows == 0, "a score tile's keys are a whole part of a vector");

// s[r][t] = q[r] . k[t] for R rows and kVec / R keys. Every (row, key) pair is computed the same
// way whatever R and its place in the tile: kVec lane-wise FMA chains over the dims, then
// hsum_lanes' fixed reduction tree, so a row's scores never depend on its tile's other rows.
template <int R>
inline void score_tile(const float* const* q, const float* const* k, int64_t dp,
                       float* const* s) {
  constexpr int kKeys = kVec / R;
  Vec acc[kVec];  // acc[r * kKeys + t]: unrolled loops keep the array in registers
#pragma GCC unroll 16
  for (int a = 0; a < kVec; ++a) acc[a] = Vec(0.f);
  int64_t i = 0;
  do {  // dp >= kVec: a loop the compiler sees run keeps acc out of memory
    Vec kv[kKeys];
#pragma GCC unroll 16
    for (int t = 0; t < kKeys; ++t) kv[t] = Vec::loadu(k[t] + i);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const Vec qi = Vec::loadu(q[r] + i);
#pragma GCC unroll 16
      for (int t = 0; t < kKeys; ++t) {
        acc[r * kKeys + t] = at::vec::fmadd(qi, kv[t], acc[r * kKeys + t]);
      }
    }
    i += kVec;
  } while (i < dp);
  __at_align__ float sums[kVec];
  hsum_lanes(acc).store(sums);
  for (int r = 0; r < R; ++r) std::memcpy(s[r], sums + r * kKeys, kKeys * sizeof(float));
}

// s[r][col + t] = q[r] . k[t] for n <= kScoreRows rows and kVec keys k[t], in tiles of the
// widest row count that fits (a remainder of 3 rows: 2, then 1).
inline void score_rows(int64_t n, const float* const* q, const float* const* k, int64_t dp,
                       float* const* s, int64_t col) {
  float* st[kScoreRows];
  auto run = [&](auto rows_c, int64_t r0) {
    constexpr int R = decltype(rows_c)::value;
    for (int64_t t = 0; t < kVec; t += kVec / R) {
      for (int r = 0; r < R; ++r) st[r] = s[r0 + r] + col + t;
      score_tile<R>(q + r0, k + t, dp, st);
    }
  };
  int64_t r0 = 0;
  if constexpr (kScoreRows >= 4) {
    for (; r0 + 4 <= n; r0 += 4) run(std::integral_constant<int, 4>{}, r0);
  }
  for (; r0 + 2 <= n; r0 += 2) run(std::integral_constant<int, 2>{}, r0);
  for (; r0 < n; ++r0) run(std::integral_constant<int, 1>{}, r0);
}

// o[r] += sum over t in [t_begin, t_end) of p[r][t] * v[t] for R rows: the rows' outputs are
// held in registers, four vectors at a time, while the (L1-resident) value rows stream past,
// each loaded once for the R rows. Each output element is one FMA chain over t, in order,
// whatever R.
template <int R>
inline void accumulate_tile(float* const* o, const float* const* p, const float* const* v,
                            int64_t t_begin, int64_t t_end, int64_t dp) {
  int64_t i = 0;
  for (; i + 4 * kVec <= dp; i += 4 * kVec) {
    Vec a[R][4];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) a[r][j] = Vec::loadu(o[r] + i + j * kVec);
    }
    for (int64_t t = t_begin; t < t_end; ++t) {
      const float* x = v[t] + i;
      const Vec x0 = Vec::loadu(x), x1 = Vec::loadu(x + kVec);
      const Vec x2 = Vec::loadu(x + 2 * kVec), x3 = Vec::loadu(x + 3 * kVec);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec pt(p[r][t]);
        a[r][0] = at::vec::fmadd(pt, x0, a[r][0]);
        a[r][1] = at::vec::fmadd(pt, x1, a[r][1]);
        a[r][2] = at::vec::fmadd(pt, x2, a[r][2]);
        a[r][3] = at::vec::fmadd(pt, x3, a[r][3]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) a[r][j].store(o[r] + i + j * kVec);
    }
  }
  for (; i < dp; i += kVec) {
    Vec a[R];
    for (int r = 0; r < R; ++r) a[r] = Vec::loadu(o[r] + i);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const Vec x = Vec::loadu(v[t] + i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] = at::vec::fmadd(Vec(p[r][t]), x, a[r]);
    }
    for (int r = 0; r < R; ++r) a[r].store(o[r] + i);
  }
}

// accumulate_tile for n in [1, kAccRows] rows.
template <int R = kAccRows>
inline void accumulate_rows(int64_t n, float* const* o, const float* const* p,
                            const float* const* v, int64_t t_begin, int64_t t_end, int64_t dp) {
  if constexpr (R > 1) {
    if (n < R) return accumulate_rows<R - 1>(n, o, p, v, t_begin, t_end, dp);
  }
  accumulate_tile<R>(o, p, v, t_begin, t_end, dp);
}

inline void scale_row(float* y, float a, int64_t dp) {
  const Vec av(a);
  for (int64_t i = 0; i < dp; i += kVec) (Vec::loadu(y + i) * av).store(y + i);
}

// tanh x = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|): cannot overflow, and exp_u20 is inline
// (Vectorized::tanh calls into Sleef, whose symbols a torch build need not export). For
// |x| < 1/4 that form cancels (1 - e ~ 2|x|: a large softcap makes every x tiny, and 1e5 drifted
// by 1e-3), so there the odd Taylor series is used instead: through x^13 it is within 1e-10
// relative of tanh, and the exp form is within a few ulp from 1/4 on.
inline Vec tanh_vec(const Vec& x) {
  const Vec one(1.f);
  const Vec a = x.abs();
  const Vec e = (a * Vec(-2.f)).exp_u20();
  const Vec t = (one - e) / (one + e);
  const Vec x2 = x * x;
  Vec poly(21844.f / 6081075.f);
  for (const float c : {-1382.f / 155925.f, 62.f / 2835.f, -17.f / 315.f, 2.f / 15.f, -1.f / 3.f,
                        1.f}) {
    poly = at::vec::fmadd(poly, x2, Vec(c));
  }
  const Vec large = Vec::blendv(t, Vec(0.f) - t, x < Vec(0.f));
  return Vec::blendv(large, x * poly, a < Vec(0.25f));
}

struct WorkItem {
  int32_t seq;       // b
  int32_t q_first;   // row of its first query token in query / out
  int32_t q_count;   // query tokens in this item
  int32_t q_index;   // index of its first token among the sequence's query tokens
  int32_t kv_head;   // first kv head of the item
};

// Per-thread scratch and the computation of one work item: q_count query tokens x heads kv heads
// x group query heads. Rows are ordered (kv head, token, query head of the group) so that each
// kv head's rows are contiguous.
template <typename T>
class AttentionWorker {
 public:
  AttentionWorker(const PagedAttentionParams& p, int64_t heads, int64_t max_rows)
      : p_(p),
        group_(p.num_qo_heads / p.num_kv_heads),
        heads_(heads),
        dp_(round_up(p.head_dim, kVec)),
        q_(max_rows * dp_),
        o_(max_rows * dp_),
        s_(max_rows * kTile),
        m_(max_rows),
        l_(max_rows),
        pos_(max_rows),
        head_(max_rows),
        active_(max_rows),
        qrows_(max_rows),
        srows_(max_rows),
        orows_(max_rows),
        prows_(max_rows),
        ktile_(kTile * dp_),
        vtile_(kTile * dp_),
        zeros_(dp_, 0.f) {}

  void run(const WorkItem& item) {
    const int64_t rows = item.q_count * group_ * heads_;
    const int64_t n = p_.seq_lens[item.seq];
    const int64_t q_len =
        p_.cu_seqlens_q ? p_.cu_seqlens_q[item.seq + 1] - p_.cu_seqlens_q[item.seq] : 1;
    // Bottom-right alignment: the sequence's query tokens are its last q_len KV positions.
    const int64_t first_pos = n - q_len + item.q_index;
    const int64_t last_pos = first_pos + item.q_count - 1;
    const int64_t w = p_.sliding_window;
    const int64_t lo = w > 0 ? std::max<int64_t>(0, first_pos - w + 1) : 0;
    const int64_t hi = p_.causal ? std::min(n, last_pos + 1) : n;

    load_queries(item);
    for (int64_t r = 0; r < rows; ++r) {  // once per item: divisions are slow
      pos_[r] = first_pos + token_of(r, item);
      head_[r] = head_of(r, item);
    }
    std::fill_n(m_.begin(), rows, kNegInf);
    std::fill_n(l_.begin(), rows, 0.f);
    std::fill_n(o_.begin(), rows * dp_, 0.f);
    // A tile's rows are scattered over blocks: the next tile's rows are located and prefetched
    // while the current one is computed, or every block jump's latency would be exposed; the
    // tile after that is located too, for its pages' translations (touch_pages).
    int64_t t0 = lo / kTile * kTile;
    locate(item, std::max(t0, lo), std::min(t0 + kTile, hi), t0, 0);
    locate(item, t0 + kTile, std::min(t0 + 2 * kTile, hi), t0 + kTile, 1);
    for (int cur = 0; t0 < hi; t0 += kTile, cur = (cur + 1) % 3) {
      const int64_t ahead = t0 + 2 * kTile;
      locate(item, ahead, std::min(ahead + kTile, hi), ahead, (cur + 2) % 3);
      tile(item, t0, std::max(t0, lo) - t0, std::min(t0 + kTile, hi) - t0,
           offsets_[cur], offsets_[(cur + 1) % 3], offsets_[(cur + 2) % 3]);
    }
    store_outputs(item);
  }

 private:
  void load_queries(const WorkItem& item) {
    const auto* query = static_cast<const T*>(p_.query);
    const Vec scale(p_.scale);
    for (int64_t r = 0; r < item.q_count * group_ * heads_; ++r) {
      const T* src = query + (item.q_first + token_of(r, item)) * p_.q_stride_t +
                     head_of(r, item) * p_.q_stride_h;
      float* dst = q_.data() + r * dp_;
      const float* row = row_f32(src, dst, p_.head_dim, dp_);
      for (int64_t i = 0; i < dp_; i += kVec) (Vec::loadu(row + i) * scale).store(dst + i);
    }
  }

  int64_t token_of(int64_t r, const WorkItem& item) const { return r / group_ % item.q_count; }
  int64_t head_of(int64_t r, const WorkItem& item) const {
    return (item.kv_head + r / (group_ * item.q_count)) * group_ + r % group_;
  }

  // Fills offsets_[buf][j - t0] with the element offset of KV position j's row (at the item's
  // first kv head) for j in [jb, je); positions outside stay -1.
  void locate(const WorkItem& item, int64_t jb, int64_t je, int64_t t0, int buf) {
    const int32_t* table = p_.block_tables + item.seq * p_.max_blocks_per_seq;
    const int64_t token_stride = p_.num_kv_heads * p_.head_dim;
    const int64_t block_stride = p_.block_size * token_stride;  // int64: block * stride > 2^31
    std::fill_n(offsets_[buf], kTile, int64_t{-1});
    for (int64_t j = jb; j < je; ++j) {
      offsets_[buf][j - t0] = static_cast<int64_t>(table[j / p_.block_size]) * block_stride +
                              (j % p_.block_size) * token_stride + item.kv_head * p_.head_dim;
    }
  }

  // Prefetch of the next tile's K then V rows (all the item's heads: adjacent in the cache),
  // spread over the current tile's computation in steps: a burst of a whole tile's lines fills
  // the miss queues and stalls the core.
  void prefetch_start(const int64_t* next, int64_t calls) {
    pf_next_ = next;
    pf_lane_ = pf_byte_ = 0;
    const int64_t lines = 2 * kTile * ((heads_ * p_.head_dim * sizeof(T) + 63) / 64);
    pf_step_ = (lines + calls - 1) / std::max<int64_t>(calls, 1);
  }

  // One prefetch per 4 KiB page of the K and V rows two tiles ahead (offsets from locate): a
  // prefetch that misses the TLB waits for its page walk while holding a miss buffer, so the
  // walks are started a tile early and the next tile's prefetches find their translations.
  void touch_pages(const int64_t* ahead) {
    const int64_t bytes = heads_ * p_.head_dim * static_cast<int64_t>(sizeof(T));
    for (const void* cache : {p_.k_cache, p_.v_cache}) {
      uintptr_t last = 0;  // the page touched last: rows of a block share pages
      for (int64_t t = 0; t < kTile; ++t) {
        if (ahead[t] < 0) continue;
        const auto row = reinterpret_cast<uintptr_t>(cache) + ahead[t] * sizeof(T);
        for (uintptr_t page = row >> 12; page <= (row + bytes - 1) >> 12; ++page) {
          if (page != last) {
            __builtin_prefetch(reinterpret_cast<const char*>(std::max(page << 12, row)), 0, 2);
          }
          last = page;
        }
      }
    }
  }

  // Prefetches the next `lines` cache lines of the cursor (K lanes, then V lanes).
  void prefetch_step(int64_t lines) {
    const int64_t bytes = heads_ * p_.head_dim * static_cast<int64_t>(sizeof(T));
    int64_t lane = pf_lane_, byte = pf_byte_;
    while (lines > 0 && lane < 2 * kTile) {
      const int64_t off = pf_next_[lane % kTile];
      if (off >= 0) {
        const char* row = static_cast<const char*>(lane < kTile ? p_.k_cache : p_.v_cache) +
                          off * static_cast<int64_t>(sizeof(T));
        const int64_t n = std::min(lines, (bytes - byte + 63) / 64);  // no overflow: lines may
        const int64_t stop = std::min(bytes, byte + n * 64);           // be INT64_MAX
        lines -= n;
        // Into L1 (locality 3), though a tile's K and V rows outgrow it: measured 3-7% faster
        // than into L2 on the default decode benchmark (Zen 5), with prefill unchanged.
        for (; byte < stop; byte += 64) __builtin_prefetch(row + byte, 0, 3);
      }
      if (off < 0 || byte >= bytes) {
        byte = 0;
        ++lane;
      }
    }
    pf_lane_ = lane;
    pf_byte_ = byte;
  }

  // One tile: KV positions t0 + [t_begin, t_end) (row offsets from locate). Lanes of the score
  // tile are absolute positions t0 + t, so a row's arithmetic is the same however the work
  // was cut. Scores, one online-softmax step per row, then P @ V.
  void tile(const WorkItem& item, int64_t t0, int64_t t_begin, int64_t t_end,
            const int64_t* offsets, const int64_t* next_offsets, const int64_t* ahead_offsets) {
    const auto* k_cache = static_cast<const T*>(p_.k_cache);
    const auto* v_cache = static_cast<const T*>(p_.v_cache);
    const int64_t d = p_.head_dim, head_rows = item.q_count * group_;
    const int64_t g_begin = t_begin / kVec * kVec;
    const int64_t groups = (t_end - g_begin + kVec - 1) / kVec;
    touch_pages(ahead_offsets);
    const int64_t score_blocks = (head_rows + kScoreRows - 1) / kScoreRows;
    const int64_t acc_blocks = (head_rows + kAccRows - 1) / kAccRows;
    prefetch_start(next_offsets, heads_ * (score_blocks * groups + acc_blocks));
    for (int64_t h = 0; h < heads_; ++h) {
      for (int64_t t = 0; t < kTile; ++t) {
        krows_[t] = t < t_begin || t >= t_end ? zeros_.data()  // lane masked later
                    : row_f32(k_cache + offsets[t] + h * d, ktile_.data() + t * dp_, d, dp_);
      }
      const int64_t r_first = h * head_rows;
      for (int64_t r = 0; r < head_rows; ++r) {
        qrows_[r] = q_.data() + (r_first + r) * dp_;
        srows_[r] = s_.data() + (r_first + r) * kTile;
      }
      for (int64_t g = g_begin; g < t_end; g += kVec) {
        for (int64_t r = 0; r < head_rows; r += kScoreRows) {
          score_rows(std::min<int64_t>(kScoreRows, head_rows - r), qrows_.data() + r, krows_ + g,
                     dp_, srows_.data() + r, g);
          prefetch_step(pf_step_);
        }
      }
    }
    softmax_step(head_rows * heads_, t0, t_begin, t_end);
    for (int64_t h = 0; h < heads_; ++h) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        vrows_[t] = row_f32(v_cache + offsets[t] + h * d, vtile_.data() + t * dp_, d, dp_);
      }
      // Rows that see no key of the tile are left out, not given zero probabilities: their
      // outputs stay untouched, bit for bit.
      int64_t n = 0;
      for (int64_t r = h * head_rows; r < (h + 1) * head_rows; ++r) {
        if (!active_[r]) continue;
        orows_[n] = o_.data() + r * dp_;
        prows_[n++] = s_.data() + r * kTile;
      }
      for (int64_t r = 0; r < n; r += kAccRows) {
        accumulate_rows(std::min<int64_t>(kAccRows, n - r), orows_.data() + r,
                        prows_.data() + r, vrows_, t_begin, t_end, dp_);
        prefetch_step(pf_step_);
      }
    }
    prefetch_step(std::numeric_limits<int64_t>::max());
  }

  // Turns every row's scores of the tile into probabilities (in place) and rescales its running
  // max / sum / output; active_[r]: whether row r sees a key of the tile. Rows go kVec at a time
  // so that their max and sum reductions share reduce_rows' transpositions.
  void softmax_step(int64_t rows, int64_t t0, int64_t t_begin, int64_t t_end) {
    const auto max = [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); };
    const auto add = [](const Vec& a, const Vec& b) { return a + b; };
    for (int64_t r0 = 0; r0 < rows; r0 += kVec) {
      const int64_t n = std::min(kVec, rows - r0);
      Vec part[kVec];  // per row: lane-wise max of its scores, then lane-wise sum of exps
      for (int64_t i = 0; i < kVec; ++i) {
        const int64_t r = r0 + i;
        part[i] = Vec(kNegInf);
        if (i >= n) continue;
        active_[r] = bias_and_mask(r, pos_[r] - t0, head_[r], t_begin, t_end);
        if (!active_[r]) continue;
        const float* s = s_.data() + r * kTile;
        for (int64_t j = 0; j < kTile; j += kVec) part[i] = max(part[i], Vec::loadu(s + j));
      }
      __at_align__ float m_new[kVec], sums[kVec];
      reduce_rows(part, max).store(m_new);
      for (int64_t i = 0; i < kVec; ++i) {
        const int64_t r = r0 + i;
        part[i] = Vec(0.f);
        if (i >= n || !active_[r]) continue;
        m_new[i] = std::max(m_[r], m_new[i]);
        float* s = s_.data() + r * kTile;
        const Vec vm(m_new[i]);
        for (int64_t j = 0; j < kTile; j += kVec) {
          const Vec e = (Vec::loadu(s + j) - vm).exp_u20();  // exp(-inf) = 0 for masked keys
          e.store(s + j);
          part[i] = part[i] + e;
        }
      }
      reduce_rows(part, add).store(sums);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        if (!active_[r]) continue;
        if (m_new[i] != m_[r]) {
          const float alpha = std::exp(m_[r] - m_new[i]);  // 0 on the row's first visible tile
          l_[r] *= alpha;
          scale_row(o_.data() + r * dp_, alpha, dp_);
          m_[r] = m_new[i];
        }
        l_[r] += sums[i];
      }
    }
  }

  // Row r's scores of the tile with softcap -> ALiBi -> relative bias -> masks applied (masked
  // lanes -inf). pos: the row's query position relative to the tile's first. Returns false
  // (scores left as they are) when the row sees no key of the tile.
  bool bias_and_mask(int64_t r, int64_t pos, int64_t head, int64_t t_begin, int64_t t_end) {
    const int64_t w = p_.sliding_window;
    const int64_t t_lo = w > 0 ? std::clamp<int64_t>(pos - w + 1, t_begin, t_end) : t_begin;
    const int64_t t_hi = p_.causal ? std::clamp<int64_t>(pos + 1, t_begin, t_end) : t_end;
    if (t_lo >= t_hi) return false;
    float* s = s_.data() + r * kTile;
    if (p_.softcap > 0.f) {  // before ALiBi and masking, as in the reference
      const Vec cap(p_.softcap), inv_cap(1.f / p_.softcap);
      for (int64_t i = 0; i < kTile; i += kVec) {
        (cap * tanh_vec(Vec::loadu(s + i) * inv_cap)).store(s + i);
      }
    }
    if (p_.alibi_slopes) {
      const Vec slope(p_.alibi_slopes[head]);
      const Vec dist = Vec::arange(static_cast<float>(-pos), 1.f);  // j - i at lane 0
      for (int64_t i = 0; i < kTile; i += kVec) {
        at::vec::fmadd(slope, dist + Vec(static_cast<float>(i)), Vec::loadu(s + i)).store(s + i);
      }
    }
    if (p_.relative_bias) {  // j - i = t - pos at lane t: consecutive entries of the table
      const int64_t r = p_.relative_radius;
      const float* table = p_.relative_bias + head * (2 * r + 1) + r;
      for (int64_t t = t_lo; t < t_hi; ++t) s[t] += table[std::clamp<int64_t>(t - pos, -r, r)];
    }
    std::fill(s, s + t_lo, kNegInf);
    std::fill(s + t_hi, s + kTile, kNegInf);
    return true;
  }

  void store_outputs(const WorkItem& item) {
    auto* out = static_cast<T*>(p_.out);
    for (int64_t r = 0; r < item.q_count * group_ * heads_; ++r) {
      // l == 0: the row saw no key (seq_lens 0, or everything masked): zeros, never NaN.
      const float inv = l_[r] > 0.f ? 1.f / l_[r] : 0.f;
      const float* o = o_.data() + r * dp_;
      T* dst = out + (item.q_first + token_of(r, item)) * p_.o_stride_t +
               head_of(r, item) * p_.o_stride_h;
      for (int64_t i = 0; i < p_.head_dim; ++i) dst[i] = static_cast<T>(o[i] * inv);
      if (p_.lse) {
        p_.lse[(item.q_first + token_of(r, item)) * p_.num_qo_heads + head_of(r, item)] =
            l_[r] > 0.f ? m_[r] + std::log(l_[r]) : kNegInf;
      }
    }
  }

  const PagedAttentionParams& p_;
  const int64_t group_, heads_, dp_;
  std::vector<float> q_, o_;  // [rows, dp]: scaled queries, unnormalised outputs
  std::vector<float> s_;      // [rows, kTile]: scores, then probabilities
  std::vector<float> m_, l_;  // [rows]: running max and sum of exp
  std::vector<int64_t> pos_, head_;  // [rows]: the row's query position and query head
  std::vector<char> active_;  // [rows]: the row sees a key of the current tile
  // Row pointers handed to the register tiles: one kv head's queries and scores; its active
  // rows' outputs and probabilities.
  std::vector<const float*> qrows_;
  std::vector<float*> srows_, orows_;
  std::vector<const float*> prows_;
  std::vector<float> ktile_, vtile_;  // [kTile, dp]: K / V rows converted to float32
  std::vector<float> zeros_;          // [dp]: stands in for the keys of masked lanes
  const float* krows_[kTile];         // the tile's K / V rows as float32
  const float* vrows_[kTile];
  // Prefetch cursor: the next tile's row offsets, the next lane (K lanes, then V lanes) and
  // byte within its row, and the lines to prefetch per step.
  const int64_t* pf_next_ = nullptr;
  int64_t pf_lane_ = 0, pf_byte_ = 0, pf_step_ = 0;
  int64_t offsets_[3][kTile];  // row offsets of the current, next and next-but-one tile
};

// Kv heads per work item: all of them (each tile then reads whole contiguous token rows: fewer
// pages, DRAM rows and prefetch streams than one head's strided slices) unless that leaves too
// few items to keep every thread busy. Only the loop order changes, never a row's arithmetic.
int64_t heads_per_item(int64_t num_kv_heads, int64_t chunks, int64_t threads) {
  int64_t heads = num_kv_heads;
  for (int64_t h = num_kv_heads; h >= 1; --h) {
    if (num_kv_heads % h == 0) {
      heads = h;
      if (chunks * (num_kv_heads / h) >= 4 * threads) break;
    }
  }
  return heads;
}

}  // namespace

template <typename T>
void paged_attention_kernel(const PagedAttentionParams& p) {
  const int64_t group = p.num_qo_heads / p.num_kv_heads;
  const int64_t threads = at::get_num_threads();
  auto q_len = [&](int64_t b) -> int64_t {
    return p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : 1;
  };
  // Cut first with single-head items to count chunks, then widen items to more heads.
  int64_t chunks = 0;
  const int64_t tokens_1 = std::max<int64_t>(1, kChunkRows / group);
  for (int64_t b = 0; b < p.num_seqs; ++b) chunks += (q_len(b) + tokens_1 - 1) / tokens_1;
  const int64_t heads = heads_per_item(p.num_kv_heads, chunks, threads);
  const int64_t chunk = std::max<int64_t>(1, kChunkRows / (group * heads));
  std::vector<WorkItem> items;
  int64_t max_tokens = 1;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q0 = p.cu_seqlens_q ? p.cu_seqlens_q[b] : b;
    for (int64_t i = 0; i < q_len(b); i += chunk) {
      const int64_t count = std::min(chunk, q_len(b) - i);
      max_tokens = std::max(max_tokens, count);
      for (int64_t h = 0; h < p.num_kv_heads; h += heads) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(q0 + i),
                         static_cast<int32_t>(count), static_cast<int32_t>(i),
                         static_cast<int32_t>(h)});
      }
    }
  }
  const int64_t total = static_cast<int64_t>(items.size());
  if (total == 0) return;
  // Items differ in cost (a prefill chunk vs a decode row), so threads pull them from a shared
  // counter instead of taking fixed ranges. at::parallel_for sizes the team from
  // torch.get_num_threads(); each member allocates its scratch once.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, total), 1, [&](int64_t, int64_t) {
    AttentionWorker<T> worker(p, heads, max_tokens * group * heads);
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) worker.run(items[i]);
  });
}

template <typename T>
void append_kv_kernel(const AppendKvParams& p) {
  const int64_t d = p.head_dim, token_stride = p.num_kv_heads * d;
  const auto* key = static_cast<const T*>(p.key);
  const auto* value = static_cast<const T*>(p.value);
  auto* k_cache = static_cast<T*>(p.k_cache);
  auto* v_cache = static_cast<T*>(p.v_cache);
  // A token is a few hundred bytes: only large appends (prefill) are worth a thread team.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (token_stride * sizeof(T)));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;  // padding token
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        // slot * token_stride in int64: large pools pass 2^31 elements.
        std::memcpy(k_cache + slot * token_stride + h * d,
                    key + t * p.key_stride_t + h * p.key_stride_h, d * sizeof(T));
        std::memcpy(v_cache + slot * token_stride + h * d,
                    value + t * p.value_stride_t + h * p.value_stride_h, d * sizeof(T));
      }
    }
  });
}

template void paged_attention_kernel<float>(const PagedAttentionParams&);
template void paged_attention_kernel<c10::BFloat16>(const PagedAttentionParams&);
template void paged_attention_kernel<c10::Half>(const PagedAttentionParams&);
template void append_kv_kernel<float>(const AppendKvParams&);
template void append_kv_kernel<c10::BFloat16>(const AppendKvParams&);
template void append_kv_kernel<c10::Half>(const AppendKvParams&);

}  // namespace fastdecode::cpu
