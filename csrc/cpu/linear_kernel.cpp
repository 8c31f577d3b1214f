// Weight-streaming linear product for the few rows of a decode step (see linear_kernel.h).
//
// With T tokens of a decode step the product does 2 * T flops per weight element read, so its
// speed is the speed at which one pass over the weights streams from memory. The kernel makes
// that pass exactly once per call, whatever T is: every panel's stream is read once and all T rows
// are accumulated from it. Threads split the panels into contiguous ranges. Up to kMaxRows rows,
// the rows' totals stay in registers and a few neighbouring panels are read side by side (see
// kPanelsPerPass); beyond, the product turns compute bound and the panels are read in k blocks
// that stay in L1 while every row's pass consumes them, the totals kept in L1 (see kBlockK).
// Accumulation is float32, in order along k, in chunks (see kChunk), the same on both paths:
// a row's result does not depend on how many rows share the call.
#include "vec.h"  // first: it selects at::vec's instruction set

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>

#include "linear_kernel.h"

namespace fastdecode::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kPanel = 2 * kVec;
constexpr int64_t kPanelBytes = kPanel * static_cast<int64_t>(sizeof(float));
// Rows accumulated in registers in one pass over a panel: 4 accumulators per row (chunk and
// total, two vectors each), leaving a few of the 32 (AVX-512) / 16 (AVX2 and narrower) vector
// registers for the weights and the broadcast. More rows take the many-rows path below.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxRows = 6;
#else
constexpr int kMaxRows = 3;
#endif
// The k sum runs in chunks of kChunk terms whose sums make the total: a single running sum over
// all in_features terms loses precision like sqrt(in_features) and was 2-3x further from float64
// than BLAS's blocked dot products. Both levels stay in registers: running totals kept in L1
// (stored and reloaded every chunk) cost ~10% of the read rate at one row.
constexpr int64_t kChunk = 16;
// How far ahead of the loads a lone panel stream (kPanelsPerPass = 1, and the many-rows path) is
// prefetched, and into which cache level. One core's read rate is bounded by the misses it
// keeps in flight: hardware prefetchers stop at 4 KiB page boundaries, and L1 has few miss
// buffers, so software prefetches into L2 (locality 1: prefetcht2) keep the next pages' lines
// in flight while the L1 streamer feeds the loads from L2. At one row, 8 KiB ahead into L2 read
// ~8% faster than 2 KiB ahead into L1 and ~5% faster than no prefetch (process CPU time over the
// 135M model's products, interleaved runs).
constexpr int64_t kPrefetchBytes = 8192;
constexpr int kPrefetchLocality = 1;
// Weight bytes a thread must have to itself before a product is split across threads: smaller
// products (the layers of tiny models) cost less than waking the team.
constexpr int64_t kMinBytesPerThread = 256 << 10;

// Panels read side by side per pass at R rows. One core's read rate is bounded by the misses it
// keeps in flight, and one sequential stream keeps too few: NP panels are separate streams that
// the hardware prefetchers follow together, while every row keeps its own order along k (a
// row's result does not depend on NP, so neither on its batchmates). NP x R accumulator sets
// must fit the registers, so NP shrinks as R grows. The 135M model's products at one row, in
// alternated runs: 11.7-12.8 GB/s on one core with one panel at a time, 14.0-14.9 with six
// (two cores: 22-27 and 26-28 GB/s).
template <int R>
constexpr int kPanelsPerPass = std::max(1, kMaxRows / R);

// out_row[n + j] = (lo, hi)[j] + bias[n + j] for j < the width of the panel at n.
inline void store_panel(const PackedLinearParams& p, float* out_row, int64_t n, const Vec& lo,
                        const Vec& hi) {
  const int64_t width = std::min(kPanel, p.out_features - n);
  const int64_t w_lo = std::min(width, kVec), w_hi = width - w_lo;
  const Vec b_lo = p.bias != nullptr ? Vec::loadu(p.bias + n, w_lo) : Vec(0.f);
  const Vec b_hi = p.bias != nullptr && w_hi > 0 ? Vec::loadu(p.bias + n + kVec, w_hi) : Vec(0.f);
  float* o = out_row + n;
  if (width == kPanel) {
    (lo + b_lo).store(o);
    (hi + b_hi).store(o + kVec);
  } else {
    (lo + b_lo).store(o, w_lo);
    if (w_hi > 0) (hi + b_hi).store(o + kVec, w_hi);
  }
}

