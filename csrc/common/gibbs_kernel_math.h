// method.md section 2: cost and Gibbs kernel from the affinity, shared by
// csrc/cpu/gibbs_kernel.cpp and csrc/cuda/gibbs_kernel_kernel.cu.
//
//   Sym = A / 2 + A^T / 2 (halved first: A + A^T overflows near the float32 maximum),  Craw = -log(Sym + 1e-12)
//   C = (Craw - min Craw) / (max Craw - min Craw)   per image; 0 everywhere if max == min
//   K = exp(-C / eps)
//
// -log is decreasing, so min Craw = -log(max Sym + 1e-12) and max Craw =
// -log(min Sym + 1e-12): the first pass only needs Sym's min and max, and the
// logarithm runs once per element, in the second pass. No torch headers.
#pragma once

#include "hostdevice.h"

namespace ovss_fast {

template <typename T>
HOSTDEVICE T symmetric_affinity(T a_ij, T a_ji) {
  return T(0.5) * a_ij + T(0.5) * a_ji;
}

template <typename T>
HOSTDEVICE T raw_cost(T sym) {
  return -math_log(sym + static_cast<T>(kLogFloor));
}

// lo = min Craw, span = max Craw - min Craw (from Sym's max and min)
template <typename T>
HOSTDEVICE void cost_range(T sym_min, T sym_max, T* lo, T* span) {
  *lo = raw_cost(sym_max);
  *span = raw_cost(sym_min) - *lo;
}

// computed unconditionally, then selected (as the reference's torch.where): branch-free
template <typename T>
HOSTDEVICE T normalised_cost(T sym, T lo, T span) {
  const T c = (raw_cost(sym) - lo) / (span > T(0) ? span : T(1));
  return span > T(0) ? c : T(0);
}

template <typename T>
HOSTDEVICE T gibbs_value(T cost, T eps) {
  return math_exp(-cost / eps);
}

}  // namespace ovss_fast
