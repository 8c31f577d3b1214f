// at::vec::Vectorized for the CPU kernels, at the widest ISA the compiler targets.
//
// ATen selects Vectorized's SIMD implementation with CPU_CAPABILITY_* macros that it sets per
// kernel file; an extension that only passes -march=native would silently get the scalar
// fallback. Deriving the capability from the compiler's target macros here gives AVX-512 / AVX2
// registers. The inline namespace at::vec::CPU_CAPABILITY keeps these instantiations apart from
// any other translation unit's. Include this header before any other ATen / c10 header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
