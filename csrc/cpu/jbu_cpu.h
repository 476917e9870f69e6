// CPU joint bilateral upsampling shared by csrc/cpu/jbu_upsample.cpp and csrc/cpu/jbu_argmax.cpp
// (method.md section 4; the arithmetic is common/jbu_math.h).
//
// Layout. An output row y is cut into segments: consecutive x with the same nearest
// low-res column cx (at most kJbuChunk pixels). The pixels of a segment share their
// on-grid taps q_1..q_T, so the segment is one small matrix product
//     num[p, c] = sum_t w[t, p] * S[q_t, c]      (p: pixel of the segment, t: tap, c: class)
// with the tap weights w computed once per pixel, vectorised across the segment's pixels,
// and the product register-blocked over 4 pixels x 2 vectors of classes from class-last
// scores [B, h*w, Cp] (C padded with zeros to whole vectors). Each sum runs over the taps
// in order from 0, as the reference: the numerators round as the per-pixel loop did.
//
// Weights. float: exponents in double, one pass for their max and one for
// w = exp(float(e - max e)) (jbu_wide_exponent, common/jbu_math.h; math_exp vectorises).
// double: the per-pixel relative exponents (jbu_pixel_taps), then the same product.
//
// Non-finite values. A segment with a non-finite score or Gd at any of its taps, or a
// non-finite guide pixel, takes the per-pixel path with the reference's rules (a -inf score
// at a tap poisons the class, NaN counted largest by the argmax). All other numerators
// are finite with den >= 1 (the peak tap weighs 1), so the argmax may compare numerators
// without dividing by den (the same order; ties to the lowest class).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "common/jbu_math.h"
#include "common/jbu_prepare.h"
#include "cpu/cpu_memory.h"
#include "cpu/cpu_simd.h"

// vector values live only inside always-inlined code; GCC reports the clones' -Wpsabi at the end
// of the including file, so the warning stays off for the two files that include this header
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ovss_fast {

// pixels per segment (a multiple of the vector length and of the 4-pixel register block)
constexpr int kJbuChunk = 64;

struct JbuSegment {
  int64_t x0, cx;
  int n;
};

// The segments of every row (they depend on x only), once per call.
template <typename T>
inline std::vector<JbuSegment> jbu_segments(const JbuShape<T>& s) {
  std::vector<JbuSegment> segs;
  for (int64_t x = 0; x < s.W;) {
    const int64_t cx = jbu_nearest(jbu_lowres_position(x, s.ratio_x));
    int64_t x1 = x + 1;
    while (x1 < s.W && x1 - x < kJbuChunk && jbu_nearest(jbu_lowres_position(x1, s.ratio_x)) == cx) ++x1;
    segs.push_back({x, cx, static_cast<int>(x1 - x)});
    x = x1;
  }
  return segs;
}

// Gd = adaptive_avg_pool2d(guide in double, (h, w)) [B, 3, h, w] without a double copy of the
// guide (50 MB at 1024 x 2048): each cell summed in double, rows then columns, then / kh / kw
// as torch's CPU kernel; cells as adaptive pooling: [floor(i H / h), ceil((i + 1) H / h)).
inline at::Tensor jbu_pool_guide(const at::Tensor& guide, int64_t h, int64_t w) {
  const int64_t B = guide.size(0), H = guide.size(2), W = guide.size(3);
  at::Tensor gd = at::empty({B, 3, h, w}, guide.options().dtype(at::kDouble));
  const float* g = guide.const_data_ptr<float>();
  double* o = gd.mutable_data_ptr<double>();
  at::parallel_for(0, B * 3 * h, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / h, oy = r - plane * h;
      const int64_t y0 = oy * H / h, y1 = ((oy + 1) * H + h - 1) / h;
      const float* src = g + plane * H * W;
      for (int64_t ox = 0; ox < w; ++ox) {
        const int64_t x0 = ox * W / w, x1 = ((ox + 1) * W + w - 1) / w;
        double sum = 0.0;
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t x = x0; x < x1; ++x) sum += static_cast<double>(src[y * W + x]);
        o[r * w + ox] = sum / static_cast<double>(y1 - y0) / static_cast<double>(x1 - x0);
      }
    }
  });
  return gd;
}

