// Host-side setup shared by the PAMR wrappers (CPU and CUDA): argument checks, the compute dtype,
// the scores resized to the image (bilinear, align_corners=True, as the peers' module) and the two
// ping-pong buffers of the refinement steps. Host only: never include from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/upsample_bilinear2d.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <vector>

#include "checks.h"
#include "image_checks.h"

namespace ovss_fast {

inline void check_pamr_args(const at::Tensor& scores, const at::Tensor& image, int64_t iters,
                            c10::IntArrayRef dilations, c10::DeviceType device) {
  check_scores_and_image(scores, image, "image", "[B, K, H, W]", device);
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK(!dilations.empty(), "dilations must hold at least one dilation, got []");
  for (size_t i = 0; i < dilations.size(); ++i)
    TORCH_CHECK(dilations[i] >= 1 && dilations[i] <= (int64_t{1} << 30), "dilations[", i,
                "] must be a positive integer (at most 2^30), got ", dilations[i]);
  TORCH_CHECK(dilations.size() <= 1024, "at most 1024 dilations, got ", dilations.size());
  const bool empty_grid = scores.size(2) == 0 || scores.size(3) == 0;
  const bool no_output = scores.size(0) == 0 || scores.size(1) == 0 || image.size(2) == 0 || image.size(3) == 0;
  TORCH_CHECK(image.size(1) > 0 || no_output, "image has K = 0 channels (shape ", shape_str(image), ")");
  TORCH_CHECK(!empty_grid || no_output, "scores has an empty grid (shape ", shape_str(scores), ") but the image ",
              shape_str(image), " has pixels to fill");
}

struct PamrTensors {
  at::Tensor m0;     // [B, C, H, W] the resized scores, compute dtype, contiguous: the first step's input
  at::Tensor image;  // [B, K, H, W] float64, contiguous: the affinities are computed in double (see pamr_math.h)
  at::Tensor ping;   // [B, C, H, W] written by steps 0, 2, 4, ...
  at::Tensor pong;   // [B, C, H, W] written by steps 1, 3, ...: m0 itself when the wrapper owns it
  std::vector<int64_t> dilations;
};

// The result: m0 after no step (a copy when m0 is the caller's tensor), else the last step's buffer.
inline at::Tensor pamr_result(const PamrTensors& t, int64_t iters) {
  if (iters == 0) return t.pong.defined() && t.pong.is_same(t.m0) ? t.m0 : t.m0.clone();
  return (iters - 1) % 2 == 0 ? t.ping : t.pong;
}

// Everything the kernels need; the output is [B, C, H, W] of the image's size, non-empty (callers return
// early on empty outputs). At most two [B, C, H, W] buffers besides the caller's scores.
inline PamrTensors prepare_pamr(const at::Tensor& scores, const at::Tensor& image, int64_t iters,
                                c10::IntArrayRef dilations) {
  const auto dt = compute_dtype(scores, image);
  const int64_t H = image.size(2), W = image.size(3);
  PamrTensors t;
  at::Tensor m = scores.to(dt);
  if (m.size(2) != H || m.size(3) != W) {
    m = at::upsample_bilinear2d(m, {H, W}, /*align_corners=*/true);
  }
  t.m0 = m.contiguous();
  t.image = prepare(image, at::kDouble);
  t.dilations.assign(dilations.begin(), dilations.end());
  const bool owned = !t.m0.is_alias_of(scores);  // a fresh copy (converted, resized or made contiguous)
  if (owned) t.pong = t.m0;
  if (iters >= 1) t.ping = at::empty(t.m0.sizes(), t.m0.options());
  if (iters >= 2 && !owned) t.pong = at::empty(t.m0.sizes(), t.m0.options());
  return t;
}

}  // namespace ovss_fast
