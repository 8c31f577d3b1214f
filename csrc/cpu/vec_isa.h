// Include first in any CPU kernel that uses at::vec::Vectorized.
//
// ATen's Vectorized<T> picks its SIMD implementation from CPU_CAPABILITY_* macros that torch
// defines only while compiling its own per-ISA kernels; without them it silently falls back to
// scalar loops (and scalar exp). The extension is built for the machine that runs it
// (-march=native), so map the compiler's ISA macros onto torch's. CPU_CAPABILITY names the inline
// namespace exactly as torch's own AVX2 / AVX512 kernels do, so no two definitions of
// at::vec::<ns>::Vectorized differ. The vectorised exp calls Sleef, exported by libtorch_cpu.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
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
