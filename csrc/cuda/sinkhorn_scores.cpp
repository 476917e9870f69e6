// CUDA wrapper of sinkhorn_scores (shared/method.md section 3, "op"): checks,
// dtype / layout conversion, allocation, and one launch on the current stream.
// The kernel is csrc/cuda/sinkhorn_scores_kernel.cu.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda/discrepancy_launch.h"
#include "cuda/sinkhorn_scores_kernel.h"

namespace ovss_fast {

at::Tensor sinkhorn_scores_cuda(const at::Tensor& q,       // [B, N, C]
                                const at::Tensor& kernel,  // [B, N, N]
                                double eps, int64_t iters) {
  check_q_and_kernel(q, kernel);
  check_sinkhorn_params(eps, iters);
  SinkhornScoresParams p{};
  p.eps = eps;
  p.iters = iters;
  return run_discrepancy("sinkhorn_scores", q, kernel, p, sinkhorn_scores_scratch_bytes, launch_sinkhorn_scores);
}

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) {
  m.impl("sinkhorn_scores", &sinkhorn_scores_cuda);
}

}  // namespace ovss_fast
