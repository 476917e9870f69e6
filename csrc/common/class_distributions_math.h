// method.md section 1: class distributions over patches, shared by
// csrc/cpu/class_distributions.cpp and csrc/cuda/class_distributions_kernel.cu.
//
//   L[i, c] = scale * cos(X[i], T[c]),  P[i, :] = softmax_c L[i, :]
//   NMS, axis "classes":  P[i, c] = 0 where P[i, c] < nms * max_c' P[i, c']
//        axis "patches":  P[i, c] = 0 where P[i, c] < nms * max_i' P[i', c]
//   Q[:, c] = P[:, c] / sum_i P[i, c]   (a column that sums to 0 stays 0)
//
// cos is scale-invariant, so each vector is divided by its largest |entry| before its sum
// of squares (norm_scale): norms near 1e30 or 1e-30 neither overflow nor underflow float32.
// The scaled norm is floored at 1e-30, so a zero vector gets cosine 0, not NaN.
// No torch headers.
#pragma once

#include "hostdevice.h"

namespace ovss_fast {

// nms_axis codes shared by the wrappers and kernels
enum NmsAxis : int { kNmsClasses = 0, kNmsPatches = 1 };

// what a vector is divided by before its sum of squares: its max |entry| (1 for a zero vector)
template <typename T>
HOSTDEVICE T norm_scale(T max_abs) {
  return max_abs > T(0) ? max_abs : T(1);
}

// ||x / s|| from the sum of squares of x / s, floored like every denominator
template <typename T>
HOSTDEVICE T feature_norm(T sum_of_squares) {
  return clamp_denominator(math_sqrt(sum_of_squares));
}

// scale * cos from the dot product of the raw feature with the unit text vector, the
// feature's norm_scale s and the norm of x / s
template <typename T>
HOSTDEVICE T class_logit(T dot_with_unit_text, T feature_scale, T feature_norm_value, T scale) {
  return scale * ((dot_with_unit_text / feature_scale) / feature_norm_value);
}

// one softmax entry: exp(l - max) / sum_c exp(l_c - max)
template <typename T>
HOSTDEVICE T softmax_numerator(T logit, T max_logit) {
  return math_exp(logit - max_logit);
}

// NMS: a probability below nms * (the largest probability of its patch, or of its class) is dropped
template <typename T>
HOSTDEVICE T nms_keep(T p, T p_max, T nms) {
  return p < nms * p_max ? T(0) : p;
}

// the column normalisation; a dead column (sum 0) stays 0
template <typename T>
HOSTDEVICE T normalise_column(T p, T column_sum) {
  const T q = p / clamp_denominator(column_sum);
  return column_sum > T(0) ? q : T(0);
}

}  // namespace ovss_fast
