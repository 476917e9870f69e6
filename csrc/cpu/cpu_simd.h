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
