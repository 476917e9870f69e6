// Argument checks shared by the CPU and CUDA wrappers of sinkhorn_scores and
// markov_scores (host only: includes torch headers, never included by a .cu file).
// Messages name the argument and the shape or value seen (shared/method.md section 5).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "checks.h"
#include "markov_math.h"

namespace ovss_fast {

// q, kernel in their compute dtype (half / bfloat16 computed in float32), contiguous, and the output
// S [B, N, C] shaped like q (CPU and CUDA wrappers alike).
struct DiscrepancyTensors {
  at::Tensor q, kernel, out;
};

inline DiscrepancyTensors prepare_discrepancy(const at::Tensor& q, const at::Tensor& kernel) {
  const auto dt = compute_dtype(q, kernel);
  DiscrepancyTensors t{q.to(dt).contiguous(), kernel.to(dt).contiguous(), {}};
  t.out = at::empty(t.q.sizes(), t.q.options());
  return t;
}

// q [B, N, C], kernel [B, N, N]: ranks, sizes, dtypes and devices.
inline void check_q_and_kernel(const at::Tensor& q, const at::Tensor& kernel) {
  check_rank(q, "q", 3, "[B, N, C]");
  check_rank(kernel, "kernel", 3, "[B, N, N]");
  TORCH_CHECK(kernel.size(1) == kernel.size(2), "kernel should be square [B, N, N], got shape ", shape_str(kernel));
  TORCH_CHECK(q.size(0) == kernel.size(0), "batch size of q (", q.size(0), ") and kernel (", kernel.size(0),
              ") differ: q ", shape_str(q), ", kernel ", shape_str(kernel));
  TORCH_CHECK(q.size(1) == kernel.size(1), "N of q (", q.size(1), ") does not match N of kernel (", kernel.size(1),
              "): q ", shape_str(q), ", kernel ", shape_str(kernel));
  check_floating(q, "q");
  check_floating(kernel, "kernel");
  check_same_device(q, "q", kernel, "kernel");
}

inline void check_sinkhorn_params(double eps, int64_t iters) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK(iters <= (int64_t{1} << 30), "iters is too large, got ", iters);
}

// Returns the readout code; rejects anything but "integrated" / "velocity".
inline int check_markov_params(int64_t sk_iters, int64_t steps, const std::string& readout, double tau) {
  TORCH_CHECK(sk_iters >= 0, "sk_iters must be >= 0, got ", sk_iters);
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", steps);
  TORCH_CHECK(sk_iters <= (int64_t{1} << 30), "sk_iters is too large, got ", sk_iters);
  TORCH_CHECK(steps <= (int64_t{1} << 24), "steps is too large (lstar must stay exact in float32), got ", steps);
  TORCH_CHECK(!std::isnan(tau), "tau must be a number, got ", tau);
  if (readout == "integrated") return kMarkovIntegrated;
  if (readout == "velocity") return kMarkovVelocity;
  TORCH_CHECK(false, "readout must be 'integrated' or 'velocity', got '", readout, "'");
  return -1;
}

}  // namespace ovss_fast
