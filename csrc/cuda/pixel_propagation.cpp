// CUDA wrapper of pixel_propagation (LPOSS+'s pixel stage; csrc/cuda/pixel_propagation_kernel.cu): checks, the
// compute dtype, every buffer (the stencil, the CG's vectors and per-class scalars), one launch sequence on
// the current stream with no host synchronisation.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/propagation_checks.h"
#include "cuda/cuda_call.h"
#include "cuda/propagation_buffers.h"
#include "cuda/propagation_kernel.h"

namespace ovss_fast {

namespace {

at::Tensor pixel_propagation_cuda(const at::Tensor& scores,  // [B, C, H, W]
                                  const at::Tensor& image,   // [B, 3, H, W]
                                  int64_t radius, double tau, double alpha, int64_t iters, double tol) {
  check_pixel_propagation_args(scores, image, radius, tau, alpha, iters, tol, c10::DeviceType::CUDA);
  return on_cuda(scores, "scores", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(scores, image);
    if (scores.numel() == 0) return at::empty(scores.sizes(), scores.options().dtype(dt));
    const int64_t B = scores.size(0), C = scores.size(1), H = scores.size(2), W = scores.size(3), HW = H * W;
    TORCH_CHECK(B <= 65535, "pixel_propagation (CUDA): at most 65535 images, got B = ", B);
    const at::Tensor b = prepare(scores, dt);  // [B, C, H, W]: the columns [B C, H W]
    const at::Tensor img = prepare(image, dt);
    CgTensors t;
    PixelPropagationParams p{};
    p.cg = make_cg(t, b, HW, B * C, kPixelMatvecRows, alpha, iters, tol);
    at::Tensor lab = at::empty({B, 3, HW}, b.options());
    at::Tensor s = at::empty({B, 2 * radius * (radius + 1), HW}, b.options());
    at::Tensor inv = at::empty({B, HW}, b.options());
    p.image = img.const_data_ptr();
    p.lab = lab.mutable_data_ptr();
    p.s = s.mutable_data_ptr();
    p.inv = inv.mutable_data_ptr();
    p.B = B;
    p.C = C;
    p.H = H;
    p.W = W;
    p.r = radius;
    p.tau = tau;
    check_launch(launch_pixel_propagation(p, stream), "pixel_propagation", "scores ", shape_str(scores), ", image ",
                 shape_str(image));
    return t.x;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("pixel_propagation", &pixel_propagation_cuda); }

}  // namespace ovss_fast
