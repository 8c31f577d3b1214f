// append_kv: scatter new keys / values into the paged cache through a slot mapping.
// A copy needs no arithmetic, so the kernel moves bytes: it is templated on the copy width only
// (16, 8, 4 or 2 bytes, the widest that the row size, strides and pointers allow), not on dtype.
// Device-side guard: a slot outside [0, N * P) is skipped like a negative one (the public op does
// not copy slot_mapping to the host on CUDA), so no write ever leaves the pool.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace fastdecode::kernels {

namespace detail {

constexpr int kAppendThreads = 128;

// One CTA per token copies its Hkv * D elements of key and value, `Word` (== the copy width) at a
// time. Byte offsets are int64: block * stride overflows int32 in large caches.
template <typename Word>
__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(AppendKVParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.num_slots) return;  // padding token, or guarded
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  constexpr int kWordBytes = static_cast<int>(sizeof(Word));
  const int words_per_head = p.head_dim * p.elem_bytes / kWordBytes;
  const int64_t eb = p.elem_bytes;
  const char* key = static_cast<const char*>(p.key) + token * p.key_stride_token * eb;
  const char* value = static_cast<const char*>(p.value) + token * p.value_stride_token * eb;
  const int64_t dst = (block * p.cache_stride_block + offset * p.cache_stride_token) * eb;
  char* k_dst = static_cast<char*>(p.k_cache) + dst;
  char* v_dst = static_cast<char*>(p.v_cache) + dst;
  for (int i = threadIdx.x; i < p.num_kv_heads * words_per_head; i += kAppendThreads) {
    const int head = i / words_per_head;
    const int64_t word_bytes = static_cast<int64_t>(i % words_per_head) * kWordBytes;
    const int64_t cache_at = head * p.cache_stride_head * eb + word_bytes;
    *reinterpret_cast<Word*>(k_dst + cache_at) =
        *reinterpret_cast<const Word*>(key + head * p.key_stride_head * eb + word_bytes);
    *reinterpret_cast<Word*>(v_dst + cache_at) =
        *reinterpret_cast<const Word*>(value + head * p.value_stride_head * eb + word_bytes);
  }
}

// Whether every address the kernel forms is a multiple of `bytes`.
inline bool aligned_to(const AppendKVParams& p, int64_t bytes) {
  const int64_t eb = p.elem_bytes;
  const int64_t strides[] = {p.key_stride_token, p.key_stride_head, p.value_stride_token,
                             p.value_stride_head, p.cache_stride_block, p.cache_stride_token,
                             p.cache_stride_head, p.head_dim};
  for (int64_t s : strides) {
    if ((s * eb) % bytes) return false;
  }
  const void* ptrs[] = {p.key, p.value, p.k_cache, p.v_cache};
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<uintptr_t>(ptr) % bytes) return false;
  }
  return true;
}

}  // namespace detail

// Launches append_kv on `stream`; the copy width is the widest the layout allows.
inline cudaError_t append_kv(const AppendKVParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.elem_bytes != 2 && p.elem_bytes != 4) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  const dim3 block(detail::kAppendThreads);
  using detail::aligned_to, detail::append_kv_kernel;
  if (aligned_to(p, 16)) return launch(append_kv_kernel<uint4>, grid, block, stream, p);
  if (aligned_to(p, 8)) return launch(append_kv_kernel<uint2>, grid, block, stream, p);
  if (aligned_to(p, 4)) return launch(append_kv_kernel<uint32_t>, grid, block, stream, p);
  return launch(append_kv_kernel<uint16_t>, grid, block, stream, p);
}

}  // namespace fastdecode::kernels