// What the kernels read, prepared once per call.
template <typename T>
struct JbuCpuData {
  JbuShape<T> s;
  const T* st;         // [B, h*w, Cp] class-last scores, classes C..Cp-1 zero
  int64_t Cp;          // C rounded up to whole vectors
  const T* g;          // [B, 3, H, W]
  const T* gd;         // [B, 6, h, w] (hi, lo)
  const uint8_t* bad;  // [B, h*w]: 1 where a score or Gd value of the cell is not finite
};

// Host side: Gd, the class-last padded scores and the per-cell flags (tensors kept alive in
// *keep), from prepare_jbu's contiguous inputs (prepare_jbu(..., with_gd = false): Gd is pooled
// here, the float guide by jbu_pool_guide without a double copy, the double one as prepare_jbu does).
template <typename T>
inline JbuCpuData<T> jbu_cpu_data(const JbuInputs& in, double sigma_spatial, double sigma_range, int64_t radius,
                                  std::vector<at::Tensor>* keep) {
  JbuCpuData<T> d;
  d.s = jbu_shape<T>(in, sigma_spatial, sigma_range, radius);
  constexpr int64_t L = Vec32<T>::kLen;
  const int64_t B = in.B, C = in.C, hw = in.h * in.w;
  d.Cp = (C + L - 1) / L * L;
  at::Tensor gd64;
  if constexpr (sizeof(T) == 4) {
    gd64 = jbu_pool_guide(in.guide, in.h, in.w);
  } else {
    gd64 = at::adaptive_avg_pool2d(in.guide, {in.h, in.w});
  }
  const at::Tensor gd_t = jbu_split_gd(gd64, in.dtype);
  at::Tensor st = at::empty({B, hw, d.Cp}, in.scores.options());
  at::Tensor bad = at::empty({B, hw}, in.scores.options().dtype(at::kByte));
  const T* src = in.scores.const_data_ptr<T>();
  const T* gd = gd_t.const_data_ptr<T>();
  T* dst = st.mutable_data_ptr<T>();
  uint8_t* flag = bad.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, B * hw, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / hw, q = k - b * hw;
      T* row = dst + k * d.Cp;
      bool finite = true;
      for (int64_t c = 0; c < C; ++c) {
        const T v = src[(b * C + c) * hw + q];
        row[c] = v;
        finite = finite && std::isfinite(v);
      }
      for (int64_t c = C; c < d.Cp; ++c) row[c] = T(0);
      for (int j = 0; j < 6; ++j) finite = finite && std::isfinite(gd[(b * 6 + j) * hw + q]);
      flag[k] = finite ? 0 : 1;
    }
  });
  keep->push_back(st);
  keep->push_back(bad);
  keep->push_back(gd_t);
  d.st = dst;
  d.g = in.guide.const_data_ptr<T>();
  d.gd = gd;
  d.bad = flag;
  return d;
}

// Per-thread scratch.
template <typename T>
struct JbuWork {
  std::vector<double> e;      // [taps][kJbuChunk] exponents (float path)
  std::vector<T> wt;          // [taps][kJbuChunk] weights
  std::vector<T> num;         // [W + kJbuChunk][Cp] numerators (jbu_upsample: the whole row)
  std::vector<T> rden;        // [W] the row's weight sums (jbu_upsample)
  std::vector<int64_t> off;   // [taps] the segment's on-grid cells
  std::vector<T> pw;          // [taps] one pixel's weights (per-pixel path)
  std::vector<int64_t> poff;  // [taps] one pixel's cells (per-pixel path)
  T den[kJbuChunk];
  JbuWork(int taps, int64_t Cp, int64_t W)
      : e(static_cast<size_t>(taps) * kJbuChunk),
        wt(static_cast<size_t>(taps) * kJbuChunk),
        num(static_cast<size_t>(W + kJbuChunk) * Cp),
        rden(static_cast<size_t>(W)),
        off(taps),
        pw(taps),
        poff(taps) {}
};

