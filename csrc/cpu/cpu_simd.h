// Helpers that let the host compiler vectorise the CPU kernels without -ffast-math.
//
// OVSS_CPU_CLONES compiles a hot function for AVX-512, AVX2 and baseline x86-64 and
// picks one at load time (GCC function multiversioning), so one wheel runs everywhere
// and uses wide vectors where the CPU has them. Elsewhere it expands to nothing.
// Lane reductions keep kLanes independent partial results: a plain `s += x[i]` loop
// is a serial dependency chain the compiler may not reorder (IEEE addition is not
// associative), while kLanes partial sums are elementwise work it vectorises.
#pragma once

#include <stdint.h>

#include <cmath>
#include "common/hostdevice.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OVSS_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OVSS_CPU_CLONES
#endif

// the loop bodies a clone calls must be inlined into it, or they run in the baseline build
#if defined(__GNUC__)
#define OVSS_INLINE inline __attribute__((always_inline))
#else
#define OVSS_INLINE inline
#endif

namespace ovss_fast {

constexpr int kLanes = 16;

// One 32-byte vector of T (GCC/Clang vector extensions): the register blocks of the
// small matrix products (cpu/jbu_cpu.h). Each clone maps it to its widest registers
// (two SSE halves in the baseline build); loads and stores go through memcpy (unaligned).
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLen = 8;
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLen = 4;
};
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always inlined: no call passes a vector
#endif
// common/hostdevice.h's math_exp(float) on 8 lanes for x <= 0 (not NaN), operation for operation
// where it matters: the same bits. (Its overflow clamp and NaN select do nothing there, and one
// factor 2^n equals its two, n >= -126: both products round y 2^n once.)
OVSS_INLINE Vec32<float>::type math_exp_nonpositive_x8(Vec32<float>::type x) {
  typedef Vec32<float>::type F;
  const F zero = F{}, lo = zero - 87.33654022216797f;
  const F xc = x < lo ? lo : x;
  const F nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const i32x8 n = __builtin_convertvector(nf, i32x8);
  F y = exp_mantissa(xc, nf);
  y = y * (F)((n + 127) << 23);  // GCC vector cast: the same bits
  return x < lo ? zero : y;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <typename T>
OVSS_INLINE T lane_sum_of_squares(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[i + k] * x[i + k];
  for (int k = 0; i < n; ++i, ++k) acc[k] += x[i] * x[i];
  T s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// sum of (x / scale)^2 (class_distributions_math.h: vectors are scaled by their max |x| first)
template <typename T>
OVSS_INLINE T lane_scaled_sum_of_squares(const T* x, int64_t n, T scale) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const T v = x[i + k] / scale;
      acc[k] += v * v;
    }
  for (int k = 0; i < n; ++i, ++k) {
    const T v = x[i] / scale;
    acc[k] += v * v;
  }
  T s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// max |x| (0 for an empty range)
template <typename T>
OVSS_INLINE T lane_max_abs(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const T v = x[i + k] < T(0) ? -x[i + k] : x[i + k];
      acc[k] = v > acc[k] ? v : acc[k];
    }
  for (int k = 0; i < n; ++i, ++k) {
    const T v = x[i] < T(0) ? -x[i] : x[i];
    acc[k] = v > acc[k] ? v : acc[k];
  }
  T m = 0;
  for (int k = 0; k < kLanes; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

template <typename T>
OVSS_INLINE T lane_sum(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[i + k];
  for (int k = 0; i < n; ++i, ++k) acc[k] += x[i];
  T s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// max over x (no NaN expected); `init` for an empty range
template <typename T>
OVSS_INLINE T lane_max(const T* x, int64_t n, T init) {
  T acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = init;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
  for (int k = 0; i < n; ++i, ++k) acc[k] = x[i] > acc[k] ? x[i] : acc[k];
  T m = init;
  for (int k = 0; k < kLanes; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

}  // namespace ovss_fast
