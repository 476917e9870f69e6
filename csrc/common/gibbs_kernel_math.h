// method.md section 2: cost and Gibbs kernel from the affinity, shared by
// csrc/cpu/gibbs_kernel.cpp and csrc/cuda/gibbs_kernel_kernel.cu.
//
//   Sym = A / 2 + A^T / 2 (halved first: A + A^T overflows near the float32 maximum)
//   M = max Sym per image;  Craw = -log(Sym / M + 1e-12)   (scale-free; M == 0: Sym / 1, all 0, so C = 0)
//   C = (Craw - min Craw) / (max Craw - min Craw)   per image; 0 everywhere if max == min
//   K = exp(-C / eps)
//
// -log is decreasing, so min Craw = -log(max Sym / M + 1e-12) and max Craw =
// -log(min Sym / M + 1e-12): the first pass only needs Sym's min and max (M is the
// max), and the logarithm runs once per element, in the second pass. No torch headers.
#pragma once

#include "hostdevice.h"

namespace ovss_fast {

template <typename T>
HOSTDEVICE T symmetric_affinity(T a_ij, T a_ji) {
  return T(0.5) * a_ij + T(0.5) * a_ji;
}

// what Sym is divided by: its per-image max M, or 1 where M == 0 (Sym is then all 0)
template <typename T>
HOSTDEVICE T affinity_scale(T sym_max) {
  return sym_max > T(0) ? sym_max : T(1);
}

template <typename T>
HOSTDEVICE T raw_cost(T sym, T scale) {
  return -math_log(sym / scale + static_cast<T>(kLogFloor));
}

// From Sym's min and max: scale = M (affinity_scale), lo = min Craw, span = max Craw - min Craw
template <typename T>
HOSTDEVICE void cost_range(T sym_min, T sym_max, T* scale, T* lo, T* span) {
  *scale = affinity_scale(sym_max);
  *lo = raw_cost(sym_max, *scale);
  *span = raw_cost(sym_min, *scale) - *lo;
}

// computed unconditionally, then selected (as the reference's torch.where): branch-free
template <typename T>
HOSTDEVICE T normalised_cost(T sym, T scale, T lo, T span) {
  const T c = (raw_cost(sym, scale) - lo) / (span > T(0) ? span : T(1));
  return span > T(0) ? c : T(0);
}

template <typename T>
HOSTDEVICE T gibbs_value(T cost, T eps) {
  return math_exp(-cost / eps);
}

}  // namespace ovss_fast
