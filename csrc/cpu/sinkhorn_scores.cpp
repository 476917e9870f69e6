// Optimal-path scores on the CPU (shared/method.md section 3, "op"):
//
//   a = 1 / N;  v = 1;  repeat iters:  u = a / max(K v, 1e-30);  v = q / max(K^T u, 1e-30)
//   f = eps * log(a / max(K v, 1e-30));  S[i, c] = mean_i f[:, c] - f[i, c];  dead class -> -inf
//
// Every class is an independent Sinkhorn problem sharing K, so all C of them move
// together: K v is one [N, N] x [N, C] product per half-iteration. Those products
// are the whole cost (2 N^2 C flops each) and go to the BLAS (at::bmm_out into
// preallocated buffers); the elementwise updates between them are one fused
// parallel pass each (the math in csrc/common/sinkhorn_math.h, shared with CUDA).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/discrepancy_checks.h"
#include "../common/sinkhorn_math.h"

namespace ovss_fast {
namespace {

// Elementwise grain: large enough to amortise a task, small enough to split N*C.
constexpr int64_t kGrain = 16384;

template <typename T>
void sinkhorn_scores_cpu_impl(const at::Tensor& q,       // [B, N, C] contiguous, T
                              const at::Tensor& kernel,  // [B, N, N] contiguous, T
                              double eps, int64_t iters,
                              at::Tensor& out) {         // [B, N, C] contiguous, T
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2);
  const int64_t total = B * N * C;
  const T a = static_cast<T>(1.0 / static_cast<double>(N));
  // K^T as a view, or copied once when small: measured on this project's 2-core AVX-512
  // machine (MKL, 1 thread), the transposed-A path was 1.3x slower at N = 1024, C = 21,
  // but 1.2x faster than a contiguous copy at N = 2304 (C = 21 and 171)
  const bool copy_kt = kernel.size(1) * kernel.size(1) * static_cast<int64_t>(sizeof(T)) <= (int64_t{8} << 20);
  const at::Tensor kt = copy_kt ? kernel.transpose(1, 2).contiguous() : kernel.transpose(1, 2);
  at::Tensor v = at::ones_like(q);    // [B, N, C]
  at::Tensor u = at::empty_like(q);   // [B, N, C]
  at::Tensor prod = at::empty_like(q);  // [B, N, C], holds K v or K^T u
  const T* qp = q.data_ptr<T>();
  T* up = u.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  const T* pp = prod.data_ptr<T>();

  for (int64_t it = 0; it < iters; ++it) {
    at::bmm_out(prod, kernel, v);
    at::parallel_for(0, total, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) up[e] = sinkhorn_u(a, pp[e]);
    });
    at::bmm_out(prod, kt, u);
    at::parallel_for(0, total, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) vp[e] = sinkhorn_v(qp[e], pp[e]);
    });
  }
  at::bmm_out(prod, kernel, v);

  // Readout per (b, class chunk): sweep rows in memory order accumulating the
  // potential's and q's column sums (double: N terms), then write S in a second sweep.
  const T teps = static_cast<T>(eps);
  const T log_a = std::log(a);
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (C + kChunk - 1) / kChunk;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> fsum(kChunk), qsum(kChunk);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks;
      const int64_t c0 = (task % chunks) * kChunk;
      const int64_t nc = std::min(kChunk, C - c0);
      std::fill(fsum.begin(), fsum.end(), 0.0);
      std::fill(qsum.begin(), qsum.end(), 0.0);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t row = (b * N + i) * C + c0;
        for (int64_t c = 0; c < nc; ++c) {
          const T f = sinkhorn_potential(teps, log_a, pp[row + c]);
          op[row + c] = f;
          fsum[c] += static_cast<double>(f);
          qsum[c] += static_cast<double>(qp[row + c]);
        }
      }
      for (int64_t c = 0; c < nc; ++c) fsum[c] /= static_cast<double>(N);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t row = (b * N + i) * C + c0;
        for (int64_t c = 0; c < nc; ++c) {
          op[row + c] = qsum[c] > 0.0 ? static_cast<T>(fsum[c] - static_cast<double>(op[row + c]))
                                      : -std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

}  // namespace

at::Tensor sinkhorn_scores_cpu(const at::Tensor& q,       // [B, N, C]
                               const at::Tensor& kernel,  // [B, N, N]
                               double eps, int64_t iters) {
  check_q_and_kernel(q, kernel);
  check_sinkhorn_params(eps, iters);
  check_device(q, "q", c10::DeviceType::CPU);
  DiscrepancyTensors t = prepare_discrepancy(q, kernel);
  if (t.out.numel() == 0) return t.out;
  if (t.q.scalar_type() == at::kDouble) {
    sinkhorn_scores_cpu_impl<double>(t.q, t.kernel, eps, iters, t.out);
  } else {
    sinkhorn_scores_cpu_impl<float>(t.q, t.kernel, eps, iters, t.out);
  }
  return t.out;
}

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) {
  m.impl("sinkhorn_scores", &sinkhorn_scores_cpu);
}

}  // namespace ovss_fast
