// Philox4x32-10 counter-based RNG shared by the CPU and CUDA sampling kernels (and mirrored by
// fastdecode.ops.torch_backend.philox_uniform and the Triton kernels), so a seeded row draws the
// same uniform on every backend: key = (seed low, seed high), counter = (offset low, offset high,
// 0, 0), uniform = (x0 >> 8) * 2^-24 in [0, 1). Header-only, no torch, builds with nvcc or g++.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDECODE_HD __host__ __device__ __forceinline__
#else
#define FASTDECODE_HD inline
#endif

namespace fastdecode {

FASTDECODE_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Returns the first 32-bit output word of Philox4x32-10.
FASTDECODE_HD uint32_t philox_x0(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform float in [0, 1) with 24 random bits (exactly representable in float32).
FASTDECODE_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return static_cast<float>(philox_x0(seed, offset) >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fastdecode
