// Host-side setup shared by the JBU wrappers (CPU and CUDA): argument checks, the
// compute dtype, contiguous inputs, Gd = adaptive_avg_pool2d(guide, (h, w)) and the
// geometry constants of common/jbu_math.h. Host only: never include from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/adaptive_avg_pool2d.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/sub.h>

#include "checks.h"
#include "image_checks.h"
#include "jbu_math.h"

namespace ovss_fast {

struct JbuInputs {
  at::Tensor scores;  // [B, C, h, w], compute dtype, contiguous
  at::Tensor guide;   // [B, 3, H, W], compute dtype, contiguous
  at::Tensor gd;      // [B, 6, h, w]: the guide area-averaged to the score grid in double, as hi (0-2) + lo (3-5)
  at::ScalarType dtype;
  int64_t B, C, h, w, H, W;
};

inline void check_jbu_args(const at::Tensor& scores, const at::Tensor& guide, double sigma_spatial,
                           double sigma_range, int64_t radius, c10::DeviceType device) {
  check_scores_and_image(scores, guide, "guide", "[B, 3, H, W]", device);
  TORCH_CHECK(guide.size(1) == 3, "guide must be an RGB image [B, 3, H, W], got shape ", shape_str(guide));
  TORCH_CHECK(sigma_spatial > 0, "sigma_spatial must be positive, got ", sigma_spatial);
  TORCH_CHECK(sigma_range > 0, "sigma_range must be positive, got ", sigma_range);
  TORCH_CHECK(radius >= 0, "radius must be >= 0, got ", radius);
  TORCH_CHECK(radius <= 64, "radius must be <= 64 (", (2 * radius + 1) * (2 * radius + 1), " taps per pixel), got ",
              radius);
  const bool empty_grid = scores.size(2) == 0 || scores.size(3) == 0;
  TORCH_CHECK(!empty_grid || guide.numel() == 0 || scores.size(0) == 0, "scores has an empty grid (shape ",
              shape_str(scores), ") but the guide ", shape_str(guide), " has pixels to fill");
}

// Gd as hi + lo [B, 6, h, w] from Gd in double [B, 3, h, w]
inline at::Tensor jbu_split_gd(const at::Tensor& gd64, at::ScalarType dtype) {
  const at::Tensor hi = gd64.to(dtype);
  const at::Tensor lo = at::sub(gd64, hi.to(at::kDouble)).to(dtype);
  return at::cat({hi, lo}, 1).contiguous();
}

// everything but the sizes is left undefined when the output is empty; with_gd = false leaves
// in.gd to the caller (the CPU kernels pool it themselves: jbu_cpu.h, jbu_cpu_data)
inline JbuInputs prepare_jbu(const at::Tensor& scores, const at::Tensor& guide, bool need_data, bool with_gd = true) {
  JbuInputs in;
  in.dtype = compute_dtype(scores, guide);
  in.B = scores.size(0);
  in.C = scores.size(1);
  in.h = scores.size(2);
  in.w = scores.size(3);
  in.H = guide.size(2);
  in.W = guide.size(3);
  if (need_data) {
    in.scores = prepare(scores, in.dtype);
    in.guide = prepare(guide, in.dtype);
    // Gd in double, carried as two values of the compute dtype (common/jbu_math.h, "Precision")
    if (with_gd) in.gd = jbu_split_gd(at::adaptive_avg_pool2d(in.guide.to(at::kDouble), {in.h, in.w}), in.dtype);
  }
  return in;
}

template <typename T>
JbuShape<T> jbu_shape(const JbuInputs& in, double sigma_spatial, double sigma_range, int64_t radius) {
  JbuShape<T> s;
  s.B = in.B;
  s.C = in.C;
  s.h = in.h;
  s.w = in.w;
  s.H = in.H;
  s.W = in.W;
  s.radius = static_cast<int>(radius);
  // as the float64 reference: the ratios in double; 1 / (2 sigma^2) in double, rounded to T once
  s.ratio_y = static_cast<double>(in.h) / static_cast<double>(in.H);
  s.ratio_x = static_cast<double>(in.w) / static_cast<double>(in.W);
  s.inv_s = static_cast<T>(1.0 / (2.0 * sigma_spatial * sigma_spatial));
  s.inv_r = static_cast<T>(1.0 / (2.0 * sigma_range * sigma_range));
  return s;
}

}  // namespace ovss_fast
