// Markov-chain updates of the maximum-velocity mode (shared/method.md section 3,
// "mv"), shared by the CPU kernel (csrc/cpu/markov_scores.cpp) and the CUDA kernel
// (csrc/cuda/markov_scores_kernel.cu).
//
// Sinkhorn-Knopp in scaling-vector form: T = diag(r) K diag(c), never rewritten.
// Normalising T's rows to sum 1 (floor 1e-30) is r[i] <- r[i] / max(r[i] (K c)[i], floor)
// and its columns c[j] <- c[j] / max(c[j] (K^T r)[j], floor): exactly the reference's
// T / max(rowsum, floor), at the cost of a matrix-vector product instead of an [N, N] pass.
// r and c are computed in double whatever the compute dtype.
//
// Chain, f(0) = N q, f(l) = T^T f(l-1), carried as the deviation from the uniform
// level d(l) = f(l) - 1:
//   d(l) = c * (K^T (r * d(l-1))) + e,   e = T^T 1 - 1 = c * (K^T r) - 1   (e in double)
// The same numbers in exact arithmetic; in float32 it avoids the cancellation in
// f - 1 once the chain has mixed (f -> 1), and keeps T's column-sum rounding out of
// the chain. Carrying f itself, float32 drifts by ~steps^2 * 1e-7 in the integrated
// readout (rel. error 2e-4 .. 4e-4 at N = 784: over the 1e-4 budget).
//   integrated: S = sum_{l=1..steps} d(l)
//   velocity:   lstar = first l >= 1 with |d(l) - d(l-1)| <= tau (steps + 1 if never);
//               S = lstar + f(0) / (1 + f(0))   (the paper: slow settling wins; ties, the
//               same lstar, go to the stronger initial evidence; f(0) / (1 + f(0)) < 1)
// The matrix made doubly stochastic is K (transition "gibbs") or W = Sym / M ("attention",
// built by the ops layer); both are symmetric. W may hold zero rows (a patch without
// affinity): sk_scale_update leaves their scaling alone, as the reference's row of T stays 0.
#pragma once

#include <cmath>

#include "sinkhorn_math.h"

namespace ovss_fast {

// Readout codes shared by the wrappers and kernels.
enum MarkovReadout : int { kMarkovIntegrated = 0, kMarkovVelocity = 1 };

// One IPF scaling update: s <- s / max(s * weighted_sum, floor). A zero weighted sum is a
// zero row (column) of K: that row of T is 0 whatever s is, so s is kept (dividing by the
// floor would multiply it by 1e30 per iteration, to inf, and 0 * inf = NaN in the chain).
template <typename T>
HOSTDEVICE T sk_scale_update(T s, T weighted_sum) {
  return weighted_sum > T(0) ? s / floored(s * weighted_sum) : s;
}

// One chain step for one entry: d(l)[j] = c[j] * (K^T (r * d(l-1)))[j] + e[j].
template <typename T>
HOSTDEVICE T markov_deviation_step(T c, T kt_rd, T e) {
  return c * kt_rd + e;
}

// Velocity readout (on deviations d = f - 1: the same differences): the first step l
// whose change is within tau sets lstar;
// lstar > steps means "not settled yet".
template <typename T>
HOSTDEVICE T velocity_update(T lstar, T d_new, T d_old, T tau, int step, int steps) {
  T diff = d_new - d_old;
  diff = diff < T(0) ? -diff : diff;
  return (diff <= tau && lstar > static_cast<T>(steps)) ? static_cast<T>(step) : lstar;
}

// S = lstar + f0 / (1 + f0): a later settling step always wins; at the same step, the larger f(0)
template <typename T>
HOSTDEVICE T velocity_score(T lstar, T f0) {
  return lstar + f0 / (T(1) + f0);
}

}  // namespace ovss_fast
