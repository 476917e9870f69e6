// CPU building blocks shared by csrc/cpu/jbu_upsample.cpp and csrc/cpu/jbu_argmax.cpp
// (method.md section 4; the arithmetic is common/jbu_math.h). Scores are read
// channels-last, [B, h*w, C], so the per-tap class loop is contiguous and vectorises.
#pragma once

#include <stdint.h>

#include "common/jbu_math.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {

// The on-grid taps of output pixel (y, x) of image b: their normalised weights and
// low-res flat indices, in the reference's tap order (dy outer, dx inner). Returns
// the tap count; *den receives the weights' sum. Three passes over the taps: the peak
// tap m, the exponents relative to it (common/jbu_math.h, "Precision"), the weights.
template <typename T>
OVSS_INLINE int jbu_pixel_taps(const JbuShape<T>& s,
                   const T* g,   // [3, H, W] of image b
                   const T* gd,  // [6, h, w] of image b (hi, lo)
                   int64_t y, int64_t x, T* weight, int64_t* offset, T* den) {
  const T py = jbu_lowres_position(y, s.ratio_y);
  const T px = jbu_lowres_position(x, s.ratio_x);
  const int64_t cy = jbu_nearest(py), cx = jbu_nearest(px);
  const int64_t HW = s.H * s.W, hw = s.h * s.w;
  const T g0 = g[y * s.W + x], g1 = g[HW + y * s.W + x], g2 = g[2 * HW + y * s.W + x];
  int n = 0;
  T emax = neg_inf<T>();
  JbuTap<T> peak{};
  for (int dy = -s.radius; dy <= s.radius; ++dy) {
    const int64_t qy = cy + dy;
    if (qy < 0 || qy >= s.h) continue;
    for (int dx = -s.radius; dx <= s.radius; ++dx) {
      const int64_t qx = cx + dx;
      if (qx < 0 || qx >= s.w) continue;
      const int64_t q = qy * s.w + qx;
      const JbuTap<T> tap = jbu_tap(qy, py, qx, px, g0, g1, g2, gd, q, hw);
      const T e = jbu_tap_exponent(tap, s.inv_s, s.inv_r);
      if (e > emax) {
        emax = e;
        peak = tap;
      }
      offset[n] = q;
      ++n;
    }
  }
  T rmax = neg_inf<T>();
  for (int t = 0; t < n; ++t) {
    const int64_t q = offset[t], qy = q / s.w, qx = q - qy * s.w;
    const T r = jbu_relative_exponent(jbu_tap(qy, py, qx, px, g0, g1, g2, gd, q, hw), peak, s.inv_s, s.inv_r);
    weight[t] = r;
    rmax = r > rmax ? r : rmax;
  }
  T d = 0;
  for (int t = 0; t < n; ++t) {
    weight[t] = jbu_weight(weight[t], rmax);
    d += weight[t];
  }
  *den = d;
  return n;
}

// num[c] = sum over taps of w * S[c, q] (with the -inf rule), for every class
template <typename T>
OVSS_INLINE void jbu_pixel_numerators(const T* __restrict st,  // [h*w, C] of image b, channels-last
                          const T* weight, const int64_t* offset, int n, int64_t C, T* __restrict num) {
  for (int64_t c = 0; c < C; ++c) num[c] = T(0);
  for (int t = 0; t < n; ++t) {
    const T* __restrict sp = st + offset[t] * C;
    const T wt = weight[t];
    for (int64_t c = 0; c < C; ++c) num[c] = jbu_accumulate(num[c], wt, sp[c]);
  }
}

}  // namespace ovss_fast
