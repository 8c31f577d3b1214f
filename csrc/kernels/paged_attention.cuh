// Paged decode attention (one query token per sequence) with split-KV.
//
// Work split: one CTA per (sequence, KV head, group chunk, partition). The query heads that share
// a KV head (up to kMaxGroupHeads of them) sit in one CTA, so each KV byte is read from HBM once
// per group (GQA packing). A partition is a fixed kPartitionTokens of KV positions, never sized
// from the batch, so a sequence's result does not depend on its batchmates. Sequences longer than
// one partition write (normalised partial output, log-sum-exp) pairs to the workspace and a merge
// kernel combines them; a one-partition sequence writes `out` directly.
//
// Inside a CTA, KV tiles of kTile tokens stream through shared memory with cp.async double
// buffering (16-byte copies); scores, online softmax and P.V run on the tile in float32, reading
// the tile with 128-bit shared loads from rows padded so that those loads are conflict-free. Each
// K or V vector is read from shared memory once per tile and applied to every head of the group
// from registers (the score and P.V loops are register-blocked over the group's heads).
//
// Device-side guards (the public op does not copy seq_lens / block_tables to the host on CUDA): a
// seq_len outside [0, M * P] makes the sequence's output rows NaN without reading its KV; a block
// id outside [0, N) is never read (block 0 is copied in its place, so the copy loop stays
// branch-free) and flags the CTA, whose rows then come out NaN (carried through the split-KV
// merge by a NaN log-sum-exp).
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"

