// The batched conjugate gradient of LPOSS / LPOSS+ on the CPU (common/propagation_math.h has its per-class
// scalars; the spec: reference.propagation_cg): (I - alpha S) x = b for b [n, C], a node's classes
// contiguous, all classes at once, each with its own scalars and its own stop, x0 = 0.
// The caller gives the product: matvec(blk, p, q, pq) writes q = p - alpha S p for the rows of block blk
// (rows [blk * block, min(n, (blk + 1) * block))) and pq[c] = sum over those rows of p_ic q_ic. Per-class
// sums are taken per block in double and then over blocks in a fixed order: the result does not depend on the
// thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/propagation_math.h"

namespace ovss_fast {

// The CG's vectors hold each node's classes padded to a multiple of 8 (zero classes, which stop at once), so
// the loops over classes run whole vectors: [n, C] -> [n, padded_classes(C)], on the last dimension.
inline int64_t padded_classes(int64_t C) { return (C + 7) / 8 * 8; }
inline at::Tensor pad_classes(const at::Tensor& t) {
  const int64_t C = t.size(-1), Cp = padded_classes(C);
  return Cp == C ? t : at::constant_pad_nd(t, {0, Cp - C}, 0).contiguous();
}

// The CG's four [n, C] vectors, the caller's buffers (uninitialised memory is fine): r holds b on entry and the
// last residual on return, x the solution; p and q are scratch. First touched here, by the threads that use them.
template <typename T>
struct CgVectors {
  T* r;
  T* x;
  T* p;
  T* q;
};

template <typename T, typename Matvec>
void batched_cg_cpu(const Matvec& matvec, CgVectors<T> v, int64_t n, int64_t C, int64_t block, int64_t iters,
                    T tol) {
  const int64_t blocks = (n + block - 1) / block;
  T* const x = v.x;
  T* const r = v.r;
  T* const p = v.p;
  T* const q = v.q;
  std::vector<double> part(blocks * C), sum(C);
  auto reduce = [&]() {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t k = 0; k < blocks; ++k)
      for (int64_t c = 0; c < C; ++c) sum[c] += part[k * C + c];
  };
  auto rows = [&](int64_t k) { return std::make_pair(k * block, std::min(n, (k + 1) * block)); };
  // p = r = b, x = 0, ||b||^2
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* pk = part.data() + k * C;
      std::fill(pk, pk + C, 0.0);
      const auto [i0, i1] = rows(k);
      std::fill(x + i0 * C, x + i1 * C, T(0));
      std::copy(r + i0 * C, r + i1 * C, p + i0 * C);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t c = 0; c < C; ++c) pk[c] += static_cast<double>(r[i * C + c]) * static_cast<double>(r[i * C + c]);
    }
  });
  reduce();
  std::vector<T> rho(C), atol(C), step(C), beta(C);
  std::vector<uint8_t> active(C);
  bool any = false;
  for (int64_t c = 0; c < C; ++c) {
    rho[c] = static_cast<T>(sum[c]);
    atol[c] = tol * math_sqrt(rho[c]);
    active[c] = rho[c] > T(0);
    any = any || active[c];
  }
  for (int64_t it = 0; it < iters && any; ++it) {
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) matvec(k, p, q, part.data() + k * C);
    });
    reduce();
    for (int64_t c = 0; c < C; ++c) step[c] = cg_step<T>(active[c], rho[c], static_cast<T>(sum[c]));
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double* pk = part.data() + k * C;
        std::fill(pk, pk + C, 0.0);
        const auto [i0, i1] = rows(k);
        for (int64_t i = i0; i < i1; ++i) {
          T* xi = x + i * C;
          T* ri = r + i * C;
          const T* pi = p + i * C;
          const T* qi = q + i * C;
          for (int64_t c = 0; c < C; ++c) {
            xi[c] += step[c] * pi[c];
            ri[c] -= step[c] * qi[c];
            pk[c] += static_cast<double>(ri[c]) * static_cast<double>(ri[c]);
          }
        }
      }
    });
    reduce();
    any = false;
    for (int64_t c = 0; c < C; ++c) {
      const T rho_new = static_cast<T>(sum[c]);
      active[c] = cg_continues<T>(active[c], rho_new, atol[c]);
      beta[c] = cg_beta<T>(active[c], rho_new, rho[c]);
      rho[c] = rho_new;
      any = any || active[c];
    }
    if (!any || it + 1 == iters) break;  // no next step: p is not needed
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      const auto i0 = rows(k0).first, i1 = rows(k1 - 1).second;
      for (int64_t i = i0; i < i1; ++i) {
        T* pi = p + i * C;
        const T* ri = r + i * C;
        for (int64_t c = 0; c < C; ++c) pi[c] = active[c] ? ri[c] + beta[c] * pi[c] : T(0);
      }
    });
  }
}

}  // namespace ovss_fast
