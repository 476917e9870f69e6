// Maximum-velocity scores on the CPU (shared/method.md section 3, "mv"):
//
//   T = K;  sk_iters times: rows of T to sum 1, then columns (floor 1e-30)
//   (K is the `kernel` argument: the Gibbs kernel, or W = Sym / M for transition "attention")
//   f(0) = N q;  f(l) = T^T f(l-1);  integrated: S = sum_{l=1..steps} (f(l) - 1)
//   velocity: lstar = first l >= 1 with |f(l) - f(l-1)| <= tau (steps+1 if never),
//             S = lstar + f(0) / (1 + f(0))   (slow settling wins; ties to the larger f(0))
//   a class whose q column sums to 0 -> -inf
//
// T is kept as scaling vectors, T = diag(r) K diag(c), computed in double by our
// own matrix-vector passes (each IPF half-step reads K once; T is never written).
// The chain is carried as the deviation d = f - 1 (csrc/common/markov_math.h
// explains why float32 needs it): d(l) = c * (K^T (r * d(l-1))) + e, one
// [N, N] x [N, C] product in the BLAS (at::bmm_out) and one fused parallel pass that
// scales, accumulates the readout and prepares the next product's input.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "../common/discrepancy_checks.h"
#include "../common/markov_math.h"

namespace ovss_fast {
namespace {

constexpr int64_t kGrain = 16384;
// columns per task of the K^T x pass: 512 double accumulators stay in L1
constexpr int64_t kColBlock = 512;

// out[b, i] = sum_j K[b, i, j] x[b, j], accumulated in double; parallel over rows.
template <typename T>
void rows_times(const T* K,       // [B, N, N]
                const double* x,  // [B, N]
                double* out,      // [B, N]
                int64_t B, int64_t N) {
  at::parallel_for(0, B * N, std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const T* row = K + bi * N;
      const double* xb = x + (bi / N) * N;
      // 8 independent partial sums: the compiler may not reorder one floating-point
      // reduction, and a single accumulator runs at one add per add-latency
      double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t j = 0;
      for (; j + 8 <= N; j += 8) {
        for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(row[j + u]) * xb[j + u];
      }
      for (; j < N; ++j) acc[0] += static_cast<double>(row[j]) * xb[j];
      out[bi] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  });
}

// out[b, j] = sum_i K[b, i, j] x[b, i], accumulated in double; parallel over column
// blocks, each sweeping K's rows in memory order.
template <typename T>
void cols_times(const T* K,       // [B, N, N]
                const double* x,  // [B, N]
                double* out,      // [B, N]
                int64_t B, int64_t N) {
  const int64_t blocks = (N + kColBlock - 1) / kColBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / blocks;
      const int64_t j0 = (task % blocks) * kColBlock;
      const int64_t nj = std::min(kColBlock, N - j0);
      double* acc = out + b * N + j0;
      std::fill(acc, acc + nj, 0.0);
      const T* Kb = K + b * N * N + j0;
      const double* xb = x + b * N;
      for (int64_t i = 0; i < N; ++i) {
        const T* row = Kb + i * N;
        const double xi = xb[i];
        for (int64_t j = 0; j < nj; ++j) acc[j] += static_cast<double>(row[j]) * xi;
      }
    }
  });
}

// Sinkhorn-Knopp scaling vectors r, c with diag(r) K diag(c) the reference's
// doubly_stochastic(K, sk_iters), and e = T^T 1 - 1 (T's column sums minus 1).
template <typename T>
void sk_scalings(const T* K, int64_t B, int64_t N, int64_t sk_iters, std::vector<double>& r, std::vector<double>& c,
                 std::vector<double>& e) {
  std::vector<double> prod(B * N);
  r.assign(B * N, 1.0);
  c.assign(B * N, 1.0);
  e.assign(B * N, 0.0);
  const int64_t total = B * N;
  for (int64_t s = 0; s < sk_iters; ++s) {
    rows_times(K, c.data(), prod.data(), B, N);  // row sums of T are r * (K c)
    for (int64_t k = 0; k < total; ++k) r[k] = sk_scale_update(r[k], prod[k]);
    cols_times(K, r.data(), prod.data(), B, N);  // column sums of T are c * (K^T r)
    for (int64_t k = 0; k < total; ++k) c[k] = sk_scale_update(c[k], prod[k]);
  }
  // T's column sums with the final r, c; after an IPF step K^T r is what the last
  // column update saw, so this pass is needed only without one
  if (sk_iters == 0) cols_times(K, r.data(), prod.data(), B, N);
  for (int64_t k = 0; k < total; ++k) e[k] = c[k] * prod[k] - 1.0;
}

