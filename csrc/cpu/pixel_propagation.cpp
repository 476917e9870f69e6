// LPOSS+'s pixel stage (Stojnic et al., CVPR 2025; docs/lposs.md; the spec: reference.pixel_propagation):
// per image and class, x solves (I - alpha S) x = y0 by conjugate gradient from 0, S = D^-1/2 W D^-1/2 with
// w_ij = exp(-||lab_i - lab_j|| / tau) for j in the (2r+1)^2 square around i (not i; inside the image).
// S is held as stencil weights [H * W, (2r+1)^2] (the centre slot 0), never an edge list; the CG's vectors
// are [H * W, C] (a pixel's classes contiguous, so one stencil weight serves all C classes). The CG:
// cpu/propagation_cg.h, one block per image row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/propagation_checks.h"
#include "common/propagation_math.h"
#include "cpu/cpu_simd.h"
#include "cpu/propagation_cg.h"
#include "cpu/propagation_matvec.h"

namespace ovss_fast {
namespace {

struct Grid {
  int64_t H, W, C, r;
  int64_t K() const { return (2 * r + 1) * (2 * r + 1); }
};

// q_i = p_i - alpha sum_j s_ij p_j for the pixels of row y; pq[c] = sum_i p_ic q_ic over the row
// (cpu/propagation_matvec.h: the classes in register blocks, the stencil walked once per block)
template <typename T>
OVSS_INLINE void stencil_row(const T* s,  // [H * W, K]
                             const T* p,  // [H * W, C]
                             T* q,        // [H * W, C]
                             double* pq,  // [C]
                             int64_t y, Grid g, T alpha) {
  const int64_t C = g.C, W = g.W, r = g.r, K = g.K();
  const int64_t dy0 = std::max(-r, -y), dy1 = std::min(r, g.H - 1 - y);
  for (int64_t c = 0; c < C; ++c) pq[c] = 0;
  for (int64_t x = 0; x < W; ++x) {
    const int64_t i = y * W + x;
    const int64_t dx0 = std::max(-r, -x), dx1 = std::min(r, W - 1 - x);
    for_class_blocks<T>(C, [&]<int NV>(int64_t c0) OVSS_LAMBDA_INLINE {
      stencil_node<T, NV>(s + i * K, p, q, pq, i, c0, C, W, r, dy0, dy1, dx0, dx1, alpha);
    });
  }
}

OVSS_CPU_CLONES void stencil_row_f32(const float* s, const float* p, float* q, double* pq, int64_t y, Grid g,
                                     float alpha) {
  stencil_row<float>(s, p, q, pq, y, g, alpha);
}
inline void stencil_row_any(const float* s, const float* p, float* q, double* pq, int64_t y, Grid g, float alpha) {
  stencil_row_f32(s, p, q, pq, y, g, alpha);
}
inline void stencil_row_any(const double* s, const double* p, double* q, double* pq, int64_t y, Grid g,
                            double alpha) {
  stencil_row<double>(s, p, q, pq, y, g, alpha);
}

// tmp[x] = w(lab_i[x], lab_j[x]) for x in [x0, x1), common/propagation_math.h's pixel_edge_weight written so that
// it vectorises: float takes the exponent -sqrt(.) / tau in one loop, then exp 8 lanes at a time (cpu_simd.h:
// the same bits as math_exp for x <= 0; the scalar tail calls math_exp)
template <typename T>
OVSS_INLINE void edge_weights_run(const T* li, const T* lj, int64_t HW, T* tmp, int64_t x0, int64_t x1, T inv_tau) {
  if constexpr (std::is_same_v<T, float>) {
    typedef Vec32<float>::type F;
    for (int64_t x = x0; x < x1; ++x) {
      const T d0 = li[x] - lj[x], d1 = li[HW + x] - lj[HW + x], d2 = li[2 * HW + x] - lj[2 * HW + x];
      tmp[x] = -__builtin_sqrtf(d0 * d0 + d1 * d1 + d2 * d2) * inv_tau;
    }
    int64_t x = x0;
    for (; x + 8 <= x1; x += 8) {
      F e;
      memcpy(&e, tmp + x, sizeof(F));
      e = math_exp_nonpositive_x8(e);
      memcpy(tmp + x, &e, sizeof(F));
    }
    for (; x < x1; ++x) tmp[x] = math_exp(tmp[x]);
  } else {
    for (int64_t x = x0; x < x1; ++x) {
      const T d0 = li[x] - lj[x], d1 = li[HW + x] - lj[HW + x], d2 = li[2 * HW + x] - lj[2 * HW + x];
      tmp[x] = pixel_edge_weight(d0, d1, d2, inv_tau);
    }
  }
}

// Row y's raw edge weights w_ij (all (2r+1)^2 slots of each pixel: 0 for the centre and off the image) and
// degrees. Each offset is a loop over x (contiguous Lab planes, so it vectorises) into tmp, then stored into
// the pixels' slots (the row's slots stay in L2); the degree is summed in slot order as the offsets go, so
// d_i = sum_o w_io in the same order as a loop over a pixel's slots. w_ij = w_ji bit for bit (the same squares).
template <typename T>
OVSS_INLINE void raw_weights_row(const T* lab,  // [3, H * W], scaled Lab planes
                                 T* s,          // [H * W, K]
                                 T* degree,     // [H * W]
                                 T* tmp,        // [W]
                                 int64_t y, Grid g, T inv_tau) {
  const int64_t H = g.H, W = g.W, HW = H * W, r = g.r, side = 2 * r + 1, K = g.K();
  const int64_t i0 = y * W;
  std::fill(s + i0 * K, s + (i0 + W) * K, T(0));
  std::fill(degree + i0, degree + i0 + W, T(0));
  for (int64_t dy = std::max(-r, -y); dy <= std::min(r, H - 1 - y); ++dy) {
    for (int64_t dx = -r; dx <= r; ++dx) {
      if (dy == 0 && dx == 0) continue;
      const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min<int64_t>(W, W - dx);
      const int64_t j0 = (y + dy) * W + dx;
      edge_weights_run(lab + i0, lab + j0, HW, tmp, x0, x1, inv_tau);
      for (int64_t x = x0; x < x1; ++x) degree[i0 + x] += tmp[x];
      const int64_t o = (dy + r) * side + dx + r;
      for (int64_t x = x0; x < x1; ++x) s[(i0 + x) * K + o] = tmp[x];
    }
  }
}

// sqrt of a sum of squares never sets errno: without it the compiler may vectorise sqrtf; flatten inlines
// the exp's helpers into each clone (out of line, a vector argument would cross an ABI boundary)
__attribute__((optimize("no-math-errno"), flatten)) OVSS_CPU_CLONES void raw_weights_row_f32(
    const float* lab, float* s, float* degree, float* tmp, int64_t y, Grid g, float inv_tau) {
  raw_weights_row<float>(lab, s, degree, tmp, y, g, inv_tau);
}
inline void raw_weights_row_any(const float* lab, float* s, float* degree, float* tmp, int64_t y, Grid g,
                                float inv_tau) {
  raw_weights_row_f32(lab, s, degree, tmp, y, g, inv_tau);
}
inline void raw_weights_row_any(const double* lab, double* s, double* degree, double* tmp, int64_t y, Grid g,
                                double inv_tau) {
  raw_weights_row<double>(lab, s, degree, tmp, y, g, inv_tau);
}

// s_ij = w_ij inv_i inv_j on the slots of row y's pixels inside the image (inv = d^-1/2, contiguous in x)
template <typename T>
OVSS_INLINE void normalise_row(T* s, const T* inv, int64_t y, Grid g) {
  const int64_t H = g.H, W = g.W, r = g.r, side = 2 * r + 1, K = g.K();
  for (int64_t x = 0; x < W; ++x) {
    const int64_t i = y * W + x;
    T* si = s + i * K;
    const int64_t dx0 = std::max(-r, -x), dx1 = std::min(r, W - 1 - x);
    for (int64_t dy = std::max(-r, -y); dy <= std::min(r, H - 1 - y); ++dy) {
      T* so = si + (dy + r) * side + r;
      const T* ij = inv + i + dy * W;
      for (int64_t dx = dx0; dx <= dx1; ++dx) so[dx] *= inv[i] * ij[dx];
    }
  }
}

OVSS_CPU_CLONES void normalise_row_f32(float* s, const float* inv, int64_t y, Grid g) {
  normalise_row<float>(s, inv, y, g);
}
inline void normalise_row_any(float* s, const float* inv, int64_t y, Grid g) { normalise_row_f32(s, inv, y, g); }
inline void normalise_row_any(double* s, const double* inv, int64_t y, Grid g) { normalise_row<double>(s, inv, y, g); }

// the stencil weights s [H * W, K] of one image [3, H, W]: raw weights and degrees row by row, then d^-1/2 on
// both sides
template <typename T>
void pixel_graph(const T* image, T* s, Grid g, T tau) {
  const int64_t H = g.H, W = g.W, HW = H * W;
  std::vector<T> lab(HW * 3), inv(HW);
  at::parallel_for(0, HW, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T px[3];
      scaled_lab(image[i], image[HW + i], image[2 * HW + i], px);
      lab[i] = px[0];
      lab[HW + i] = px[1];
      lab[2 * HW + i] = px[2];
    }
  });
  const T inv_tau = T(1) / tau;
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    std::vector<T> tmp(W);
    for (int64_t y = y0; y < y1; ++y) {
      raw_weights_row_any(lab.data(), s, inv.data(), tmp.data(), y, g, inv_tau);
      for (int64_t x = 0; x < W; ++x) inv[y * W + x] = inverse_sqrt_degree(inv[y * W + x]);
    }
  });
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) normalise_row_any(s, inv.data(), y, g);
  });
}