// acc[i][r] = sum over k in [k0, k1) of x[r, k] * panel_i[k, :] for r < R, i < NP, in order
// along k (panel_i = panel + i * in_features * kPanel); prefetch(k) runs before step k's loads.
// Both paths accumulate their chunks here, so a row's arithmetic is the same on either.
template <int R, int NP, typename Prefetch>
inline void chunk_sums(const PackedLinearParams& p, const float* panel, const float* x,
                       int64_t k0, int64_t k1, Vec (&acc)[NP][R][2], Prefetch&& prefetch) {
  const int64_t next = p.in_features * kPanel;  // floats from one panel to the next
  for (int i = 0; i < NP; ++i)
    for (int r = 0; r < R; ++r) acc[i][r][0] = acc[i][r][1] = Vec(0.f);
  for (int64_t k = k0; k < k1; ++k) {
    prefetch(k);
    Vec w[NP][2];
    for (int i = 0; i < NP; ++i) {
      w[i][0] = Vec::loadu(panel + i * next + k * kPanel);
      w[i][1] = Vec::loadu(panel + i * next + k * kPanel + kVec);
    }
    for (int r = 0; r < R; ++r) {
      const Vec xr(x[r * p.x_stride + k]);
      for (int i = 0; i < NP; ++i) {
        acc[i][r][0] = at::vec::fmadd(xr, w[i][0], acc[i][r][0]);
        acc[i][r][1] = at::vec::fmadd(xr, w[i][1], acc[i][r][1]);
      }
    }
  }
}

// out[r, n0 + i * kPanel + j] = sum_k x[r, k] * panel_i[k, j] (+ bias) for r < R, i < NP,
// j < the panel's width; the totals stay in registers.
template <int R, int NP>
void panel_block(const PackedLinearParams& p, const float* panel, const float* x, float* out,
                 int64_t n0) {
  Vec total[NP][R][2];
  for (int i = 0; i < NP; ++i)
    for (int r = 0; r < R; ++r) total[i][r][0] = total[i][r][1] = Vec(0.f);
  const auto* ahead = reinterpret_cast<const char*>(panel) + kPrefetchBytes;
  const auto prefetch = [ahead](int64_t k) {
    if constexpr (NP == 1) {  // a lone stream: keep the next pages in flight by hand
      for (int64_t b = 0; b < kPanelBytes; b += 64) {
        __builtin_prefetch(ahead + k * kPanelBytes + b, 0, kPrefetchLocality);
      }
    }
  };
  for (int64_t k0 = 0; k0 < p.in_features; k0 += kChunk) {
    Vec acc[NP][R][2];
    chunk_sums<R, NP>(p, panel, x, k0, std::min(k0 + kChunk, p.in_features), acc, prefetch);
    for (int i = 0; i < NP; ++i)
      for (int r = 0; r < R; ++r) {
        total[i][r][0] = total[i][r][0] + acc[i][r][0];
        total[i][r][1] = total[i][r][1] + acc[i][r][1];
      }
  }
  for (int i = 0; i < NP; ++i) {
    for (int r = 0; r < R; ++r) {
      store_panel(p, out + r * p.out_stride, n0 + i * kPanel, total[i][r][0], total[i][r][1]);
    }
  }
}

// panel_block<R, np> for a run-time np in [1, kPanelsPerPass<R>].
template <int R, int NP = kPanelsPerPass<R>>
void panel_rows(const PackedLinearParams& p, const float* panel, int64_t np, const float* x,
                float* out, int64_t n0) {
  if constexpr (NP > 1) {
    if (np < NP) return panel_rows<R, NP - 1>(p, panel, np, x, out, n0);
  }
  panel_block<R, NP>(p, panel, x, out, n0);
}

