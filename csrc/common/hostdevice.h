// HOSTDEVICE: inline functions that both the host compiler (CPU kernels) and nvcc
// (CUDA kernels) compile, so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define HOSTDEVICE __host__ __device__ __forceinline__
#else
#define HOSTDEVICE inline
#endif

#include <cmath>

namespace ovss_fast {

// method.md section 3: divisions floor their denominators here (a normal float32)
constexpr double kDenomFloor = 1e-30;
// method.md section 2: added to the symmetrised affinity before the log
constexpr double kLogFloor = 1e-12;

}  // namespace ovss_fast

namespace ovss_fast {

// Overloads that resolve to the single-precision functions for float and the
// double ones for double, identically in host code and CUDA device code.
HOSTDEVICE float math_log(float x) { return logf(x); }
HOSTDEVICE double math_log(double x) { return log(x); }
HOSTDEVICE float math_exp(float x) { return expf(x); }
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