// [C, H * W] planes <-> [H * W, Cp] rows (classes C..Cp-1 zero), in tiles of 64 pixels x 8 classes
template <typename T>
void planes_to_rows(const T* src, T* dst, int64_t C, int64_t Cp, int64_t HW) {
  at::parallel_for(0, (HW + 63) / 64, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t i0 = t0 * 64; i0 < std::min(HW, t1 * 64); i0 += 64) {
      const int64_t i1 = std::min(HW, i0 + 64);
      for (int64_t c0 = 0; c0 < Cp; c0 += 8)
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t c = c0; c < c0 + 8; ++c) dst[i * Cp + c] = c < C ? src[c * HW + i] : T(0);
    }
  });
}
template <typename T>
void rows_to_planes(const T* src, T* dst, int64_t C, int64_t Cp, int64_t HW) {
  at::parallel_for(0, (HW + 63) / 64, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t i0 = t0 * 64; i0 < std::min(HW, t1 * 64); i0 += 64) {
      const int64_t i1 = std::min(HW, i0 + 64);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = i0; i < i1; ++i) dst[c * HW + i] = src[i * Cp + c];
    }
  });
}

template <typename T>
void pixel_propagation_image(const T* image,  // [3, H, W]
                             const T* b,      // [C, H, W]
                             T* out,          // [C, H, W]
                             T* s,            // [H * W, K] scratch
                             CgVectors<T> v,  // [H * W, Cp] scratch each
                             int64_t C, Grid g, T tau, T alpha, int64_t iters, T tol) {
  const int64_t HW = g.H * g.W;
  pixel_graph(image, s, g, tau);
  planes_to_rows(b, v.r, C, g.C, HW);
  // one block per image row
  const auto matvec = [&](int64_t y, const T* p, T* q, double* pq) { stencil_row_any(s, p, q, pq, y, g, alpha); };
  batched_cg_cpu<T>(matvec, v, HW, g.C, g.W, iters, tol);
  rows_to_planes(v.x, out, C, g.C, HW);
}

