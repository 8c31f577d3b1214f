// A CPU model of the CUDA execution model, just enough to run fastdecode's kernels without a GPU
// (CI machines have none): the kernel headers compile with g++ against these stand-in CUDA
// headers, and each CTA runs its threads as coroutines (x86-64 stack switching: a system call per
// switch, as ucontext makes, is too slow for 1024-thread CTAs). A coroutine switches only at
// __syncthreads and at warp collectives (shuffles, ballots, matches), which block until every
// lane named in the mask has arrived, as on the hardware. Shared memory is the kernels' static
// locals (`__shared__` -> `static`); CTAs run one after another. Checks indexing, masking,
// reductions and the algorithms; it says nothing about speed or about memory-model races
// that need real concurrency.
//
// Fast math: the GPU build uses --use_fast_math, which turns expf / logf / tanhf into hardware
// approximations. Unless FASTDECODE_EMU_EXACT_MATH is defined, the kernels here see the same
// functions with the documented worst-case error of those approximations (CUDA C++ Programming
// Guide, intrinsic functions; PTX ISA, tanh.approx), in an input-dependent direction, so that a
// kernel whose accuracy depends on an exact library function fails here as it would on the GPU.
// Division (approximate under fast math, within 2 ulp) is not modelled: the kernels use
// __fdiv_rn where an exact quotient matters.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTDECODE_CUDA_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const auto f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned long long __float2ull_rn(float x) {
  return static_cast<unsigned long long>(std::nearbyint(x));
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
using std::isinf;
using std::isnan;

template <typename T>
T atomicAdd(T* at, T v) {
  const T old = *at;  // coroutines never switch inside: atomic by construction
  *at = old + v;
  return old;
}
inline void __threadfence() {}  // CTAs run one after another: every write is visible
// A load through a misaligned pointer faults on the GPU (misaligned address): abort likewise.
template <typename T>
T __ldcg(const T* at) {
  if (reinterpret_cast<std::uintptr_t>(at) % alignof(T) != 0) {
    std::fprintf(stderr, "emulated CUDA: misaligned %zu-byte load\n", sizeof(T));
    std::abort();
  }
  return *at;
}

// Asynchronous copies complete at once; zfill trailing bytes are zeroed as by cp.async.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill = 0) {
  std::memcpy(dst, src, size - zfill);
  std::memset(static_cast<char*>(dst) + size - zfill, 0, zfill);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

#if !defined(__x86_64__)
#error "the CUDA emulator switches stacks with x86-64 assembly"
#endif

// emu_switch(save, next): pushes the callee-saved registers, stores the stack pointer in *save,
// continues on stack `next` (popping what an earlier emu_switch pushed there).
extern "C" void emu_switch(void** save, void* next);
asm(R"(
.text
.globl emu_switch
.type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");

namespace emu {

struct Block {
  dim3 idx, dim, grid;
  std::function<void()> body;
  std::vector<void*> sp;  // saved stack pointer of each thread
  std::vector<std::vector<char>> stacks;
  void* scheduler = nullptr;
  int current = 0, alive = 0;
  int bar_count = 0;
  long bar_gen = 0;
  int bar_or[2] = {0, 0};
  struct Collective {
    long gen = 0;
    int count = 0;
    uint64_t values[2][32];
  };
  std::map<std::pair<int, unsigned>, Collective> collectives;  // (warp, mask) -> state
};
inline Block* block = nullptr;

inline void yield() { emu_switch(&block->sp[block->current], block->scheduler); }

inline void release_barrier_if_complete() {
  Block& b = *block;
  if (b.bar_count > 0 && b.bar_count == b.alive) {
    b.bar_count = 0;
    b.bar_or[(b.bar_gen + 1) & 1] = 0;
    ++b.bar_gen;
  }
}

inline int barrier(int predicate) {
  Block& b = *block;
  const long gen = b.bar_gen;
  b.bar_or[gen & 1] |= predicate;
  ++b.bar_count;
  release_barrier_if_complete();
  while (b.bar_gen == gen) yield();
  return b.bar_or[gen & 1];
}

[[noreturn]] inline void thread_entry() {
  block->body();
  --block->alive;  // exited threads no longer hold barriers back
  release_barrier_if_complete();
  void* unused;
  emu_switch(&unused, block->scheduler);  // never resumed
  std::abort();
}

// Deposits this lane's value and returns all 32 slots once every lane in `mask` has deposited.
inline const uint64_t* collective(unsigned mask, uint64_t value) {
  Block& b = *block;
  const int lane = b.current % 32;
  if (!((mask >> lane) & 1u)) std::abort();  // a lane must name itself in the mask
  Block::Collective& c = b.collectives[{b.current / 32, mask}];
  const long gen = c.gen;
  c.values[gen & 1][lane] = value;
  if (++c.count == __builtin_popcount(mask)) {
    c.count = 0;
    ++c.gen;
  }
  while (c.gen == gen) yield();
  return c.values[gen & 1];
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline int lane() { return block->current % 32; }

// A fresh stack whose first emu_switch "returns" into thread_entry with six zero registers.
inline void start_thread(Block& b, int t) {
  auto top = reinterpret_cast<uintptr_t>(b.stacks[t].data() + b.stacks[t].size()) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top) - 8;  // [6 registers][entry][padding]
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[6] = reinterpret_cast<void*>(&thread_entry);
  frame[7] = nullptr;  // at entry rsp + 8 is 16-byte aligned, as a call leaves it
  b.sp[t] = frame;
}

template <typename Kernel, typename... Args>
void run_grid(Kernel kernel, dim3 grid, dim3 dim, Args... args) {
  const int threads = static_cast<int>(dim.x * dim.y * dim.z);
  Block b;
  b.grid = grid;
  b.dim = dim;
  b.sp.resize(threads);
  b.stacks.assign(threads, std::vector<char>(128 * 1024));
  b.body = [&] { kernel(args...); };
  block = &b;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.idx = dim3(x, y, z);
        b.alive = threads;
        b.bar_count = 0;
        b.collectives.clear();
        for (int t = 0; t < threads; ++t) start_thread(b, t);
        std::vector<bool> done(threads, false);
        for (int finished = 0; finished < threads;) {
          for (int t = 0; t < threads; ++t) {
            if (done[t]) continue;
            b.current = t;
            const int alive_before = b.alive;
            emu_switch(&b.scheduler, b.sp[t]);
            if (b.alive < alive_before) {
              done[t] = true;
              ++finished;
            }
          }
        }
      }
    }
  }
  block = nullptr;
}

}  // namespace emu

