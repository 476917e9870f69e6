// method.md section 4: joint bilateral upsampling (Kopf et al. 2007), shared by the
// CPU kernels (csrc/cpu/jbu_upsample.cpp, csrc/cpu/jbu_argmax.cpp) and the CUDA
// kernels (csrc/cuda/jbu_upsample_kernel.cu, csrc/cuda/jbu_argmax_kernel.cu).
//
// Output pixel (y, x) of [H, W] sits at low-res p' = ((y+0.5) h/H - 0.5, (x+0.5) w/W - 0.5);
// its taps are q = (floor(p'y + 0.5) + dy, floor(p'x + 0.5) + dx), dy, dx in -r..r, those off
// the [h, w] grid skipped. Tap exponent e(q) = -|q - p'|^2 / (2 sigma_s^2) - |G[p] - Gd[q]|^2 / (2 sigma_r^2);
// weight = exp(e(q) - max_q e(q)), so one tap keeps weight 1 and float32 never divides 0 by 0.
//
// Precision (a small sigma_r makes the exponents large: ~1e5 at sigma_r = 1e-3):
//   - Gd is area-averaged in double and carried as two floats, hi + lo ([B, 6, h, w]: channels
//     0-2 hi, 3-5 lo); rounding Gd to one float32 alone moves the result by 1e-4 there;
//   - e(q) - e(m), m the pixel's peak tap (the first of the largest e in tap order), is not
//     formed by subtracting two large exponents but from differences of squares written as
//     products, a^2 - b^2 = (a - b)(a + b), whose factors are differences of nearby numbers:
//     jbu_relative_exponent. The weights are exp(r - max r), r the relative exponents.
//     (The float32 kernels reach the same precision by forming e(q) in double instead:
//     jbu_wide_exponent below; float64 kernels keep the relative exponents.)
//   out[c, p] = sum_q w(q) S[c, q] / sum_q w(q)
// A -inf score at any on-grid tap makes out[c, p] = -inf (even where the weight underflowed).
// Labels: argmax over c, ties to the lowest class, NaN counted largest (torch.argmax's rule).
//
// The float64 kernels follow ovss_fast/reference.py operation by operation (the same
// order of additions over taps and colour channels). The float32 kernels take p' and
// the exponents in double (jbu_lowres_position, jbu_wide_exponent): closer to the
// float64 reference than the float32 reference is (which picks other cells where
// float32 rounds p' = k + 0.5 down). No torch headers.
#pragma once

#include <stdint.h>

#include "hostdevice.h"

namespace ovss_fast {

// p' along one axis, in double for every compute dtype: ratio = low / high (h / H) in double,
// the float64 reference's arithmetic, so every backend picks the float64 reference's cells
// (in float32, p' = 2.5 exactly can round to 2.4999998 and move a pixel's whole tap window)
HOSTDEVICE double jbu_lowres_position(int64_t out_index, double ratio) {
  return (static_cast<double>(out_index) + 0.5) * ratio - 0.5;
}

// the nearest grid cell, round half up: floor(p' + 0.5)
HOSTDEVICE int64_t jbu_nearest(double pos) {
  return static_cast<int64_t>(math_floor(pos + 0.5));
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

// One on-grid tap q of one output pixel: its cell, its offsets from p', Gd[q] as hi + lo
// and the colour differences a = G[p] - Gd[q] = (G - hi) - lo.
template <typename T>
struct JbuTap {
  int64_t qy, qx;
  T dy, dx;
  T hi0, hi1, hi2, lo0, lo1, lo2;
  T a0, a1, a2;
};

// gd: [6, h, w] of the pixel's image (hi then lo), k = qy * w + qx, hw = h * w; py, px: p' in double
template <typename T>
HOSTDEVICE JbuTap<T> jbu_tap(int64_t qy, double py, int64_t qx, double px, T g0, T g1, T g2, const T* gd, int64_t k,
                             int64_t hw) {
  JbuTap<T> t;
  t.qy = qy;
  t.qx = qx;
  t.dy = static_cast<T>(static_cast<double>(qy) - py);
  t.dx = static_cast<T>(static_cast<double>(qx) - px);
  t.hi0 = gd[k];
  t.hi1 = gd[hw + k];
  t.hi2 = gd[2 * hw + k];
  t.lo0 = gd[3 * hw + k];
  t.lo1 = gd[4 * hw + k];
  t.lo2 = gd[5 * hw + k];
  t.a0 = (g0 - t.hi0) - t.lo0;
  t.a1 = (g1 - t.hi1) - t.lo1;
  t.a2 = (g2 - t.hi2) - t.lo2;
  return t;
}

// e(q) itself: only to find the peak tap
template <typename T>
HOSTDEVICE T jbu_tap_exponent(const JbuTap<T>& t, T inv_s, T inv_r) {
  return jbu_exponent(t.dy * t.dy + t.dx * t.dx, t.a0 * t.a0 + t.a1 * t.a1 + t.a2 * t.a2, inv_s, inv_r);
}

// e(q) - e(m):  |q - p'|^2 - |m - p'|^2 = (qy - my)(dy_q + dy_m) + (qx - mx)(dx_q + dx_m)
//               |G - Gd[q]|^2 - |G - Gd[m]|^2 = sum_k (Gd[m]_k - Gd[q]_k)(a_q,k + a_m,k)
template <typename T>
HOSTDEVICE T jbu_relative_exponent(const JbuTap<T>& q, const JbuTap<T>& m, T inv_s, T inv_r) {
  const T ds = static_cast<T>(q.qy - m.qy) * (q.dy + m.dy) + static_cast<T>(q.qx - m.qx) * (q.dx + m.dx);
  const T d0 = (m.hi0 - q.hi0) + (m.lo0 - q.lo0);
  const T d1 = (m.hi1 - q.hi1) + (m.lo1 - q.lo1);
  const T d2 = (m.hi2 - q.hi2) + (m.lo2 - q.lo2);
  const T dr = d0 * (q.a0 + m.a0) + d1 * (q.a1 + m.a1) + d2 * (q.a2 + m.a2);
  return -ds * inv_s - dr * inv_r;
}

// Float kernels (CPU and CUDA) take a shorter road to the same precision: the exponent in
// double, e(q) = -|q - p'|^2 inv_s - |a|^2 inv_r with a = G[p] - (hi + lo) formed in double,
// then w = exp(float(e(q) - max e)). At e ~ 1e6 (sigma_r = 1e-3) double keeps e - max e to
// ~1e-10, more than float32 needs; one pass finds max e, one forms the weights (no peak tap).
// dy = qy - p'y, dx = qx - p'x in low-res pixels; inv_s, inv_r in double (the float kernel's
// JbuShape values, so the float32 reference's rounding of 1 / (2 sigma^2) is kept).
HOSTDEVICE double jbu_wide_exponent(double dy, double dx, double a0, double a1, double a2, double inv_s,
                                    double inv_r) {
  return jbu_exponent(dy * dy + dx * dx, a0 * a0 + a1 * a1 + a2 * a2, inv_s, inv_r);
}

// Gd[q] channel k (0-2) in double from its hi + lo floats; gd: [6, h, w] of the image
HOSTDEVICE double jbu_guide_wide(const float* gd, int k, int64_t q, int64_t hw) {
  return static_cast<double>(gd[k * hw + q]) + static_cast<double>(gd[(k + 3) * hw + q]);
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
  double ratio_y, ratio_x;  // h / H, w / W (in double: jbu_lowres_position)
  T inv_s, inv_r;      // 1 / (2 sigma_s^2), 1 / (2 sigma_r^2)
};

}  // namespace ovss_fast