namespace fastdecode::kernels {

namespace detail {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / kWarpSize;
constexpr int kDotLanes = 4;  // lanes sharing one q.k dot product (shuffle-reduced)
constexpr int kMergeThreads = 128;

// Tokens per KV tile: a power of two in [8, 32] with ~8 KiB per tile of K (and of V).
template <typename T, int D>
constexpr int kv_tile_tokens() {
  int tile = 32;
  while (tile > 8 && tile * D * static_cast<int>(sizeof(T)) > 8192) tile /= 2;
  return tile;
}

// The sequence's KV length, or -1 when it lies outside [0, M * P] (the guarded case).
__device__ __forceinline__ int checked_seq_len(const PagedDecodeParams& p, int seq) {
  const int64_t limit = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const int64_t len = p.seq_lens[seq];
  return len < 0 || len > limit ? -1 : static_cast<int>(len);
}

// Partitions of a sequence (0 when guarded or empty).
__device__ __forceinline__ int num_partitions(int seq_len) {
  return seq_len > 0 ? ceil_div(seq_len, kPartitionTokens) : 0;
}

// 16-byte vectors of padding after each shared-memory KV row, so that the row stride is 4 mod 8
// vectors: the score loop's quarter-warps read 4 consecutive vectors of 2 adjacent rows with
// 128-bit loads, which then fall into 8 distinct 16-byte bank groups.
constexpr int kv_row_pad(int chunks) { return ((4 - chunks % 8) % 8 + 8) % 8; }

template <typename T, int D>
struct DecodeTraits {
  static constexpr int kVec = kVecElems<T>;
  static constexpr int kChunks = D / kVec;        // 16-byte vectors per head row
  static constexpr int kRowStride = kChunks + kv_row_pad(kChunks);
  static constexpr int kTile = kv_tile_tokens<T, D>();
  static constexpr int kQStride = D + 4;          // floats; padded like the KV rows
  static_assert(D % kVec == 0, "head_dim must be a multiple of the 16-byte vector");
  static_assert(kTile <= kWarpSize, "softmax maps one tile position per lane");
  static_assert(kChunks <= kAttnThreads, "P.V gives each thread one vector of the head row");
  static_assert(kRowStride % 8 == 4, "conflict-free 128-bit reads need a row stride of 4 mod 8");
};

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) paged_decode_kernel(PagedDecodeParams p) {
  using Tr = DecodeTraits<T, D>;
  constexpr int kVec = Tr::kVec, kChunks = Tr::kChunks, kTile = Tr::kTile;
  __shared__ uint4 kv_smem[2][2][kTile][Tr::kRowStride];  // [stage][K / V][token][vector]
  __shared__ __align__(16) float q_smem[kMaxGroupHeads][Tr::kQStride];
  __shared__ float s_smem[kMaxGroupHeads][kTile];  // scores, then probabilities
  __shared__ float m_smem[kMaxGroupHeads], l_smem[kMaxGroupHeads], alpha_smem[kMaxGroupHeads];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int seq = blockIdx.z, part = blockIdx.x;
  const int group = p.num_qo_heads / p.num_kv_heads;
  const int chunks_per_kv = ceil_div(group, kMaxGroupHeads);
  const int kv_head = blockIdx.y / chunks_per_kv;
  const int first = (blockIdx.y % chunks_per_kv) * kMaxGroupHeads;  // within the group
  const int nh = min(kMaxGroupHeads, group - first);
  const int h0 = kv_head * group + first;  // first query head of this CTA

  const int seq_len = checked_seq_len(p, seq);
  const int num_parts = num_partitions(seq_len);
  if (part >= max(num_parts, 1)) return;
  T* out = static_cast<T*>(p.out) + seq * p.o_stride_seq;
  if (seq_len <= 0) {  // 0: CUDA-graph padding rows, zeros (never NaN); -1: guarded, NaN
    const float fill = seq_len == 0 ? 0.f : __uint_as_float(0x7fc00000u);
    for (int i = tid; i < nh * D; i += kAttnThreads) {
      out[(h0 + i / D) * p.o_stride_head + i % D] = from_float<T>(fill);
    }
    return;
  }
  const bool direct = num_parts == 1;
  int lo = part * kPartitionTokens;
  const int hi = min(lo + kPartitionTokens, seq_len);
  if (p.sliding_window > 0) lo = max(lo, seq_len - p.sliding_window);
  const int num_tiles = lo < hi ? ceil_div(hi - lo, kTile) : 0;

  const T* query = static_cast<const T*>(p.query) + seq * p.q_stride_seq;
  for (int i = tid; i < nh * D; i += kAttnThreads) {
    q_smem[i / D][i % D] = to_float(query[(h0 + i / D) * p.q_stride_head + i % D]);
  }
  if (tid < kMaxGroupHeads) {
    m_smem[tid] = -INFINITY;
    l_smem[tid] = 0.f;
  }

  const int32_t* block_table = p.block_tables + seq * p.block_tables_stride;
  const T* k_base = static_cast<const T*>(p.k_cache) + kv_head * p.kv_stride_head;
  const T* v_base = static_cast<const T*>(p.v_cache) + kv_head * p.kv_stride_head;
  // Guard: one unsigned 32-bit compare per copy (ids are int32; a negative one compares as huge)
  // and a select; the thread ORs what it saw, and the CTA combines it at its last barrier.
  const auto num_blocks = static_cast<uint32_t>(p.num_blocks);
  bool saw_bad_block = false;
  auto load_tile = [&](int tile, int stage) -> bool {  // true: a guarded id in this tile
    bool bad_tile = false;
    const int t0 = lo + tile * kTile;
    for (int c = tid; c < kTile * kChunks; c += kAttnThreads) {
      const int t = c / kChunks, v = c % kChunks, j = t0 + t;
      if (j < hi) {  // cp.async, completed by __pipeline_wait_prior
        const auto id = static_cast<uint32_t>(block_table[j / p.block_size]);
        const bool bad = id >= num_blocks;
        bad_tile |= bad;
        const int64_t block = bad ? 0 : id;  // a guarded id reads block 0, its rows become NaN
        const int64_t at = block * p.kv_stride_block + (j % p.block_size) * p.kv_stride_token +
                           v * kVec;
        __pipeline_memcpy_async(&kv_smem[stage][0][t][v], k_base + at, sizeof(uint4));
        __pipeline_memcpy_async(&kv_smem[stage][1][t][v], v_base + at, sizeof(uint4));
      } else {  // past the end: zeros, so that 0 * V never meets stale non-finite values
        kv_smem[stage][0][t][v] = make_uint4(0, 0, 0, 0);
        kv_smem[stage][1][t][v] = make_uint4(0, 0, 0, 0);
      }
    }
    return bad_tile;
  };

  // P.V work split: each thread owns one 16-byte vector of the head row for every head of the
  // group (so each V vector read from shared memory serves all of them); when there are fewer
  // vectors than threads, `slices` threads share a vector, each taking every slices-th token.
  const int slices = kAttnThreads / kChunks;
  const int my_vec = tid % kChunks, my_slice = tid / kChunks;  // my_slice >= slices: idle
  float acc[kMaxGroupHeads][kVec];
#pragma unroll
  for (int h = 0; h < kMaxGroupHeads; ++h) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[h][i] = 0.f;
  }

  const unsigned dot_mask = 0xfu << (lane & ~(kDotLanes - 1));
  const float inv_softcap = p.softcap > 0.f ? __fdiv_rn(1.f, p.softcap) : 0.f;
  const float slope_pos = static_cast<float>(seq_len - 1);  // the query's position i

