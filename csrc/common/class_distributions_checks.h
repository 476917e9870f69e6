// Argument checks shared by the CPU and CUDA wrappers of class_distributions, and the
// "patches" NMS as a post-pass on Q for a kernel that applies no NMS itself (host only:
// includes torch headers, never included by a .cu file). Messages name the argument and
// the shape or value seen (method.md sections 1 and 5).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "checks.h"
#include "class_distributions_math.h"

namespace ovss_fast {

// feats [B, N, D] on `type`, text [C, D] on the same device, both floating, D equal and > 0.
inline void check_features_and_text(const at::Tensor& feats, const at::Tensor& text, c10::DeviceType type) {
  check_rank(feats, "feats", 3, "[B, N, D]");
  check_rank(text, "text", 2, "[C, D]");
  check_floating(feats, "feats");
  check_floating(text, "text");
  check_device(feats, "feats", type);
  check_same_device(feats, "feats", text, "text");
  TORCH_CHECK(feats.size(2) > 0, "feats has D = 0 feature width (shape ", shape_str(feats),
              "); the cosine needs at least one feature");
  TORCH_CHECK(text.size(1) > 0, "text has D = 0 feature width (shape ", shape_str(text),
              "); the cosine needs at least one feature");
  TORCH_CHECK(feats.size(2) == text.size(1), "feats and text disagree on the feature width D: feats ",
              shape_str(feats), ", text ", shape_str(text));
}

// The NmsAxis code of "classes" / "patches"; anything else is rejected.
inline int nms_axis_code(c10::string_view axis) {
  if (axis == "classes") return kNmsClasses;
  if (axis == "patches") return kNmsPatches;
  TORCH_CHECK(false, "nms_axis must be 'classes' or 'patches', got '", std::string(axis), "'");
  return -1;
}

// The "patches" NMS applied to Q = class_distributions(nms = 0) [B, N, C]: zero Q below
// nms * max_i Q[:, c], renormalise each column (a column summing to 0 stays 0). Exact
// (up to rounding at the threshold): Q[:, c] = P[:, c] / s_c with s_c > 0, a positive
// per-column rescale, so the same entries fall below the threshold and the renormalised
// kept Q equals the kept P over its sum (ovss_fast/reference.py, suppress_patches).
inline at::Tensor suppress_patches(const at::Tensor& q, double nms) {
  if (!(nms > 0)) return q;
  const at::Tensor kept = q.masked_fill(q.lt(q.amax({1}, true).mul(nms)), 0);
  const at::Tensor colsum = kept.sum({1}, true);
  return kept.div(colsum.clamp_min(kDenomFloor)).masked_fill(colsum.le(0), 0);
}

}  // namespace ovss_fast