using PanelFn = void (*)(const PackedLinearParams&, const float*, int64_t, const float*, float*,
                         int64_t);

template <int... Rs>
constexpr std::array<PanelFn, sizeof...(Rs)> panel_table(std::integer_sequence<int, Rs...>) {
  return {&panel_rows<Rs + 1>...};
}
constexpr auto kPanelRows = panel_table(std::make_integer_sequence<int, kMaxRows>{});
// kPanelsPerPass<R> for R = 1 .. kMaxRows, at run time.
template <int... Rs>
constexpr std::array<int64_t, sizeof...(Rs)> group_table(std::integer_sequence<int, Rs...>) {
  return {kPanelsPerPass<Rs + 1>...};
}
constexpr auto kPanelsAtRows = group_table(std::make_integer_sequence<int, kMaxRows>{});

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- Many rows (T > kMaxRows) ----
// At R rows a pass over a panel does 2 R flops per weight element; beyond kMaxRows rows the
// registers cannot hold every row's chunk and total, so rows go in passes, and a pass that
// re-reads its panel from L2 was load bound (~85 GFLOP/s on one AVX-512 core at 6 rows, half
// the FMA peak). Here the totals live in an L1 buffer (added to once per chunk, the same
// additions in the same order as the register path), which frees the registers for a tile of
// kTileRows rows x kTilePanels panels: per k, 2 kTilePanels weight loads and kTileRows
// broadcasts feed 2 kTileRows kTilePanels FMAs. The panels are read in blocks of kBlockK k that
// stay in L1 across the passes of every row, while the next block streams into L2: each pass
// prefetches its share of the next block's lines (every passes-th k), so the memory stream is
// spread over all the block's arithmetic instead of stalling its first pass. The 135M model's
// products on one core: 32 rows 85 -> 67-71 ms (nn.Linear 102-111 ms in the same runs), 64 rows
// 138 -> 105-115 ms, 8 rows 50 -> 42-46 ms; one to six rows keep the register path.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTilePanels = 2;
#else
constexpr int kTilePanels = 1;
#endif
constexpr int kTileRows = 6;
constexpr int64_t kBlockK = kPrefetchBytes / kPanelBytes;
static_assert(kBlockK % kChunk == 0, "k blocks hold whole chunks");
// Rows whose totals share one L1 buffer; more rows re-stream the panels per group.
constexpr int64_t kGroupRows = 64;
constexpr int64_t kTileWidth = kTilePanels * kPanel;  // floats per row of the totals buffer

// Where a pass over a k block prefetches: the next block's row k + kBlockK of every panel, for
// every `every`-th k from k0 + phase.
struct PrefetchShare {
  int64_t phase, every;
};

// totals[r * kTileWidth + i * kPanel + j] += sum_k x[r, k] * panel_i[k, j] for k in [k0, k1),
// chunk by chunk, r < R, i < NP.
template <int R, int NP>
void tile_block(const PackedLinearParams& p, const float* panel, const float* x, float* totals,
                int64_t k0, int64_t k1, PrefetchShare share) {
  const int64_t next = p.in_features * kPanel;
  int64_t countdown = share.phase;  // k until this pass's next prefetch
  const auto prefetch = [&](int64_t k) {
    if (countdown-- > 0) return;
    countdown = share.every - 1;
    for (int i = 0; i < NP; ++i) {
      const auto* ahead = reinterpret_cast<const char*>(panel + i * next + k * kPanel) +
                          kPrefetchBytes;  // = kBlockK rows ahead
      for (int64_t b = 0; b < kPanelBytes; b += 64) {
        __builtin_prefetch(ahead + b, 0, kPrefetchLocality);
      }
    }
  };
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    Vec acc[NP][R][2];
    chunk_sums<R, NP>(p, panel, x, c0, std::min(c0 + kChunk, k1), acc, prefetch);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NP; ++i)
        for (int h = 0; h < 2; ++h) {
          float* t = totals + r * kTileWidth + i * kPanel + h * kVec;
          (Vec::loadu(t) + acc[i][r][h]).store(t);
        }
  }
}

