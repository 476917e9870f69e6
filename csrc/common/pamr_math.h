// PAMR, pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020), as the peers ship it
// (NACLIP's / SCLIP's pamr.py; ovss_fast/kernels/reference.py pamr, pamr_affinity): the math
// shared by the CPU kernels (csrc/cpu/pamr.cpp) and the CUDA kernels (csrc/cuda/pamr_kernel.cu).
//
// Neighbours: for each dilation d (index i) the 8 pixels at d (dy, dx), (dy, dx) the 3 x 3 square
// minus its centre row by row (reference PAMR_OFFSETS): neighbour j = 8 i + o, P = 8 len(dilations).
// Reads off the image are clamped to the border (the peers' replicate padding), never padded.
//
// Affinities of image x [K, H, W] at pixel p (computed once):
//   s_k  = unbiased std of the 9 len(dilations) values of p's dilated 3 x 3 squares taken together
//          (the centre once per dilation), two passes (mean, then squared deviations)
//   e_j  = (1 / K) sum_k -|x_k(p) - x_k(p + d_j)| / (1e-8 + 0.1 s_k)   (times the reciprocal, one division per k)
//   a_j  = exp(e_j - max e) / sum_j' exp(e_j' - max e)
// The affinities are computed in double whatever the inputs (once; cheap beside the steps) and rounded
// to the compute dtype once: float32 affinities put 1.4e-5 of relative error into 50 float32 steps with
// dilations (1, 2, 4, 8, 12, 24), double ones 6e-6 (the rest is the steps' own float32 rounding).
// One refinement step (iters of them, ping-pong between two [C, H, W] buffers):
//   out_c(p) = sum_j a_j(p) m_c(p + d_j), summed in j order from a_0 m_0.
// No torch headers.
#pragma once

#include <stdint.h>

#include "hostdevice.h"

namespace ovss_fast {

// neighbour o in 0..7 of the 3 x 3 square minus its centre, row by row: (dy, dx) in units of the dilation
HOSTDEVICE void pamr_offset(int o, int* dy, int* dx) {
  const int q = o < 4 ? o : o + 1;  // skip the centre, index 4 of the square
  *dy = q / 3 - 1;
  *dx = q % 3 - 1;
}

// replicate padding: an index clamped to [0, n - 1]
HOSTDEVICE int64_t pamr_clamp(int64_t v, int64_t n) { return v < 0 ? 0 : (v >= n ? n - 1 : v); }

// PAMR's std denominator 1e-8 + 0.1 s, rounded as the peers' float tensors round it
template <typename T>
HOSTDEVICE T pamr_denominator(T s) {
  return static_cast<T>(1e-8) + static_cast<T>(0.1) * s;
}

// The affinities of one pixel (y, x) of one image: img [K, H, W], dil [nd], a = &A[0, y, x] of A [P, H, W]
// (stride hw between neighbours). a first holds the logit sums over k, then the softmax.
template <typename T>
HOSTDEVICE void pamr_affinity_pixel(const T* img, int64_t K, int64_t H, int64_t W, const int64_t* dil, int nd,
                                    int64_t y, int64_t x, T* a) {
  const int64_t hw = H * W;
  const int n = 9 * nd;
  const int P = 8 * nd;
  for (int64_t k = 0; k < K; ++k) {
    const T* xk = img + k * hw;
    const T c = xk[y * W + x];
    T sum = 0;
    for (int i = 0; i < nd; ++i) {
      sum += c;
      for (int o = 0; o < 8; ++o) {
        int dy, dx;
        pamr_offset(o, &dy, &dx);
        sum += xk[pamr_clamp(y + dy * dil[i], H) * W + pamr_clamp(x + dx * dil[i], W)];
      }
    }
    const T mean = sum / static_cast<T>(n);
    T ss = 0;
    for (int i = 0; i < nd; ++i) {
      ss += (c - mean) * (c - mean);
      for (int o = 0; o < 8; ++o) {
        int dy, dx;
        pamr_offset(o, &dy, &dx);
        const T t = xk[pamr_clamp(y + dy * dil[i], H) * W + pamr_clamp(x + dx * dil[i], W)];
        ss += (t - mean) * (t - mean);
      }
    }
    const T inv = static_cast<T>(1) / pamr_denominator(math_sqrt(ss / static_cast<T>(n - 1)));
    for (int i = 0; i < nd; ++i) {
      for (int o = 0; o < 8; ++o) {
        int dy, dx;
        pamr_offset(o, &dy, &dx);
        const T t = xk[pamr_clamp(y + dy * dil[i], H) * W + pamr_clamp(x + dx * dil[i], W)];
        const T diff = c > t ? c - t : t - c;
        const T e = -(diff * inv);
        T* aj = a + (8 * i + o) * hw;
        *aj = k == 0 ? e : *aj + e;
      }
    }
  }
  // mean over k, then the softmax over the P neighbours
  T mx = neg_inf<T>();
  for (int j = 0; j < P; ++j) {
    const T e = a[j * hw] / static_cast<T>(K);
    a[j * hw] = e;
    mx = e > mx ? e : mx;
  }
  T total = 0;
  for (int j = 0; j < P; ++j) {
    const T w = math_exp(a[j * hw] - mx);
    a[j * hw] = w;
    total += w;
  }
  for (int j = 0; j < P; ++j) a[j * hw] = a[j * hw] / total;
}

}  // namespace ovss_fast

namespace ovss_fast {

// One refinement step at (y, x) for one class: src = m_c [H, W], a = &A[0, y, x] of A [P, H, W]
template <typename T>
HOSTDEVICE T pamr_step_pixel(const T* src, const T* a, int64_t H, int64_t W, const int64_t* dil, int nd, int64_t y,
                             int64_t x) {
  const int64_t hw = H * W;
  T acc = 0;
  for (int i = 0; i < nd; ++i) {
    for (int o = 0; o < 8; ++o) {
      int dy, dx;
      pamr_offset(o, &dy, &dx);
      acc += a[(8 * i + o) * hw] * src[pamr_clamp(y + dy * dil[i], H) * W + pamr_clamp(x + dx * dil[i], W)];
    }
  }
  return acc;
}

}  // namespace ovss_fast
