// CUDA wrapper of kl_scores (method.md section 3, "kl"): checks, dtype and layout,
// allocation, one launch pair on the current stream (csrc/cuda/kl_scores_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/kl_scores_kernel.h"

namespace ovss_fast {
namespace {

at::Tensor kl_scores_cuda(const at::Tensor& q) {  // [B, N, C]
  check_rank(q, "q", 3, "[B, N, C]");
  check_floating(q, "q");
  check_device(q, "q", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
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
  const cudaError_t err = launch_kl_scores(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "kl_scores (CUDA): kernel launch failed: ", cudaGetErrorString(err), " (q ",
              shape_str(q), ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("kl_scores", &kl_scores_cuda); }

}  // namespace ovss_fast