template <typename T>
void markov_scores_cpu_impl(const at::Tensor& q,       // [B, N, C] contiguous, T
                            const at::Tensor& kernel,  // [B, N, N] contiguous, T
                            int64_t sk_iters, int64_t steps, int readout, double tau,
                            at::Tensor& out) {         // [B, N, C] contiguous, T
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  const int64_t rows = B * N;
  std::vector<double> rd, cd, ed;
  sk_scalings<T>(kernel.data_ptr<T>(), B, N, sk_iters, rd, cd, ed);
  std::vector<T> rv(rows), cv(rows), ev(rows);  // in the compute dtype, for the chain
  for (int64_t k = 0; k < rows; ++k) {
    rv[k] = static_cast<T>(rd[k]);
    cv[k] = static_cast<T>(cd[k]);
    ev[k] = static_cast<T>(ed[k]);
  }
  const T* rp = rv.data();
  const T* cp = cv.data();
  const T* ep = ev.data();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();  // the accumulator (integrated) or lstar (velocity)

  // K^T as a view, or copied once when small: measured on this project's 2-core AVX-512
  // machine (MKL, 1 thread), the transposed-A path was 1.3x slower at N = 1024, C = 21,
  // but 1.2x faster than a contiguous copy at N = 2304 (C = 21 and 171)
  const bool copy_kt = kernel.size(1) * kernel.size(1) * static_cast<int64_t>(sizeof(T)) <= (int64_t{8} << 20);
  const at::Tensor kt = copy_kt ? kernel.transpose(1, 2).contiguous() : kernel.transpose(1, 2);
  at::Tensor h = at::empty_like(q);     // [B, N, C]: r * d(l-1), the product's input
  at::Tensor prod = at::empty_like(q);  // [B, N, C]: K^T h
  at::Tensor dprev;                     // [B, N, C]: d(l-1), velocity only
  T* hp = h.data_ptr<T>();
  const T* pp = prod.data_ptr<T>();
  T* dp = nullptr;
  const bool velocity = readout == kMarkovVelocity;
  if (velocity) {
    dprev = at::empty_like(q);
    dp = dprev.data_ptr<T>();
  }
  const T tn = static_cast<T>(N);
  const T ttau = static_cast<T>(tau);
  const int isteps = static_cast<int>(steps);
  const T never = static_cast<T>(steps + 1);
  // a grain in rows so that each task sees whole rows (r, c, e are per row)
  const int64_t row_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));

  at::parallel_for(0, rows, row_grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t k = i * C; k < (i + 1) * C; ++k) {
        const T d0 = tn * qp[k] - T(1);
        hp[k] = rp[i] * d0;
        if (velocity) {
          dp[k] = d0;
          op[k] = never;
        } else {
          op[k] = T(0);
        }
      }
    }
  });
  for (int64_t l = 1; l <= steps; ++l) {
    at::bmm_out(prod, kt, h);
    const int step = static_cast<int>(l);
    at::parallel_for(0, rows, row_grain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T ci = cp[i], ri = rp[i], ei = ep[i];
        for (int64_t k = i * C; k < (i + 1) * C; ++k) {
          const T d = markov_deviation_step(ci, pp[k], ei);
          if (velocity) {
            op[k] = velocity_update(op[k], d, dp[k], ttau, step, isteps);
            dp[k] = d;
          } else {
            op[k] += d;
          }
          hp[k] = ri * d;
        }
      }
    });
  }

  // readout and dead classes, per (b, class chunk)
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (C + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> qsum(kChunk);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks;
      const int64_t c0 = (task % chunks) * kChunk;
      const int64_t nc = std::min(kChunk, C - c0);
      std::fill(qsum.begin(), qsum.end(), 0.0);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t row = (b * N + i) * C + c0;
        for (int64_t k = 0; k < nc; ++k) qsum[k] += static_cast<double>(qp[row + k]);
      }
      for (int64_t i = 0; i < N; ++i) {
        const int64_t row = (b * N + i) * C + c0;
        for (int64_t k = 0; k < nc; ++k) {
          T s = op[row + k];
          if (velocity) s = velocity_score(s, tn * qp[row + k]);
          op[row + k] = qsum[k] > 0.0 ? s : -std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

}  // namespace

at::Tensor markov_scores_cpu(const at::Tensor& q,       // [B, N, C]
                             const at::Tensor& kernel,  // [B, N, N]
                             int64_t sk_iters, int64_t steps, c10::string_view readout, double tau) {
  check_q_and_kernel(q, kernel);
  const int code = check_markov_params(sk_iters, steps, std::string(readout), tau);
  check_device(q, "q", c10::DeviceType::CPU);
  DiscrepancyTensors t = prepare_discrepancy(q, kernel);
  if (t.out.numel() == 0) return t.out;
  if (t.q.scalar_type() == at::kDouble) {
    markov_scores_cpu_impl<double>(t.q, t.kernel, sk_iters, steps, code, tau, t.out);
  } else {
    markov_scores_cpu_impl<float>(t.q, t.kernel, sk_iters, steps, code, tau, t.out);
  }
  return t.out;
}

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) {
  m.impl("markov_scores", &markov_scores_cpu);
}

}  // namespace ovss_fast
