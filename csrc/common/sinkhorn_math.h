// Sinkhorn updates of the optimal-path mode (shared/method.md section 3, "op"),
// shared by the CPU kernel (csrc/cpu/sinkhorn_scores.cpp) and the CUDA kernel
// (csrc/cuda/sinkhorn_scores_kernel.cu), so the CPU tests cover the arithmetic
// the GPU runs.
//
//   v = 1;  repeat iters:  u = a / max(K v, 1e-30);  v = q / max(K^T u, 1e-30)
//   f[i] = eps * log(a / max((K v)[i], 1e-30));   S[i] = mean_i(f) - f[i]
//
// No torch headers: this file is compiled by host compilers and by nvcc.
#pragma once

#include <cmath>

#include "hostdevice.h"

namespace ovss_fast {

// method.md: every division floors its denominator at kDenomFloor (hostdevice.h),
// a normal float32 number, so the same constant serves float and double.
template <typename T>
HOSTDEVICE T denom_floor() {
  return static_cast<T>(kDenomFloor);
}

template <typename T>
HOSTDEVICE T floored(T x) {
  return x > denom_floor<T>() ? x : denom_floor<T>();
}

// u[i] = a / max((K v)[i], floor); a = 1 / N is the degenerate source mass.
template <typename T>
HOSTDEVICE T sinkhorn_u(T a, T kv) {
  return a / floored(kv);
}

// v[j] = q[j] / max((K^T u)[j], floor); q[j] the class's target mass at patch j.
template <typename T>
HOSTDEVICE T sinkhorn_v(T q, T ktu) {
  return q / floored(ktu);
}

// Source dual potential f[i] = eps * log(a / max((K v)[i], floor)), computed as
// eps * (log a - log kv): the same value without forming a / kv, which overflows
// float32 where kv sits at the floor (a dead class).
template <typename T>
HOSTDEVICE T sinkhorn_potential(T eps, T log_a, T kv) {
  using std::log;  // float overload on the host; nvcc maps it to the device logf
  return eps * (log_a - log(floored(kv)));
}

}  // namespace ovss_fast
