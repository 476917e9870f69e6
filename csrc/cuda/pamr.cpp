// CUDA wrapper of pamr (csrc/common/pamr_math.h): checks, the resized scores and the two step buffers
// (common/pamr_checks.h), the affinity scratch and the dilations on the device, then the launches on
// the current stream (csrc/cuda/pamr_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/pamr_checks.h"
#include "cuda/cuda_call.h"
#include "cuda/pamr_kernel.h"

namespace ovss_fast {
namespace {

at::Tensor pamr_cuda(const at::Tensor& scores,  // [B, C, h, w]
                     const at::Tensor& image,   // [B, K, H, W]
                     int64_t iters, c10::IntArrayRef dilations) {
  check_pamr_args(scores, image, iters, dilations, c10::DeviceType::CUDA);
  return on_cuda(scores, "scores", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(scores, image);
    const int64_t B = scores.size(0), C = scores.size(1), H = image.size(2), W = image.size(3);
    if (B * C * H * W == 0) return at::empty({B, C, H, W}, scores.options().dtype(dt));
    PamrTensors t = prepare_pamr(scores, image, iters, dilations);
    if (iters == 0) return pamr_result(t, 0);
    const int64_t nd = static_cast<int64_t>(dilations.size());
    at::Tensor aff64 = at::empty({B, 8 * nd, H, W}, t.image.options());
    at::Tensor dil_host = at::empty({nd}, at::TensorOptions().dtype(at::kLong));
    for (int64_t i = 0; i < nd; ++i) dil_host.mutable_data_ptr<int64_t>()[i] = dilations[i];
    const at::Tensor dil = dil_host.to(t.m0.device());
    PamrParams p{};
    p.image = t.image.const_data_ptr<double>();
    p.scores = t.m0.const_data_ptr();
    p.ping = t.ping.mutable_data_ptr();
    p.pong = t.pong.defined() ? t.pong.mutable_data_ptr() : nullptr;  // undefined only when iters == 1
    p.affinity64 = aff64.mutable_data_ptr<double>();
    p.dilations = dil.const_data_ptr<int64_t>();
    p.B = B;
    p.C = C;
    p.K = t.image.size(1);
    p.H = H;
    p.W = W;
    p.nd = static_cast<int>(nd);
    p.iters = iters;
    p.is_double = dt == at::kDouble;
    check_launch(launch_pamr_affinity(p, stream), "pamr", "image ", shape_str(image));
    const at::Tensor aff = aff64.to(dt);  // rounded once, on the current stream (a no-op in double)
    aff64 = at::Tensor();
    p.affinity = aff.const_data_ptr();
    check_launch(launch_pamr_steps(p, stream), "pamr", "scores ", shape_str(scores), ", image ", shape_str(image));
    return pamr_result(t, iters);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("pamr", &pamr_cuda); }

}  // namespace ovss_fast
