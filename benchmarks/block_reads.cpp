// What a reader of scattered KV blocks can get out of this machine's memory, without attention:
// the ceiling against which bench_attention.py's CPU figure should be read.
//
//   g++ -O3 -march=native -fopenmp benchmarks/block_reads.cpp -o /tmp/block_reads
//   /tmp/block_reads > benchmarks/results/block_reads_cpu.md
//
// The layout is bench_attention.py's default: 64 sequences x 128 blocks of K and of V, each block
// 16 tokens x 3 kv heads x 64 fp32 = 12 KiB, the blocks of all sequences shuffled over the pool.
// Each sequence is read in tiles of two blocks, K then V, with a few dependent FMAs per 64-byte
// line (about the attention kernel's arithmetic per line), either with no software prefetch or
// with the next tile prefetched into L1 line by line as the current one is read (the kernel's
// scheme), and on pools of 4 KiB pages or advised for huge pages.
// Each figure is the ratio of its read bandwidth to that of a sequential read of 512 MiB timed
// just before and after it (same threads), the median over rounds: drift on a shared machine
// hits both sides alike.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr long kBlockBytes = 12288, kSeqs = 64, kBlocksPerSeq = 128, kTileBlocks = 2;
constexpr long kLinesPerBlock = kBlockBytes / 64, kBlocks = kSeqs * kBlocksPerSeq;
constexpr int kFmasPerLine = 3;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline __m512 work(__m512 x, __m512 acc) {
  for (int i = 0; i < kFmasPerLine; ++i) acc = _mm512_fmadd_ps(x, x, acc);
  return acc;
}

// K and V pools, on 4 KiB pages or advised for 2 MiB pages before their first touch (as
// fastdecode.ops.allocate_kv_cache does), and the shuffled block tables.
struct Pool {
  static constexpr size_t kBytes = kBlocks * kBlockBytes, kHuge = 2 << 20;
  char* k;
  char* v;
  std::vector<int> table;  // [kSeqs, kBlocksPerSeq] -> block
  explicit Pool(bool huge) : k(alloc(huge)), v(alloc(huge)), table(kBlocks) {
    for (long i = 0; i < kBlocks; ++i) table[i] = static_cast<int>(i);
    std::shuffle(table.begin(), table.end(), std::mt19937(1));
  }
  ~Pool() {
    std::free(k);
    std::free(v);
  }
  static char* alloc(bool huge) {
    auto* p = static_cast<char*>(std::aligned_alloc(kHuge, kBytes));
    if (huge) madvise(p, kBytes, MADV_HUGEPAGE);  // refused: 4 KiB pages
    std::fill_n(reinterpret_cast<float*>(p), kBytes / 4, 1e-3f);
    return p;
  }
  const char* line(const int* blocks, long tile, long n) const {  // n-th line of a tile
    const bool is_v = n >= kTileBlocks * kLinesPerBlock;
    n %= kTileBlocks * kLinesPerBlock;
    return (is_v ? v : k) + blocks[tile * kTileBlocks + n / kLinesPerBlock] * kBlockBytes +
           n % kLinesPerBlock * 64;
  }
};

// Seconds to read every sequence's blocks once; prefetch: the next tile, one line per line read.
double read_blocks(const Pool& pool, int threads, bool prefetch) {
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(+ : sink)
  for (long s = 0; s < kSeqs; ++s) {
    const int* blocks = pool.table.data() + s * kBlocksPerSeq;
    const long tiles = kBlocksPerSeq / kTileBlocks, lines = 2 * kTileBlocks * kLinesPerBlock;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long tile = 0; tile < tiles; ++tile) {
      for (long n = 0; n < lines; n += 4) {
        if (prefetch && tile + 1 < tiles) {
          for (long u = 0; u < 4; ++u) __builtin_prefetch(pool.line(blocks, tile + 1, n + u), 0, 3);
        }
        const auto* x = reinterpret_cast<const float*>(pool.line(blocks, tile, n));
        a0 = work(_mm512_loadu_ps(x), a0);
        a1 = work(_mm512_loadu_ps(x + 16), a1);
        a2 = work(_mm512_loadu_ps(x + 32), a2);
        a3 = work(_mm512_loadu_ps(x + 48), a3);
      }
    }
    sink += _mm512_reduce_add_ps(a0 + a1 + a2 + a3);
  }
  if (sink == 0.5f) std::puts("");  // keeps the reads
  return seconds_since(t0);
}

double read_sequential(const std::vector<float>& x, int threads) {
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    const long n = static_cast<long>(x.size()), nt = omp_get_num_threads();
    const long begin = n / nt * omp_get_thread_num(), end = begin + n / nt;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = begin; i + 64 <= end; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(&x[i]));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(&x[i + 16]));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(&x[i + 32]));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(&x[i + 48]));
    }
    sink += _mm512_reduce_add_ps(a0 + a1 + a2 + a3);
  }
  if (sink == 0.5f) std::puts("");
  return seconds_since(t0);
}

std::string cpu_name() {
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

}  // namespace

int main() {
  const Pool plain(false), huge(true);
  const std::vector<float> seq(1L << 27, 1.f);  // 512 MiB
  const double block_bytes = 2.0 * kBlocks * kBlockBytes, seq_bytes = 4.0 * seq.size();
  std::printf("# scattered block reads vs a sequential read (cpu)\n\n"
              "Command: `g++ -O3 -march=native -fopenmp benchmarks/block_reads.cpp -o "
              "/tmp/block_reads && /tmp/block_reads`\n\n- cpu: %s, %d threads\n\n"
              "%ld blocks of K and of V, 12 KiB each, shuffled; tiles of %ld blocks; %d FMAs per "
              "line. Ratio = block-read bandwidth / sequential-read bandwidth, median of 15 "
              "rounds (min, max).\n\n"
              "| threads | pages | software prefetch | block reads GB/s | sequential GB/s | ratio | min "
              "| max |\n|---|---|---|---|---|---|---|---|\n",
              cpu_name().c_str(), omp_get_max_threads(), kBlocks, kTileBlocks, kFmasPerLine);
  for (int threads : {1, omp_get_max_threads()}) {
    for (auto [pool, prefetch] : {std::pair{&plain, false}, {&plain, true}, {&huge, true}}) {
      std::vector<double> ratio, gbps, seq_gbps;
      for (int round = 0; round < 15; ++round) {
        const double s0 = read_sequential(seq, threads);
        const double t = read_blocks(*pool, threads, prefetch);
        const double s1 = read_sequential(seq, threads);
        gbps.push_back(block_bytes / t / 1e9);
        seq_gbps.push_back(seq_bytes / ((s0 + s1) / 2) / 1e9);
        ratio.push_back(gbps.back() / seq_gbps.back());
      }
      for (auto* v : {&ratio, &gbps, &seq_gbps}) std::sort(v->begin(), v->end());
      std::printf("| %d | %s | %s | %.1f | %.1f | %.2f | %.2f | %.2f |\n", threads,
                  pool == &huge ? "2 MiB advised" : "4 KiB", prefetch ? "next tile" : "none",
                  gbps[7], seq_gbps[7], ratio[7], ratio.front(), ratio.back());
    }
  }
}