// tile_block<R, np> for a run-time np in [1, kTilePanels].
template <int R>
void tile_rows(const PackedLinearParams& p, const float* panel, int64_t np, const float* x,
               float* totals, int64_t k0, int64_t k1, PrefetchShare share) {
  if constexpr (kTilePanels > 1) {
    if (np == 2) return tile_block<R, 2>(p, panel, x, totals, k0, k1, share);
  }
  tile_block<R, 1>(p, panel, x, totals, k0, k1, share);
}

using TileFn = void (*)(const PackedLinearParams&, const float*, int64_t, const float*, float*,
                        int64_t, int64_t, PrefetchShare);

template <int... Rs>
constexpr std::array<TileFn, sizeof...(Rs)> tile_table(std::integer_sequence<int, Rs...>) {
  return {&tile_rows<Rs + 1>...};
}
constexpr auto kTileFns = tile_table(std::make_integer_sequence<int, kTileRows>{});

// out[r, n] for every row and the np (<= kTilePanels) panels from the one at `first`.
void many_rows(const PackedLinearParams& p, int64_t first, int64_t np) {
  alignas(64) float totals[kGroupRows * kTileWidth];
  const float* weights = p.packed + first * p.in_features * kPanel;
  for (int64_t g0 = 0; g0 < p.num_tokens; g0 += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, p.num_tokens - g0);
    std::fill_n(totals, rows * kTileWidth, 0.f);
    // Passes of near-equal size (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2).
    const int64_t passes = ceil_div(rows, kTileRows), base = rows / passes;
    for (int64_t k0 = 0; k0 < p.in_features; k0 += kBlockK) {
      const int64_t k1 = std::min(k0 + kBlockK, p.in_features);
      for (int64_t pass = 0, r0 = 0; pass < passes; ++pass) {
        const int64_t r = base + (pass < rows % passes ? 1 : 0);
        kTileFns[r - 1](p, weights, np, p.x + (g0 + r0) * p.x_stride,
                        totals + r0 * kTileWidth, k0, k1, PrefetchShare{pass, passes});
        r0 += r;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* t = totals + r * kTileWidth;
      for (int64_t i = 0; i < np; ++i) {
        store_panel(p, p.out + (g0 + r) * p.out_stride, (first + i) * kPanel,
                    Vec::loadu(t + i * kPanel), Vec::loadu(t + i * kPanel + kVec));
      }
    }
  }
}

}  // namespace

int64_t linear_panel_width() { return kPanel; }

void pack_linear_weight_kernel(float* packed, const float* weight, int64_t out_features,
                               int64_t in_features, int64_t weight_stride) {
  at::parallel_for(0, ceil_div(out_features, kPanel), 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      float* dst = packed + panel * in_features * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = panel * kPanel + j;
        for (int64_t k = 0; k < in_features; ++k) {
          dst[k * kPanel + j] = n < out_features ? weight[n * weight_stride + k] : 0.f;
        }
      }
    }
  });
}

void packed_linear_kernel(const PackedLinearParams& p) {
  if (p.num_tokens == 0 || p.out_features == 0) return;
  const int64_t panels = ceil_div(p.out_features, kPanel);
  if (p.num_tokens > kMaxRows) {
    const int64_t tiles = ceil_div(panels, kTilePanels);
    const int64_t grain =
        std::max<int64_t>(1, kMinBytesPerThread / (p.in_features * kPanelBytes * kTilePanels));
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t first = tile * kTilePanels;
        many_rows(p, first, std::min<int64_t>(kTilePanels, panels - first));
      }
    });
    return;
  }
  // Every row in one pass over groups of neighbouring panels.
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (p.in_features * kPanelBytes));
  const int64_t group = kPanelsAtRows[p.num_tokens - 1];
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += group) {
      kPanelRows[p.num_tokens - 1](p, p.packed + first * p.in_features * kPanel,
                                   std::min(group, end - first), p.x, p.out, first * kPanel);
    }
  });
}

}  // namespace fastdecode::cpu