struct EmuIndex {
  unsigned x, y, z;
};
#define threadIdx (EmuIndex{static_cast<unsigned>(::emu::block->current), 0u, 0u})
#define blockIdx (EmuIndex{::emu::block->idx.x, ::emu::block->idx.y, ::emu::block->idx.z})
#define gridDim (EmuIndex{::emu::block->grid.x, ::emu::block->grid.y, ::emu::block->grid.z})
#define blockDim (EmuIndex{::emu::block->dim.x, ::emu::block->dim.y, ::emu::block->dim.z})

inline void __syncthreads() { emu::barrier(0); }
inline int __syncthreads_or(int predicate) { return emu::barrier(predicate != 0); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int base = emu::lane() / width * width;
  return emu::from_bits<T>(emu::collective(mask, emu::to_bits(v))[base + src % width]);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = emu::lane(), src = lane ^ lane_mask;
  const uint64_t* all = emu::collective(mask, emu::to_bits(v));
  return src / width == lane / width ? emu::from_bits<T>(all[src]) : v;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = emu::lane(), src = lane + static_cast<int>(delta);
  const uint64_t* all = emu::collective(mask, emu::to_bits(v));
  return src / width == lane / width ? emu::from_bits<T>(all[src]) : v;
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = emu::lane(), src = lane - static_cast<int>(delta);
  const uint64_t* all = emu::collective(mask, emu::to_bits(v));
  return src >= lane / width * width ? emu::from_bits<T>(all[src]) : v;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* all = emu::collective(mask, predicate != 0);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= ((mask >> l) & 1u) && all[l] ? 1u << l : 0u;
  return bits;
}
inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  const uint64_t* all = emu::collective(mask, value);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= ((mask >> l) & 1u) && all[l] == value ? 1u << l : 0u;
  return bits;
}

namespace emu::fast_math {

// +1 or -1 from the input's bits: the direction of the modelled error.
inline float direction(float x) {
  uint32_t u = __float_as_uint(x);
  u ^= u >> 16;
  u *= 0x7feb352du;
  u ^= u >> 15;
  return (u & 1u) ? 1.f : -1.f;
}

// r moved by n units in the last place of r, in the direction chosen for x.
inline float off_by_ulps(float r, float n, float x) {
  if (!std::isfinite(r) || r == 0.f) return r;
  int e;
  std::frexp(r, &e);
  return r + direction(x) * n * std::ldexp(1.f, e - 24);
}

inline float expf(float x) {  // __expf: 2 + floor(|1.173 x|) ulp
  return off_by_ulps(std::exp(x), 2.f + std::floor(std::fabs(1.173f * x)), x);
}
inline float logf(float x) {  // __logf: 2^-21.41 absolute in [0.5, 2], else 3 ulp
  const float r = std::log(x);
  if (x >= 0.5f && x <= 2.f) return r + direction(x) * std::exp2(-21.41f);
  return off_by_ulps(r, 3.f, x);
}
inline float tanhf(float x) {  // tanh.approx.f32: 2^-10.987 relative
  return std::tanh(x) * (1.f + direction(x) * std::exp2(-10.987f));
}

}  // namespace emu::fast_math

#ifndef FASTDECODE_EMU_EXACT_MATH
namespace fastdecode::kernels {  // found before ::expf by the kernels' unqualified calls
using emu::fast_math::expf;
using emu::fast_math::logf;
using emu::fast_math::tanhf;
}  // namespace fastdecode::kernels
#endif

namespace fastdecode::kernels {
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                   const Args&... args) {
  emu::run_grid(kernel, grid, block, static_cast<Params>(args)...);
  return cudaSuccess;
}
}  // namespace fastdecode::kernels
