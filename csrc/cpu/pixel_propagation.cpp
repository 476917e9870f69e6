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

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/propagation_math.h"
#include "cpu/cpu_simd.h"
#include "cpu/propagation_cg.h"

namespace ovss_fast {
namespace {

struct Grid {
  int64_t H, W, C, r;
  int64_t K() const { return (2 * r + 1) * (2 * r + 1); }
};

// q_i = p_i - alpha sum_j s_ij p_j for the pixels of row y; pq[c] = sum_i p_ic q_ic over the row
template <typename T>
OVSS_INLINE void stencil_row(const T* s,  // [H * W, K]
                             const T* p,  // [H * W, C]
                             T* q,        // [H * W, C]
                             double* pq,  // [C]
                             int64_t y, Grid g, T alpha) {
  const int64_t C = g.C, W = g.W, r = g.r, side = 2 * r + 1;
  const int64_t dy0 = std::max(-r, -y), dy1 = std::min(r, g.H - 1 - y);
  for (int64_t c = 0; c < C; ++c) pq[c] = 0;
  for (int64_t x = 0; x < W; ++x) {
    const int64_t i = y * W + x;
    T* qi = q + i * C;
    for (int64_t c = 0; c < C; ++c) qi[c] = 0;
    const int64_t dx0 = std::max(-r, -x), dx1 = std::min(r, W - 1 - x);
    for (int64_t dy = dy0; dy <= dy1; ++dy) {
      const T* srow = s + i * g.K() + (dy + r) * side + r;
      const T* prow = p + (i + dy * W) * C;
      for (int64_t dx = dx0; dx <= dx1; ++dx) {
        const T w = srow[dx];
        const T* pn = prow + dx * C;
        for (int64_t c = 0; c < C; ++c) qi[c] += w * pn[c];
      }
    }
    const T* pi = p + i * C;
    for (int64_t c = 0; c < C; ++c) {
      qi[c] = pi[c] - alpha * qi[c];
      pq[c] += static_cast<double>(pi[c]) * static_cast<double>(qi[c]);
    }
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

// the stencil weights s [H * W, K] of one image [3, H, W]
template <typename T>
void pixel_graph(const T* image, T* s, Grid g, T tau) {
  const int64_t H = g.H, W = g.W, HW = H * W, r = g.r, side = 2 * r + 1, K = g.K();
  std::vector<T> lab(HW * 3), inv(HW);
  at::parallel_for(0, HW, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) scaled_lab(image[i], image[HW + i], image[2 * HW + i], lab.data() + 3 * i);
  });
  const T inv_tau = T(1) / tau;
  // weights and degrees, then the symmetric normalisation
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        T* si = s + i * K;
        T degree = 0;
        for (int64_t dy = -r; dy <= r; ++dy) {
          for (int64_t dx = -r; dx <= r; ++dx) {
            const int64_t yy = y + dy, xx = x + dx;
            const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < W && (dy != 0 || dx != 0);
            const T w = inside ? pixel_edge_weight(lab.data() + 3 * i, lab.data() + 3 * (yy * W + xx), inv_tau)
                               : T(0);
            si[(dy + r) * side + dx + r] = w;
            degree += w;
          }
        }
        inv[i] = inverse_sqrt_degree(degree);
      }
    }
  });
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        T* si = s + i * K;
        for (int64_t dy = std::max(-r, -y); dy <= std::min(r, H - 1 - y); ++dy)
          for (int64_t dx = std::max(-r, -x); dx <= std::min(r, W - 1 - x); ++dx)
            si[(dy + r) * side + dx + r] *= inv[i] * inv[(y + dy) * W + x + dx];
      }
    }
  });
}

template <typename T>
void pixel_propagation_image(const T* image,  // [3, H, W]
                             const T* b,      // [H * W, C]
                             T* x,            // [H * W, C]
                             T* s,            // [H * W, K] scratch
                             Grid g, T tau, T alpha, int64_t iters, T tol) {
  pixel_graph(image, s, g, tau);
  // one block per image row
  const auto matvec = [&](int64_t y, const T* p, T* q, double* pq) { stencil_row_any(s, p, q, pq, y, g, alpha); };
  batched_cg_cpu<T>(matvec, b, x, g.H * g.W, g.C, g.W, iters, tol);
}

at::Tensor pixel_propagation_cpu(const at::Tensor& scores, const at::Tensor& image, int64_t radius, double tau,
                                 double alpha, int64_t iters, double tol) {
  check_cpu_floating(scores, "scores", 4, "[B, C, H, W]");
  check_cpu_floating(image, "image", 4, "[B, 3, H, W]");
  check_same_device(scores, "scores", image, "image");
  const int64_t B = scores.size(0), C = scores.size(1), H = scores.size(2), W = scores.size(3);
  TORCH_CHECK(image.size(0) == B && image.size(1) == 3 && image.size(2) == H && image.size(3) == W,
              "image should be [B, 3, H, W] = [", B, ", 3, ", H, ", ", W, "] to match scores, got ", shape_str(image));
  TORCH_CHECK(radius >= 1 && radius <= 64, "radius should be in [1, 64], got ", radius);
  TORCH_CHECK(tau > 0, "tau should be > 0, got ", tau);
  check_cg_arguments(alpha, iters, tol);
  const auto dt = compute_dtype(scores, image);
  const at::Tensor y0 = scores.to(dt).permute({0, 2, 3, 1}).contiguous();  // [B, H, W, C]
  const at::Tensor img = prepare(image, dt);
  at::Tensor out = at::empty(y0.sizes(), y0.options());
  if (out.numel() == 0) return out.permute({0, 3, 1, 2}).contiguous();
  const Grid g{H, W, C, radius};
  at::Tensor s = at::empty({H * W, g.K()}, y0.options());
  for (int64_t b = 0; b < B; ++b) {
    if (dt == at::kDouble) {
      pixel_propagation_image<double>(img.const_data_ptr<double>() + b * 3 * H * W,
                                      y0.const_data_ptr<double>() + b * H * W * C,
                                      out.mutable_data_ptr<double>() + b * H * W * C, s.mutable_data_ptr<double>(),
                                      g, tau, alpha, iters, tol);
    } else {
      pixel_propagation_image<float>(img.const_data_ptr<float>() + b * 3 * H * W,
                                     y0.const_data_ptr<float>() + b * H * W * C,
                                     out.mutable_data_ptr<float>() + b * H * W * C, s.mutable_data_ptr<float>(), g,
                                     static_cast<float>(tau), static_cast<float>(alpha), iters,
                                     static_cast<float>(tol));
    }
  }
  return out.permute({0, 3, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("pixel_propagation", &pixel_propagation_cpu); }

}  // namespace ovss_fast
