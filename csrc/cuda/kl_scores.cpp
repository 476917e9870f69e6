// CUDA wrapper of kl_scores (method.md section 3, "kl"): checks, dtype and layout,
// allocation, one launch pair on the current stream (csrc/cuda/kl_scores_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/cuda_call.h"
#include "cuda/kl_scores_kernel.h"

namespace ovss_fast {
namespace {

at::Tensor kl_scores_cuda(const at::Tensor& q) {  // [B, N, C]
  check_rank(q, "q", 3, "[B, N, C]");
  check_floating(q, "q");
  return on_cuda(q, "q", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(q);
    const at::Tensor qc = prepare(q, dt);
    at::Tensor out = at::empty(qc.sizes(), qc.options());
    if (out.numel() == 0) return out;
    at::Tensor alive = at::empty({qc.size(0), qc.size(2)}, qc.options().dtype(at::kByte));
    KlScoresParams p{};
    p.q = qc.const_data_ptr();
    p.out = out.mutable_data_ptr();
    p.alive = static_cast<unsigned char*>(alive.mutable_data_ptr());
    p.B = qc.size(0);
    p.N = qc.size(1);
    p.C = qc.size(2);
    p.is_double = dt == at::kDouble;
    check_launch(launch_kl_scores(p, stream), "kl_scores", "q ", shape_str(q));
    return out;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("kl_scores", &kl_scores_cuda); }

}  // namespace ovss_fast