at::Tensor pixel_propagation_cpu(const at::Tensor& scores, const at::Tensor& image, int64_t radius, double tau,
                                 double alpha, int64_t iters, double tol) {
  check_pixel_propagation_args(scores, image, radius, tau, alpha, iters, tol, c10::DeviceType::CPU);
  const int64_t B = scores.size(0), C = scores.size(1), H = scores.size(2), W = scores.size(3);
  const auto dt = compute_dtype(scores, image);
  if (scores.numel() == 0) return at::empty(scores.sizes(), scores.options().dtype(dt));
  const at::Tensor y0 = prepare(scores, dt), img = prepare(image, dt);
  const int64_t Cp = padded_classes(C), HW = H * W;
  const Grid g{H, W, Cp, radius};
  at::Tensor s = at::empty({HW, g.K()}, y0.options());
  // the CG's r, then x, p, q; r is free once the CG is done, and one image's output [C, H, W] fits in it
  at::Tensor r = at::empty({HW * Cp}, y0.options()), xpq = at::empty({3, HW, Cp}, y0.options());
  at::Tensor out = B == 1 ? r.narrow(0, 0, C * HW).view(scores.sizes()) : at::empty(y0.sizes(), y0.options());
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    T* v = xpq.mutable_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      pixel_propagation_image<T>(img.const_data_ptr<T>() + b * 3 * HW, y0.const_data_ptr<T>() + b * C * HW,
                                 out.mutable_data_ptr<T>() + b * C * HW, s.mutable_data_ptr<T>(),
                                 {r.mutable_data_ptr<T>(), v, v + HW * Cp, v + 2 * HW * Cp}, C, g, static_cast<T>(tau),
                                 static_cast<T>(alpha), iters, static_cast<T>(tol));
  };
  if (dt == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("pixel_propagation", &pixel_propagation_cpu); }

}  // namespace ovss_fast
