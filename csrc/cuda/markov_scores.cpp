// CUDA wrapper of markov_scores (shared/method.md section 3, "mv"): checks,
// dtype / layout conversion, allocation, and one launch on the current stream.
// The kernel is csrc/cuda/markov_scores_kernel.cu.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../common/discrepancy_checks.h"
#include "discrepancy_launch.h"
#include "markov_scores_kernel.h"

namespace ovss_fast {

at::Tensor markov_scores_cuda(const at::Tensor& q,       // [B, N, C]
                              const at::Tensor& kernel,  // [B, N, N]
                              int64_t sk_iters, int64_t steps, c10::string_view readout, double tau) {
  check_q_and_kernel(q, kernel);
  const int code = check_markov_params(sk_iters, steps, std::string(readout), tau);
  check_device(q, "q", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto dt = compute_dtype(q, kernel);
  const at::Tensor qc = q.to(dt).contiguous();       // half / bfloat16 computed in float32
  const at::Tensor kc = kernel.to(dt).contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  if (out.numel() == 0) return out;

  MarkovScoresParams p{};
  p.q = qc.data_ptr();
  p.kernel = kc.data_ptr();
  p.out = out.data_ptr();
  p.B = qc.size(0);
  p.N = qc.size(1);
  p.C = qc.size(2);
  p.sk_iters = sk_iters;
  p.steps = steps;
  p.readout = code;
  p.tau = tau;
  p.is_double = dt == at::kDouble;
  const size_t scratch_bytes = markov_scores_scratch_bytes(p);
  at::Tensor scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, qc.options().dtype(at::kByte));
  p.scratch = scratch.data_ptr();
  check_discrepancy_launch(launch_markov_scores(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
                           "markov_scores", p.B, p.N, p.C);
  return out;
}

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) {
  m.impl("markov_scores", &markov_scores_cuda);
}

}  // namespace ovss_fast
