// method.md section 3, mode "kl": the per-patch term of KL(Q || 1/N),
//   S[i, c] = Q[i, c] * log(N * Q[i, c]),  0 where Q = 0,  -inf for a dead column
// (a class whose Q column is all zero). Shared by csrc/cpu/kl_scores.cpp and
// csrc/cuda/kl_scores_kernel.cu. No torch headers.
#pragma once

#include "hostdevice.h"

namespace ovss_fast {

// n is the patch count N in the compute dtype; alive says whether the column has mass
template <typename T>
HOSTDEVICE T kl_term(T q, T n, bool alive) {
  const T term = q * math_log(n * (q > T(0) ? q : T(1)));  // branch-free: log of a safe value
  const T s = q > T(0) ? term : T(0);
  return alive ? s : neg_inf<T>();
}

}  // namespace ovss_fast
