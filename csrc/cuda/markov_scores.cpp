// CUDA wrapper of markov_scores (shared/method.md section 3, "mv"): checks,
// dtype / layout conversion, allocation, and one launch on the current stream.
// The kernel is csrc/cuda/markov_scores_kernel.cu.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "cuda/discrepancy_launch.h"
#include "cuda/markov_scores_kernel.h"

namespace ovss_fast {

at::Tensor markov_scores_cuda(const at::Tensor& q,       // [B, N, C]
                              const at::Tensor& kernel,  // [B, N, N]
                              int64_t sk_iters, int64_t steps, c10::string_view readout, double tau) {
  check_q_and_kernel(q, kernel);
  MarkovScoresParams p{};
  p.sk_iters = sk_iters;
  p.steps = steps;
  p.readout = check_markov_params(sk_iters, steps, std::string(readout), tau);
  p.tau = tau;
  return run_discrepancy("markov_scores", q, kernel, p, markov_scores_scratch_bytes, launch_markov_scores);
}

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) {
  m.impl("markov_scores", &markov_scores_cuda);
}

}  // namespace ovss_fast
