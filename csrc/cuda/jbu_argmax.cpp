// CUDA wrapper of jbu_argmax (method.md section 4, fused): checks, dtype and layout,
// Gd, allocation of the labels only, one launch on the current stream
// (csrc/cuda/jbu_argmax_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/cuda_call.h"
#include "cuda/jbu_argmax_kernel.h"
#include "cuda/jbu_prepare_cuda.h"

namespace ovss_fast {
namespace {

at::Tensor jbu_argmax_cuda(const at::Tensor& scores,  // [B, C, h, w]
                           const at::Tensor& guide,   // [B, 3, H, W]
                           double sigma_spatial, double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CUDA);
  return on_cuda(scores, "scores", [&](cudaStream_t stream) {
    const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
    at::Tensor labels = at::empty({B, H, W}, scores.options().dtype(at::kLong));
    if (labels.numel() == 0) return labels;
    TORCH_CHECK(C > 0, "scores has C = 0 classes (shape ", shape_str(scores), "): no label to choose");
    const JbuInputs in = prepare_jbu(scores, guide, true);
    const JbuParams p = jbu_params(in, sigma_spatial, sigma_range, radius, labels.mutable_data_ptr());
    check_launch(launch_jbu_argmax(p, stream), "jbu_argmax", "scores ", shape_str(scores), ", guide ",
                 shape_str(guide));
    return labels;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("jbu_argmax", &jbu_argmax_cuda); }

}  // namespace ovss_fast
