// Vector helpers of the CPU kernels (mhc_cpu_*.cpp): GCC vector types, blocked loops with
// a bounds-checked tail, loads and stores that convert between the stream and accumulation
// types, and huge-page advice for fresh outputs.
//
// The kernels are compiled once per instruction-set level (MHC_CPU_LEVEL: scalar, avx2, avx512;
// flags in kernels/extension.py) into a library of its own that exports only the table of
// cpu_kernels.h; cpu_dispatch.cpp picks the level at run time. A vector is one register of the
// level (64 bytes under AVX-512, 32 under AVX2, 16 at the portable level), so the number of lanes,
// the SIMD groups of Sinkhorn and the order in which lanes are summed differ between levels (each
// level is deterministic and tested against float64 on its own); AVX2 and AVX-512 also contract
// a * b + c into one fused multiply-add.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mhc_math.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mhc {
namespace cpu {

// The bytes of one hardware vector register at the level being compiled: a GCC vector type wider
// than the hardware's is split into pieces that the compiler shuffles through the stack, which made
// the mappings kernels 8-15x slower at the AVX2 and portable levels when Vec was 64 bytes there.
// Register blocks of the kernels are sized by the level's number of vector registers.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#else
constexpr int kVectorBytes = 16;  // SSE2 (x86-64's baseline), NEON
constexpr int kVectorRegisters = 16;
#endif

// One hardware vector of A, a GCC vector type: arrays of them indexed by compile-time constants stay
// in registers, which plain arrays of A do not reliably do.
template <typename A>
struct VecOf {
  typedef A type __attribute__((vector_size(kVectorBytes)));
};
template <typename A>
using Vec = typename VecOf<A>::type;
template <typename A>
constexpr int kVec = kVectorBytes / sizeof(A);

// Half a hardware vector of A: the last columns of a product whose column count is 1.5 vectors
// (mHC's K = 24 at n = 4 with 16 floats per vector). On CPUs that split a 512-bit FMA into two
// 256-bit halves (AMD Zen 4) it costs half a full vector's FMA; elsewhere the same.
template <typename A>
struct HalfVecOf {
  typedef A type __attribute__((vector_size(kVectorBytes / 2)));
};
template <typename A>
using HalfVec = typename HalfVecOf<A>::type;

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Runs body(c0, len, full) over [0, size) in blocks of W values: full blocks (len == W) pass
// std::true_type, the last partial block std::false_type, so that the loads and stores of full
// blocks compile without bounds checks (load_vec, store_vec).
template <int W, typename F>
void for_blocks(int64_t size, F&& body) {
  int64_t c0 = 0;
  for (; c0 + W <= size; c0 += W) body(c0, W, std::true_type{});
  if (c0 < size) body(c0, static_cast<int>(size - c0), std::false_type{});
}

// kVec values from src as A (kFull), or the first len of them (none if len <= 0) and zeros.
template <typename A, bool kFull, typename S>
Vec<A> load_vec(const S* src, int len) {
  Vec<A> v = {};
  if constexpr (kFull && std::is_same_v<S, A>) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    for (int l = 0; l < (kFull ? kVec<A> : std::min(len, kVec<A>)); ++l) v[l] = static_cast<A>(src[l]);
  }
  return v;
}

// The kVec values of v (kFull), or the first len of them (none if len <= 0), to dst as S.
template <typename A, bool kFull, typename S>
void store_vec(const Vec<A>& v, int len, S* dst) {
  if constexpr (kFull && std::is_same_v<S, A>) {
    std::memcpy(dst, &v, sizeof(v));
  } else {
    for (int l = 0; l < (kFull ? kVec<A> : std::min(len, kVec<A>)); ++l) dst[l] = static_cast<S>(v[l]);
  }
}

// As store_vec, but a full, aligned vector of float or double goes to memory past the caches (a
// non-temporal store): for outputs too large to be read again from cache, it spares reading each
// line before writing it and keeps the caches for the kernel's own working set. Call
// finish_streaming_stores() before the output is read by another thread.
template <typename A, bool kFull, typename S>
void stream_vec(const Vec<A>& v, int len, S* dst) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (kFull && std::is_same_v<S, A> && (std::is_same_v<A, float> || std::is_same_v<A, double>)) {
    if (reinterpret_cast<uintptr_t>(dst) % kVectorBytes == 0) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<A, float>) _mm512_stream_ps(dst, reinterpret_cast<const __m512&>(v));
      else _mm512_stream_pd(dst, reinterpret_cast<const __m512d&>(v));
#else
      if constexpr (std::is_same_v<A, float>) _mm256_stream_ps(dst, reinterpret_cast<const __m256&>(v));
      else _mm256_stream_pd(dst, reinterpret_cast<const __m256d&>(v));
#endif
      return;
    }
  }
#endif
  store_vec<A, kFull>(v, len, dst);
}

inline void finish_streaming_stores() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}

// The sum of the lanes of v, in lane order.
template <typename A>
A sum_lanes(const Vec<A>& v) {
  A total = 0;
  for (int l = 0; l < kVec<A>; ++l) total += v[l];
  return total;
}

// Outputs come from at::empty, untouched: on Linux, ask for transparent huge pages on the 2 MiB
// aligned part of each before the kernel first writes it. Faulting a 64 MiB output in 4 KiB pages
// costs ~30 ms on the development VM, several times the kernel that fills it (docs/performance.md);
// with huge pages, ~4 ms. Does nothing for small tensors or where the kernel ignores the advice.
inline void prefer_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// pre and post_res stream rows of C values one vector at a time (the last one may be partial); the
// per-stream vectors of a token stay in registers for n known at compile time (NT > 0).
template <int NT>
constexpr int kStreamSlots = NT > 0 ? NT : kMaxStreams;

}  // namespace cpu
}  // namespace mhc
