// HOSTDEVICE: inline functions that both the host compiler (CPU kernels) and nvcc
// (CUDA kernels) compile, so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define HOSTDEVICE __host__ __device__ __forceinline__
#else
#define HOSTDEVICE inline
#endif

#include <stdint.h>
#include <string.h>

#include <cmath>

namespace ovss_fast {

// method.md section 3: divisions floor their denominators here (a normal float32)
constexpr double kDenomFloor = 1e-30;
// method.md section 2: added to the symmetrised affinity before the log
constexpr double kLogFloor = 1e-12;

}  // namespace ovss_fast

namespace ovss_fast {

// float32 exp and log: Cephes-style range reduction and minimax polynomials (about
// 1 ulp) written branch-free, so that
//   - host compilers vectorise the loops that call them (libm's expf / logf are
//     opaque calls, which kept the CPU kernels scalar), and
//   - CPU and CUDA kernels compute bit-identical values (no contraction into FMA:
//     setup.py passes -ffp-contract=off and --fmad=false).
// double keeps libm / CUDA's exp and log.
HOSTDEVICE int32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

HOSTDEVICE float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

// exp(x) / 2^n for x = n ln2 + r (nf = n as a float): r with ln2 split in two so n ln2 is exact
// enough, then the polynomial. A template so cpu_simd.h's 8-lane exp runs the same operations
// on vectors (F = float or a GCC float vector).
template <typename F>
HOSTDEVICE F exp_mantissa(F xc, F nf) {
  F r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  const F z = r * r;
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * z + r + 1.0f;
}

HOSTDEVICE float math_exp(float x) {
  const float hi = 88.72283935546875f;    // above: overflow to +inf
  const float lo = -87.33654022216797f;   // below: the result is not a normal float, flushed to 0
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // x = n ln2 + r, |r| <= ln2 / 2; ln2 split in two so n ln2 is exact enough
  // n = round(x / ln2) by the 1.5 * 2^23 trick (|x / ln2| < 2^22; exact, and branch-free,
  // which a float -> int -> float floor is not once compilers pattern-match it)
  const float nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const int32_t n = static_cast<int32_t>(nf);
  float y = exp_mantissa(xc, nf);
  // 2^n as two normal factors (n in [-126, 128])
  const int32_t n1 = n >> 1, n2 = n - n1;
  y = y * bits_to_float((n1 + 127) << 23);
  y = y * bits_to_float((n2 + 127) << 23);
  y = x > hi ? bits_to_float(0x7f800000) : y;
  y = x < lo ? 0.0f : y;
  return x != x ? x : y;  // NaN stays NaN
}

HOSTDEVICE float math_log(float x) {
  // subnormals: scale into the normal range first
  const bool tiny = x < 1.17549435e-38f;
  const float scaled = x * 8388608.0f;  // * 2^23
  const float xs = tiny ? scaled : x;
  const int32_t bits = float_to_bits(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126 - (tiny ? 23 : 0);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  // m in [sqrt(1/2), sqrt(2)) after this, minus 1
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float m_low = (m + m) - 1.0f, m_high = m - 1.0f;
  m = low ? m_low : m_high;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = static_cast<float>(e);
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = m + y;
  r = r + ef * 0.693359375f;
  r = x == bits_to_float(0x7f800000) ? x : r;                  // log(+inf) = +inf
  r = x == 0.0f ? -bits_to_float(0x7f800000) : r;             // log(0) = -inf
  r = (x < 0.0f || x != x) ? bits_to_float(0x7fc00000) : r;   // log(<0) = log(NaN) = NaN
  return r;
}

HOSTDEVICE double math_log(double x) { return log(x); }
HOSTDEVICE double math_exp(double x) { return exp(x); }
HOSTDEVICE float math_sqrt(float x) { return sqrtf(x); }
HOSTDEVICE double math_sqrt(double x) { return sqrt(x); }
HOSTDEVICE float math_floor(float x) { return floorf(x); }
HOSTDEVICE double math_floor(double x) { return floor(x); }

template <typename T>
HOSTDEVICE T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// max(x, 1e-30): the floor every denominator of method.md gets
template <typename T>
HOSTDEVICE T clamp_denominator(T x) {
  return x > static_cast<T>(kDenomFloor) ? x : static_cast<T>(kDenomFloor);
}

}  // namespace ovss_fast
