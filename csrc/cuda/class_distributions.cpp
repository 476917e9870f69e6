// CUDA wrapper of class_distributions (method.md section 1): checks, dtype and layout,
// allocation, launches on the current stream (csrc/cuda/class_distributions_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/class_distributions_checks.h"
#include "cuda/class_distributions_kernel.h"
#include "cuda/cuda_call.h"

namespace ovss_fast {
namespace {

at::Tensor class_distributions_cuda(const at::Tensor& feats,  // [B, N, D]
                                    const at::Tensor& text,   // [C, D]
                                    double scale, double nms, c10::string_view nms_axis) {
  check_features_and_text(feats, text, c10::DeviceType::CUDA);
  // the kernel applies NMS along classes; along patches it is the exact post-pass below
  const bool patches = nms_axis_code(nms_axis) == kNmsPatches;
  return on_cuda(feats, "feats", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(feats, text);
    const int64_t B = feats.size(0), N = feats.size(1), D = feats.size(2), C = text.size(0);
    at::Tensor out = at::empty({B, N, C}, feats.options().dtype(dt));
    if (out.numel() == 0) return out;
    const at::Tensor x = prepare(feats, dt);
    const at::Tensor t = prepare(text, dt);
    ClassDistributionsParams p{};
    p.feats = x.const_data_ptr();
    p.text = t.const_data_ptr();
    p.out = out.mutable_data_ptr();
    p.B = B;
    p.N = N;
    p.C = C;
    p.D = D;
    p.scale = scale;
    p.nms = patches ? 0.0 : nms;
    p.is_double = dt == at::kDouble;
    // one patch's features and logits sit in shared memory (227 KiB on sm_80 / sm_90)
    TORCH_CHECK(class_distributions_shared_bytes(p) <= 200 * 1024, "class_distributions (CUDA): D + C = ", D + C,
                " is too large for one block's shared memory (feats ", shape_str(feats), ", text ", shape_str(text),
                "); use backend='reference'");
    at::Tensor scratch;
    p.scratch = cuda_scratch(scratch, class_distributions_scratch_bytes(p), x);
    check_launch(launch_class_distributions(p, stream), "class_distributions", "feats ", shape_str(feats),
                 ", text ", shape_str(text));
    return patches ? suppress_patches(out, nms) : out;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("class_distributions", &class_distributions_cuda); }

}  // namespace ovss_fast
