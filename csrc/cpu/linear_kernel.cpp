// Weight-streaming linear product for the few rows of a decode step (see linear_kernel.h).
//
// With T tokens of a decode step the product does 2 * T flops per weight element read, so its
// speed is the speed at which one pass over the weights streams from memory. The kernel makes
// that pass exactly once per call, whatever T is: every panel's stream is read once and all T rows
// are accumulated from it (rows beyond what the registers hold re-read the panel from L2, not from
// memory). Threads split the panels into contiguous ranges and read a few neighbouring panels side
// by side (see kPanelsPerPass). Accumulation is float32, in order along k (in chunks, see kChunk).
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
// Rows accumulated in registers per pass over a panel: 4 accumulators per row (chunk and total,
// two vectors each), leaving a few of the 32 (AVX-512) / 16 (AVX2 and narrower) vector registers
// for the weights and the broadcast. Rows beyond re-read the panel from L2, not from memory.
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
// How far ahead of the loads a lone panel stream (passes of many rows, see kPanelsPerPass) is
// prefetched, and into which cache level. One
// core's read rate is bounded by the misses it keeps in flight: hardware prefetchers stop at
// 4 KiB page boundaries, and L1 has few miss buffers, so software prefetches into L2 (locality
// 1: prefetcht2) keep the next pages' lines in flight while the L1 streamer feeds the loads from
// L2. At one row, 8 KiB ahead into L2 read ~8% faster than 2 KiB ahead into L1 and ~5% faster
// than no prefetch (process CPU time over the 135M model's products, interleaved runs).
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
// (two cores: 22-27 and 26-28 GB/s); at 8 and 32 rows (one panel per pass) nothing changes.
template <int R>
constexpr int kPanelsPerPass = std::max(1, kMaxRows / R);

// out[r, n0 + i * kPanel + j] = sum_k x[r, k] * panel_i[k, j] (+ bias) for r < R, i < NP,
// j < the panel's width; panel_i = panel + i * in_features * kPanel.
template <int R, int NP>
void panel_block(const PackedLinearParams& p, const float* panel, const float* x, float* out,
                 int64_t n0) {
  const int64_t next = p.in_features * kPanel;  // floats from one panel to the next
  Vec total[NP][R][2];
  for (int i = 0; i < NP; ++i)
    for (int r = 0; r < R; ++r) total[i][r][0] = total[i][r][1] = Vec(0.f);
  const auto* ahead = reinterpret_cast<const char*>(panel) + kPrefetchBytes;
  for (int64_t k0 = 0; k0 < p.in_features; k0 += kChunk) {
    Vec acc[NP][R][2];
    for (int i = 0; i < NP; ++i)
      for (int r = 0; r < R; ++r) acc[i][r][0] = acc[i][r][1] = Vec(0.f);
    const int64_t k1 = std::min(k0 + kChunk, p.in_features);
    for (int64_t k = k0; k < k1; ++k) {
      if constexpr (NP == 1) {  // a lone stream: keep the next pages in flight by hand
        for (int64_t b = 0; b < kPanelBytes; b += 64) {
          __builtin_prefetch(ahead + k * kPanelBytes + b, 0, kPrefetchLocality);
        }
      }
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
    for (int i = 0; i < NP; ++i)
      for (int r = 0; r < R; ++r) {
        total[i][r][0] = total[i][r][0] + acc[i][r][0];
        total[i][r][1] = total[i][r][1] + acc[i][r][1];
      }
  }
  for (int i = 0; i < NP; ++i) {
    const int64_t n = n0 + i * kPanel;
    const int64_t width = std::min(kPanel, p.out_features - n);
    const int64_t w_lo = std::min(width, kVec), w_hi = width - w_lo;
    const Vec b_lo = p.bias != nullptr ? Vec::loadu(p.bias + n, w_lo) : Vec(0.f);
    const Vec b_hi = p.bias != nullptr && w_hi > 0 ? Vec::loadu(p.bias + n + kVec, w_hi)
                                                   : Vec(0.f);
    for (int r = 0; r < R; ++r) {
      const Vec lo = total[i][r][0] + b_lo, hi = total[i][r][1] + b_hi;
      float* o = out + r * p.out_stride + n;
      if (width == kPanel) {
        lo.store(o);
        hi.store(o + kVec);
      } else {
        lo.store(o, w_lo);
        if (w_hi > 0) hi.store(o + kVec, w_hi);
      }
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
  // Rows are split into passes of near-equal size (8 rows: 4 + 4, not 6 + 2).
  const int64_t passes = ceil_div(p.num_tokens, kMaxRows);
  const int64_t rows_per_pass = ceil_div(p.num_tokens, passes);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (p.in_features * kPanelBytes));
  // Panels per group: as many as the widest pass allows (a narrower last pass allows more).
  const int64_t group = kPanelsAtRows[rows_per_pass - 1];
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += group) {
      const int64_t np = std::min(group, end - first);
      const float* weights = p.packed + first * p.in_features * kPanel;
      for (int64_t r0 = 0; r0 < p.num_tokens; r0 += rows_per_pass) {
        const int64_t rows = std::min(rows_per_pass, p.num_tokens - r0);
        kPanelRows[rows - 1](p, weights, np, p.x + r0 * p.x_stride, p.out + r0 * p.out_stride,
                             first * kPanel);
      }
    }
  });
}

}  // namespace fastdecode::cpu