  if (num_tiles > 0) saw_bad_block = load_tile(0, 0);
  __pipeline_commit();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1, t0 = lo + tile * kTile;
    if (tile + 1 < num_tiles) saw_bad_block |= load_tile(tile + 1, stage ^ 1);
    __pipeline_commit();
    __pipeline_wait_prior(1);  // this tile's copies are done; the next tile's may be in flight
    __syncthreads();

    // Scores: kDotLanes lanes per token; each K vector is read from shared memory once and
    // dotted with every head of the group (the q reads are broadcasts across the tokens).
    for (int t = tid / kDotLanes; t < kTile; t += kAttnThreads / kDotLanes) {
      float s[kMaxGroupHeads];
#pragma unroll
      for (int h = 0; h < kMaxGroupHeads; ++h) s[h] = 0.f;
      for (int v = tid % kDotLanes; v < kChunks; v += kDotLanes) {
        float k[kVec];
        unpack16<T>(kv_smem[stage][0][t][v], k);  // one LDS.128
#pragma unroll
        for (int h = 0; h < kMaxGroupHeads; ++h) {
          if (h >= nh) break;
          const float* q = &q_smem[h][v * kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) s[h] = fmaf(q[i], k[i], s[h]);
        }
      }
#pragma unroll
      for (int h = 0; h < kMaxGroupHeads; ++h) {
        s[h] += __shfl_xor_sync(dot_mask, s[h], 1);
        s[h] += __shfl_xor_sync(dot_mask, s[h], 2);
      }
      // Each of the kDotLanes lanes finishes every kDotLanes-th head.
#pragma unroll
      for (int h = 0; h < kMaxGroupHeads; ++h) {
        if (h >= nh) break;
        if (h % kDotLanes != tid % kDotLanes) continue;
        float x = s[h] * p.scale;
        if (p.softcap > 0.f) x = p.softcap * accurate_tanh(x * inv_softcap);  // before masking
        if (p.alibi_slopes != nullptr) {
          x += p.alibi_slopes[h0 + h] * (static_cast<float>(t0 + t) - slope_pos);
        }
        s_smem[h][t] = t0 + t < hi ? x : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax, one warp per head, one lane per tile position.
    for (int h = warp; h < nh; h += kAttnWarps) {
      const float s = lane < kTile ? s_smem[h][lane] : -INFINITY;
      const float m_old = m_smem[h];
      const float m_new = fmaxf(m_old, warp_max(s));
      // Every position masked so far: keep the state (avoids exp(-inf - -inf) = NaN).
      const float prob = m_new == -INFINITY ? 0.f : expf(s - m_new);
      const float alpha = m_new == -INFINITY ? 1.f : expf(m_old - m_new);
      const float tile_sum = warp_sum(prob);
      if (lane < kTile) s_smem[h][lane] = prob;
      if (lane == 0) {
        m_smem[h] = m_new;
        l_smem[h] = l_smem[h] * alpha + tile_sum;
        alpha_smem[h] = alpha;
      }
    }
    __syncthreads();

    // acc = acc * alpha + P.V
    if (my_slice < slices) {
#pragma unroll
      for (int h = 0; h < kMaxGroupHeads; ++h) {
        if (h >= nh) break;
        const float alpha = alpha_smem[h];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[h][i] *= alpha;
      }
      for (int t = my_slice; t < kTile; t += slices) {
        float v[kVec];
        unpack16<T>(kv_smem[stage][1][t][my_vec], v);  // one LDS.128
#pragma unroll
        for (int h = 0; h < kMaxGroupHeads; ++h) {
          if (h >= nh) break;
          const float prob = s_smem[h][t];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[h][i] = fmaf(prob, v[i], acc[h][i]);
        }
      }
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
  }
  // m / l are read across threads below, also when there was no tile.
  const bool bad_block = __syncthreads_or(saw_bad_block);

  // Per head: sum the token slices (fixed order: deterministic) through the free KV tiles, then
  // the first slice normalises and stores the head's vector.
  float* reduce = reinterpret_cast<float*>(&kv_smem[0][0][0][0]);  // [kAttnThreads][kVec]
#pragma unroll
  for (int h = 0; h < kMaxGroupHeads; ++h) {  // unrolled: acc stays in registers
    if (h >= nh) break;  // uniform across the CTA: the barriers below stay matched
    float o[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = acc[h][i];
    if (slices > 1) {
      if (my_slice < slices) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) reduce[tid * kVec + i] = o[i];
      }
      __syncthreads();
      if (my_slice == 0) {
        for (int s = 1; s < slices; ++s) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) o[i] += reduce[(tid + s * kChunks) * kVec + i];
        }
      }
      __syncthreads();  // the buffer is rewritten for the next head
    }
    if (my_slice != 0) continue;
    const float l = l_smem[h];
    const float inv = bad_block ? __uint_as_float(0x7fc00000u) : (l > 0.f ? 1.f / l : 0.f);
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] *= inv;
    if (direct) {
      *reinterpret_cast<uint4*>(out + (h0 + h) * p.o_stride_head + my_vec * kVec) = pack16<T>(o);
    } else {
      float* po = p.partial_out +
                  ((static_cast<int64_t>(seq) * p.num_qo_heads + h0 + h) * gridDim.x + part) * D +
                  my_vec * kVec;
#pragma unroll
      for (int i = 0; i < kVec; i += 4) {
        *reinterpret_cast<float4*>(po + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
      }
    }
  }
  if (!direct && tid < nh) {
    const float l = l_smem[tid];
    // l == 0: nothing visible (window); a guarded block id: NaN, for the merge to see.
    p.partial_lse[(static_cast<int64_t>(seq) * p.num_qo_heads + h0 + tid) * gridDim.x + part] =
        bad_block ? __uint_as_float(0x7fc00000u)
                  : (l == 0.f ? -INFINITY : m_smem[tid] + logf(l));
  }
}

