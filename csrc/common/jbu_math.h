// method.md section 4: joint bilateral upsampling (Kopf et al. 2007), shared by the
// CPU kernels (csrc/cpu/jbu_upsample.cpp, csrc/cpu/jbu_argmax.cpp) and the CUDA
// kernels (csrc/cuda/jbu_upsample_kernel.cu, csrc/cuda/jbu_argmax_kernel.cu).
//
// Output pixel (y, x) of [H, W] sits at low-res p' = ((y+0.5) h/H - 0.5, (x+0.5) w/W - 0.5);
// its taps are q = (floor(p'y + 0.5) + dy, floor(p'x + 0.5) + dx), dy, dx in -r..r, those off
// the [h, w] grid skipped. Tap exponent e(q) = -|q - p'|^2 / (2 sigma_s^2) - |G[p] - Gd[q]|^2 / (2 sigma_r^2);
// weight = exp(e(q) - max_q e(q)), so one tap keeps weight 1 and float32 never divides 0 by 0.
//   out[c, p] = sum_q w(q) S[c, q] / sum_q w(q)
// A -inf score at any on-grid tap makes out[c, p] = -inf (even where the weight underflowed).
// Labels: argmax over c, ties to the lowest class, NaN counted largest (torch.argmax's rule).
//
// The arithmetic follows ovss_fast/reference.py operation by operation (the same
// order of additions over taps and colour channels), so float32 kernels round
// like the float32 reference. No torch headers.
#pragma once

#include <stdint.h>

#include "hostdevice.h"

namespace ovss_fast {

// p' along one axis; ratio = low / high (h / H), rounded to T once by the caller
template <typename T>
HOSTDEVICE T jbu_lowres_position(int64_t out_index, T ratio) {
  return (static_cast<T>(out_index) + T(0.5)) * ratio - T(0.5);
}

// the nearest grid cell, round half up: floor(p' + 0.5)
template <typename T>
HOSTDEVICE int64_t jbu_nearest(T pos) {
  return static_cast<int64_t>(math_floor(pos + T(0.5)));
}

// |q - p'|^2 in low-res pixels
template <typename T>
HOSTDEVICE T jbu_spatial_sq(int64_t qy, T py, int64_t qx, T px) {
  const T dy = static_cast<T>(qy) - py;
  const T dx = static_cast<T>(qx) - px;
  return dy * dy + dx * dx;
}

// |G[p] - Gd[q]|^2 over RGB
template <typename T>
HOSTDEVICE T jbu_range_sq(T g0, T g1, T g2, T d0, T d1, T d2) {
  const T a = g0 - d0, b = g1 - d1, c = g2 - d2;
  return a * a + b * b + c * c;
}

// inv_s = 1 / (2 sigma_s^2), inv_r = 1 / (2 sigma_r^2), computed in double and rounded to T once
template <typename T>
HOSTDEVICE T jbu_exponent(T spatial_sq, T range_sq, T inv_s, T inv_r) {
  return -spatial_sq * inv_s - range_sq * inv_r;
}

template <typename T>
HOSTDEVICE T jbu_weight(T exponent, T max_exponent) {
  return math_exp(exponent - max_exponent);
}

// num += w * s, with a -inf score poisoning the class at this pixel
template <typename T>
HOSTDEVICE T jbu_accumulate(T num, T weight, T score) {
  const T sum = num + weight * score;
  return score == neg_inf<T>() ? neg_inf<T>() : sum;
}

// argmax step: strictly greater wins (ties keep the lower class); a NaN beats any number
template <typename T>
HOSTDEVICE bool argmax_better(T value, T best) {
  return (value != value && best == best) || value > best;
}

// Geometry and weights shared by all kernels, set up once per call by the wrapper.
template <typename T>
struct JbuShape {
  int64_t B, C, h, w, H, W;
  int radius;
  T ratio_y, ratio_x;  // h / H, w / W
  T inv_s, inv_r;      // 1 / (2 sigma_s^2), 1 / (2 sigma_r^2)
};

}  // namespace ovss_fast