// The on-grid cells of the taps around centre (cy, cx), in tap order (dy outer, dx inner): flat
// indices into off, their count returned; *any_bad: one of them is flagged in bad (nullptr: none).
template <typename T>
OVSS_INLINE int jbu_tap_cells(const JbuShape<T>& s, int64_t cy, int64_t cx, const uint8_t* bad, int64_t* off,
                              bool* any_bad) {
  int n = 0;
  bool flagged = false;
  for (int dy = -s.radius; dy <= s.radius; ++dy) {
    const int64_t qy = cy + dy;
    if (qy < 0 || qy >= s.h) continue;
    for (int dx = -s.radius; dx <= s.radius; ++dx) {
      const int64_t qx = cx + dx;
      if (qx < 0 || qx >= s.w) continue;
      off[n] = qy * s.w + qx;
      flagged = flagged || (bad != nullptr && bad[off[n]] != 0);
      ++n;
    }
  }
  *any_bad = flagged;
  return n;
}

// The on-grid taps of one output pixel (method.md section 4): normalisation-free weights
// and low-res flat indices, in the reference's tap order (dy outer, dx inner). Returns
// the tap count; *den receives the weights' sum. Three passes over the taps: the peak
// tap m, the exponents relative to it (common/jbu_math.h, "Precision"), the weights.
template <typename T>
OVSS_INLINE int jbu_pixel_taps(const JbuShape<T>& s,
                               const T* g,   // [3, H, W] of image b
                               const T* gd,  // [6, h, w] of image b (hi, lo)
                               int64_t y, int64_t x, T* weight, int64_t* offset, T* den) {
  const double py = jbu_lowres_position(y, s.ratio_y);
  const double px = jbu_lowres_position(x, s.ratio_x);
  const int64_t cy = jbu_nearest(py), cx = jbu_nearest(px);
  const int64_t HW = s.H * s.W, hw = s.h * s.w;
  const T g0 = g[y * s.W + x], g1 = g[HW + y * s.W + x], g2 = g[2 * HW + y * s.W + x];
  bool unused;
  const int n = jbu_tap_cells(s, cy, cx, nullptr, offset, &unused);
  T emax = neg_inf<T>();
  JbuTap<T> peak{};
  for (int t = 0; t < n; ++t) {
    const int64_t q = offset[t], qy = q / s.w, qx = q - qy * s.w;
    const JbuTap<T> tap = jbu_tap(qy, py, qx, px, g0, g1, g2, gd, q, hw);
    const T e = jbu_tap_exponent(tap, s.inv_s, s.inv_r);
    if (e > emax) {
      emax = e;
      peak = tap;
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
OVSS_INLINE void jbu_pixel_numerators(const T* __restrict st,  // [h*w, Cp] of image b, class-last
                                      int64_t Cp, const T* weight, const int64_t* offset, int n, int64_t C,
                                      T* __restrict num) {
  for (int64_t c = 0; c < C; ++c) num[c] = T(0);
  for (int t = 0; t < n; ++t) {
    const T* __restrict sp = st + offset[t] * Cp;
    const T wt = weight[t];
    for (int64_t c = 0; c < C; ++c) num[c] = jbu_accumulate(num[c], wt, sp[c]);
  }
}

// float: the weights of the segment's pixels, wt[t * kJbuChunk + l], and their sums den[l]
// (lanes n.. up to a whole vector repeat the last pixel). False when a guide pixel is not finite.
// Exponents on 4 double lanes (jbu_wide_exponent's arithmetic), weights on 8 float lanes.
OVSS_INLINE bool jbu_segment_weights(const JbuShape<float>& s, const float* g, const float* gd, int64_t y,
                                     const JbuSegment& seg, const int64_t* off, int taps, double* e, float* wt,
                                     float* den) {
  typedef Vec32<double>::type D;
  typedef Vec32<float>::type F;
  constexpr int K = kJbuChunk;
  const int64_t HW = s.H * s.W, hw = s.h * s.w;
  const int n8 = (seg.n + 7) / 8 * 8;  // <= K; covers the 4-pixel blocks of jbu_segment_numerators
  const double py = jbu_lowres_position(y, s.ratio_y);
  const double inv_s = s.inv_s, inv_r = s.inv_r;
  alignas(32) double c0[K], c1[K], c2[K], px[K], emax[K];
  float finite = 0.0f;
  const float* row = g + y * s.W;
  for (int l = 0; l < n8; ++l) {
    const int64_t x = seg.x0 + (l < seg.n ? l : seg.n - 1);
    const float v0 = row[x], v1 = row[HW + x], v2 = row[2 * HW + x];
    finite += (v0 - v0) + (v1 - v1) + (v2 - v2);  // NaN once any of them is inf or NaN
    c0[l] = v0;
    c1[l] = v1;
    c2[l] = v2;
    px[l] = jbu_lowres_position(x, s.ratio_x);
    emax[l] = -INFINITY;
  }
  if (finite != 0.0f) return false;
  for (int t = 0; t < taps; ++t) {
    const int64_t q = off[t], qy = q / s.w, qx = q - qy * s.w;
    const double dy = static_cast<double>(qy) - py, fx = static_cast<double>(qx);
    const double d0 = jbu_guide_wide(gd, 0, q, hw), d1 = jbu_guide_wide(gd, 1, q, hw),
                 d2 = jbu_guide_wide(gd, 2, q, hw);
    const double sy = dy * dy;
    double* et = e + t * K;
    for (int l = 0; l < n8; l += 4) {
      D vx, a0, a1, a2, m;
      memcpy(&vx, px + l, sizeof(D));
      memcpy(&a0, c0 + l, sizeof(D));
      memcpy(&a1, c1 + l, sizeof(D));
      memcpy(&a2, c2 + l, sizeof(D));
      memcpy(&m, emax + l, sizeof(D));
      const D dx = fx - vx;
      a0 = a0 - d0;
      a1 = a1 - d1;
      a2 = a2 - d2;
      // jbu_wide_exponent: -(dy^2 + dx^2) inv_s - (a0^2 + a1^2 + a2^2) inv_r
      const D v = -(sy + dx * dx) * inv_s - (a0 * a0 + a1 * a1 + a2 * a2) * inv_r;
      memcpy(et + l, &v, sizeof(D));
      m = v > m ? v : m;
      memcpy(emax + l, &m, sizeof(D));
    }
  }
  // r = float(e - max e) into wt, then the weights in place (two passes: no store-to-load stall)
  for (int t = 0; t < taps; ++t) {
    const double* et = e + t * K;
    float* rt = wt + t * K;
    for (int l = 0; l < n8; l += 4) {
      D v, m;
      memcpy(&v, et + l, sizeof(D));
      memcpy(&m, emax + l, sizeof(D));
      const f32x4 r = __builtin_convertvector(v - m, f32x4);
      memcpy(rt + l, &r, sizeof(r));
    }
  }
  for (int l = 0; l < n8; l += 8) {
    F d = F{};
    for (int t = 0; t < taps; ++t) {
      F x;
      memcpy(&x, wt + t * K + l, sizeof(F));
      const F w = math_exp_nonpositive_x8(x);  // r <= 0: e <= max e
      memcpy(wt + t * K + l, &w, sizeof(F));
      d = d + w;
    }
    memcpy(den + l, &d, sizeof(F));
  }
  return true;
}

// double: the per-pixel relative exponents (lanes n.. of a 4-pixel block get weight 0)
OVSS_INLINE bool jbu_segment_weights(const JbuShape<double>& s, const double* g, const double* gd, int64_t y,
                                     const JbuSegment& seg, const int64_t* off, int taps, double* /*e*/,
                                     double* wt, double* den, double* pw, int64_t* poff) {
  constexpr int K = kJbuChunk;
  const int64_t HW = s.H * s.W;
  for (int l = 0; l < seg.n; ++l) {
    const int64_t x = seg.x0 + l;
    if (!std::isfinite(g[y * s.W + x]) || !std::isfinite(g[HW + y * s.W + x]) ||
        !std::isfinite(g[2 * HW + y * s.W + x]))
      return false;
    jbu_pixel_taps(s, g, gd, y, x, pw, poff, &den[l]);
    for (int t = 0; t < taps; ++t) wt[t * K + l] = pw[t];
  }
  for (int l = seg.n; l < (seg.n + 3) / 4 * 4; ++l)
    for (int t = 0; t < taps; ++t) wt[t * K + l] = 0.0;
  (void)off;
  return true;
}

// num[l, c0 .. c0 + NV vectors) for pixels l0 .. l0+3: sum over taps of wt[t, l] * S[off[t], c]
template <typename T, int NV>
OVSS_INLINE void jbu_block(const T* __restrict wt, const int64_t* off, int taps, const T* __restrict st,
                           int64_t Cp, int64_t c0, int l0, T* __restrict num) {
  typedef typename Vec32<T>::type V;
  constexpr int L = Vec32<T>::kLen;
  V acc[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int t = 0; t < taps; ++t) {
    const T* sp = st + off[t] * Cp + c0;
    V sv[NV];
    for (int v = 0; v < NV; ++v) memcpy(&sv[v], sp + v * L, sizeof(V));
    const T* wp = wt + t * kJbuChunk + l0;
    for (int i = 0; i < 4; ++i) {
      const T w = wp[i];
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] + w * sv[v];
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) memcpy(num + (l0 + i) * Cp + c0 + v * L, &acc[i][v], sizeof(V));
}

// num[l, :] for the segment's pixels (rows up to n rounded to 4)
template <typename T>
OVSS_INLINE void jbu_segment_numerators(const T* wt, const int64_t* off, int taps, const T* st, int64_t Cp, int n,
                                        T* num) {
  constexpr int L = Vec32<T>::kLen;
  for (int l0 = 0; l0 < n; l0 += 4) {
    int64_t c0 = 0;
    for (; c0 + 2 * L <= Cp; c0 += 2 * L) jbu_block<T, 2>(wt, off, taps, st, Cp, c0, l0, num);
    if (c0 < Cp) jbu_block<T, 1>(wt, off, taps, st, Cp, c0, l0, num);
  }
}

// In-register transposes of L x L blocks (rows r[i] -> columns): three (float) or two (double)
// stages of pairwise shuffles, the usual unpack / shuffle / lane-permute network.
OVSS_INLINE void transpose_block(Vec32<float>::type* r) {
  typedef Vec32<float>::type F;
  F a[8], t[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      t[i + k] = __builtin_shufflevector(a[i + k], a[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      t[i + k + 2] = __builtin_shufflevector(a[i + k], a[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  // t[0..3] hold pixels 0-3 of classes (0, 4), (2, 6), (1, 5), (3, 7) in their 128-bit halves; t[4..7]
  // the same for pixels 4-7
  const int order[4] = {0, 2, 1, 3};
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shufflevector(t[order[k]], t[order[k] + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = __builtin_shufflevector(t[order[k]], t[order[k] + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

OVSS_INLINE void transpose_block(Vec32<double>::type* r) {
  typedef Vec32<double>::type D;
  D a[4];
  for (int i = 0; i < 4; i += 2) {
    a[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 4, 2, 6);
    a[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 5, 3, 7);
  }
  r[0] = __builtin_shufflevector(a[0], a[2], 0, 1, 4, 5);
  r[1] = __builtin_shufflevector(a[1], a[3], 0, 1, 4, 5);
  r[2] = __builtin_shufflevector(a[0], a[2], 2, 3, 6, 7);
  r[3] = __builtin_shufflevector(a[1], a[3], 2, 3, 6, 7);
}

// jbu_upsample's row, channel-first: out[c, x] = num[x, c] / den[x] for c < C (o: class 0's row,
// plane: H * W between classes). L pixels x L classes per transpose; the division is elementwise,
// the same operation per value as dividing each pixel's numerators.
template <typename T>
OVSS_INLINE void jbu_store_row(const T* __restrict num, const T* __restrict den, int64_t Cp, int64_t C, int64_t W,
                               int64_t plane, T* __restrict o) {
  typedef typename Vec32<T>::type V;
  constexpr int L = Vec32<T>::kLen;
  int64_t x0 = 0;
  for (; x0 + L <= W; x0 += L) {
    V d;
    memcpy(&d, den + x0, sizeof(V));
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      V r[L];
      for (int i = 0; i < L; ++i) memcpy(&r[i], num + (x0 + i) * Cp + c0, sizeof(V));
      transpose_block(r);
      const int64_t nc = C - c0 < L ? C - c0 : L;
      for (int64_t j = 0; j < nc; ++j) {
        const V v = r[j] / d;
        memcpy(o + (c0 + j) * plane + x0, &v, sizeof(V));
      }
    }
  }
  for (; x0 < W; ++x0)
    for (int64_t c = 0; c < C; ++c) o[c * plane + x0] = num[x0 * Cp + c] / den[x0];
}

// One output row y of image b. kArgmax: labels[x] (labels: the row); else out: [B, C, H, W].
// Per segment: *fast = the matrix-product path ran (num unnormalised, den separate), else
// the per-pixel path filled num with the reference's rules.
template <typename T, bool kArgmax>
OVSS_INLINE void jbu_row(const JbuCpuData<T>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                         JbuWork<T>& wk, int64_t* labels, T* out) {
  const JbuShape<T>& s = d.s;
  const int64_t hw = s.h * s.w, HW = s.H * s.W, C = s.C, Cp = d.Cp;
  const T* g = d.g + b * 3 * HW;
  const T* gd = d.gd + b * 6 * hw;
  const T* st = d.st + b * hw * Cp;
  const int64_t cy = jbu_nearest(jbu_lowres_position(y, s.ratio_y));
  for (const JbuSegment& seg : segs) {
    // argmax: one segment's numerators at a time; upsample: the row's, written once per class below
    T* num = wk.num.data() + (kArgmax ? 0 : seg.x0 * Cp);
    bool bad;
    const int taps = jbu_tap_cells(s, cy, seg.cx, d.bad + b * hw, wk.off.data(), &bad);
    bool fast = !bad;
    if (fast) {
      if constexpr (sizeof(T) == 4) {
        fast = jbu_segment_weights(s, g, gd, y, seg, wk.off.data(), taps, wk.e.data(), wk.wt.data(), wk.den);
      } else {
        fast = jbu_segment_weights(s, g, gd, y, seg, wk.off.data(), taps, wk.e.data(), wk.wt.data(), wk.den,
                                   wk.pw.data(), wk.poff.data());
      }
    }
    if (fast) {
      jbu_segment_numerators(wk.wt.data(), wk.off.data(), taps, st, Cp, seg.n, num);
    } else {
      for (int l = 0; l < seg.n; ++l) {
        const int n = jbu_pixel_taps(s, g, gd, y, seg.x0 + l, wk.pw.data(), wk.poff.data(), &wk.den[l]);
        jbu_pixel_numerators(st, Cp, wk.pw.data(), wk.poff.data(), n, C, num + l * Cp);
      }
    }
    if constexpr (kArgmax) {
      for (int l = 0; l < seg.n; ++l) {
        const T* v = num + l * Cp;
        int64_t arg = 0;
        if (fast) {  // finite: the first class of the largest numerator
          const T m = lane_max(v, C, neg_inf<T>());
          while (v[arg] != m) ++arg;
        } else {
          T best = neg_inf<T>();
          for (int64_t c = 0; c < C; ++c) {
            const T val = v[c] / wk.den[l];
            if (argmax_better(val, best)) {
              best = val;
              arg = c;
            }
          }
        }
        labels[seg.x0 + l] = arg;
      }
    } else {
      for (int l = 0; l < seg.n; ++l) wk.rden[seg.x0 + l] = wk.den[l];
    }
  }
  if constexpr (!kArgmax) jbu_store_row(wk.num.data(), wk.rden.data(), Cp, C, s.W, HW, out + (b * C * s.H + y) * s.W);
}

// The op body shared by both files: rows in parallel, each thread its scratch. row_fn(d, segs,
// b, y, wk) runs one row (the .cpp's function-multiversioned entry).
template <typename T, typename RowFn>
inline void jbu_cpu_rows(const JbuCpuData<T>& d, RowFn row_fn) {
  const std::vector<JbuSegment> segs = jbu_segments(d.s);
  const int taps = (2 * d.s.radius + 1) * (2 * d.s.radius + 1);
  const int64_t H = d.s.H;
  at::parallel_for(0, d.s.B * H, 1, [&](int64_t r0, int64_t r1) {
    JbuWork<T> wk(taps, d.Cp, d.s.W);
    for (int64_t r = r0; r < r1; ++r) row_fn(d, segs, r / H, r % H, wk);
  });
}

}  // namespace ovss_fast
