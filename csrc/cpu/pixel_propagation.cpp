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

// The edge weights of row y towards the forward half of the square (dy > 0, or dy = 0 and dx > 0), each offset
// a loop over x (contiguous Lab planes, so it vectorises); slots off the image stay as they are (0).
template <typename T>
OVSS_INLINE void forward_weights_row(const T* lab,  // [3, H * W], scaled Lab planes
                                     T* s,          // [H * W, K]
                                     T* tmp,        // [W]
                                     int64_t y, Grid g, T inv_tau) {
  const int64_t H = g.H, W = g.W, HW = H * W, r = g.r, side = 2 * r + 1, K = g.K();
  for (int64_t dy = 0; dy <= r && y + dy < H; ++dy) {
    for (int64_t dx = dy == 0 ? 1 : -r; dx <= r; ++dx) {
      const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min<int64_t>(W, W - dx);
      const int64_t i0 = y * W, j0 = (y + dy) * W + dx;
      for (int64_t x = x0; x < x1; ++x) {
        const T d0 = lab[i0 + x] - lab[j0 + x], d1 = lab[HW + i0 + x] - lab[HW + j0 + x];
        const T d2 = lab[2 * HW + i0 + x] - lab[2 * HW + j0 + x];
        tmp[x] = pixel_edge_weight(d0, d1, d2, inv_tau);
      }
      const int64_t o = (dy + r) * side + dx + r;
      for (int64_t x = x0; x < x1; ++x) s[(i0 + x) * K + o] = tmp[x];
    }
  }
}

// sqrt of a sum of squares never sets errno: without it the compiler may vectorise sqrtf
__attribute__((optimize("no-math-errno"))) OVSS_CPU_CLONES void forward_weights_row_f32(
    const float* lab, float* s, float* tmp, int64_t y, Grid g, float inv_tau) {
  forward_weights_row<float>(lab, s, tmp, y, g, inv_tau);
}
inline void forward_weights_row_any(const float* lab, float* s, float* tmp, int64_t y, Grid g, float inv_tau) {
  forward_weights_row_f32(lab, s, tmp, y, g, inv_tau);
}
inline void forward_weights_row_any(const double* lab, double* s, double* tmp, int64_t y, Grid g, double inv_tau) {
  forward_weights_row<double>(lab, s, tmp, y, g, inv_tau);
}

// the stencil weights s [H * W, K] of one image [3, H, W]: the forward half computed, the backward half copied
// (w_ij = w_ji: pixel i's slot -o is pixel i - o's slot o), then d^-1/2 on both sides
template <typename T>
void pixel_graph(const T* image, T* s, Grid g, T tau) {
  const int64_t H = g.H, W = g.W, HW = H * W, r = g.r, side = 2 * r + 1, K = g.K();
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
      std::fill(s + y * W * K, s + (y + 1) * W * K, T(0));
      forward_weights_row_any(lab.data(), s, tmp.data(), y, g, inv_tau);
    }
  });
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        T* si = s + i * K;
        // backward half: slots before the centre, read from the neighbour's forward slot
        for (int64_t dy = std::max(-r, -y); dy <= 0; ++dy)
          for (int64_t dx = std::max(-r, -x); dx <= (dy == 0 ? -1 : std::min(r, W - 1 - x)); ++dx) {
            const int64_t o = (dy + r) * side + dx + r;
            si[o] = s[(i + dy * W + dx) * K + (K - 1 - o)];
          }
        T degree = 0;
        for (int64_t o = 0; o < K; ++o) degree += si[o];
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
  if (scores.numel() == 0) return at::empty(scores.sizes(), scores.options().dtype(dt));
  const at::Tensor y0 = pad_classes(scores.to(dt).permute({0, 2, 3, 1}).contiguous());  // [B, H, W, Cp]
  const at::Tensor img = prepare(image, dt);
  at::Tensor out = at::empty(y0.sizes(), y0.options());
  const int64_t Cp = y0.size(3);
  const Grid g{H, W, Cp, radius};
  at::Tensor s = at::empty({H * W, g.K()}, y0.options());
  for (int64_t b = 0; b < B; ++b) {
    if (dt == at::kDouble) {
      pixel_propagation_image<double>(img.const_data_ptr<double>() + b * 3 * H * W,
                                      y0.const_data_ptr<double>() + b * H * W * Cp,
                                      out.mutable_data_ptr<double>() + b * H * W * Cp, s.mutable_data_ptr<double>(),
                                      g, tau, alpha, iters, tol);
    } else {
      pixel_propagation_image<float>(img.const_data_ptr<float>() + b * 3 * H * W,
                                     y0.const_data_ptr<float>() + b * H * W * Cp,
                                     out.mutable_data_ptr<float>() + b * H * W * Cp, s.mutable_data_ptr<float>(), g,
                                     static_cast<float>(tau), static_cast<float>(alpha), iters,
                                     static_cast<float>(tol));
    }
  }
  return out.narrow(3, 0, C).permute({0, 3, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("pixel_propagation", &pixel_propagation_cpu); }

}  // namespace ovss_fast