// One CTA per (head, sequence) of a multi-partition sequence: out = sum_i w_i o_i / sum_i w_i
// with w_i = exp(lse_i - max lse), in a fixed partition order. A NaN lse (a partition that met a
// guarded block id) makes the row NaN.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    paged_decode_merge_kernel(PagedDecodeParams p, int max_partitions) {
  const int head = blockIdx.x, seq = blockIdx.y;
  const int num_parts = num_partitions(checked_seq_len(p, seq));
  if (num_parts <= 1) return;  // written directly by the main kernel
  const int64_t row = static_cast<int64_t>(seq) * p.num_qo_heads + head;
  const float* lse = p.partial_lse + row * max_partitions;
  const float* po = p.partial_out + row * max_partitions * p.head_dim;
  T* out = static_cast<T*>(p.out) + seq * p.o_stride_seq + head * p.o_stride_head;
  float m = -INFINITY;
  bool poisoned = false;
  for (int i = 0; i < num_parts; ++i) {
    m = fmaxf(m, lse[i]);
    poisoned |= isnan(lse[i]);
  }
  for (int d = threadIdx.x; d < p.head_dim; d += kMergeThreads) {
    float num = poisoned ? __uint_as_float(0x7fc00000u) : 0.f, den = 0.f;
    if (m != -INFINITY && !poisoned) {
      for (int i = 0; i < num_parts; ++i) {
        const float w = expf(lse[i] - m);
        num = fmaf(w, po[static_cast<int64_t>(i) * p.head_dim + d], num);
        den += w;
      }
    }
    out[d] = from_float<T>(den > 0.f ? num / den : num);  // num: 0, or NaN when poisoned
  }
}

template <typename T, int D>
cudaError_t launch_paged_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  const int max_parts = paged_decode_max_partitions(p.max_blocks_per_seq, p.block_size);
  const int group = p.num_qo_heads / p.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(std::max(max_parts, 1)),
                  static_cast<unsigned>(p.num_kv_heads * ceil_div(group, kMaxGroupHeads)),
                  static_cast<unsigned>(p.num_seqs));
  const cudaError_t err = launch(paged_decode_kernel<T, D>, grid, dim3(kAttnThreads), stream, p);
  if (err != cudaSuccess || max_parts <= 1) return err;
  const dim3 merge_grid(static_cast<unsigned>(p.num_qo_heads), static_cast<unsigned>(p.num_seqs));
  return launch(paged_decode_merge_kernel<T>, merge_grid, dim3(kMergeThreads), stream, p,
                max_parts);
}

}  // namespace detail

// Launches decode attention on `stream`. The caller provides the workspace when
// paged_decode_workspace_floats(...) > 0 (partial_out first, partial_lse right after it).
inline cudaError_t paged_decode_attention(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || p.block_size <= 0 ||
      p.num_blocks < 0 || p.num_blocks > INT32_MAX || !is_supported_head_dim(p.head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (paged_decode_max_partitions(p.max_blocks_per_seq, p.block_size) > 1 &&
      (p.partial_out == nullptr || p.partial_lse == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return DISPATCH_DTYPE(p.dtype, T, [&] {
    return DISPATCH_HEAD_DIM(p.head_dim, D,
                             [&] { return detail::launch_paged_decode<T, D>(p, stream); });
  });
}

}  // namespace fastdecode::kernels
