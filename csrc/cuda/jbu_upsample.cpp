// CUDA wrapper of jbu_upsample (method.md section 4): checks, dtype and layout,
// Gd, allocation, one launch on the current stream (csrc/cuda/jbu_upsample_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/jbu_prepare_cuda.h"
#include "cuda/cuda_call.h"
#include "cuda/jbu_upsample_kernel.h"

namespace ovss_fast {
namespace {

at::Tensor jbu_upsample_cuda(const at::Tensor& scores,  // [B, C, h, w]
                             const at::Tensor& guide,   // [B, 3, H, W]
                             double sigma_spatial, double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CUDA);
  return on_cuda(scores, "scores", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(scores, guide);
    const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
    at::Tensor out = at::empty({B, C, H, W}, scores.options().dtype(dt));
    if (out.numel() == 0) return out;
    const JbuInputs in = prepare_jbu(scores, guide, true);
    const JbuParams p = jbu_params(in, sigma_spatial, sigma_range, radius, out.mutable_data_ptr());
    check_launch(launch_jbu_upsample(p, stream), "jbu_upsample", "scores ", shape_str(scores), ", guide ",
                 shape_str(guide));
    return out;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("jbu_upsample", &jbu_upsample_cuda); }

}  // namespace ovss_fast
