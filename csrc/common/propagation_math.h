// LPOSS / LPOSS+ label propagation (Stojnic et al., CVPR 2025; docs/lposs.md): the arithmetic the CPU and
// CUDA kernels share. The pixel stage's edge weight w_ij = exp(-||lab_i - lab_j|| / tau) on Lab scaled by
// (100, 128, 128), the sRGB -> Lab conversion of kornia's rgb_to_lab (D65), and the per-class conjugate
// gradient scalars of cupyx.scipy.sparse.linalg.cg (x0 = 0, stop after the first step with ||r|| <= tol ||b||;
// a stopped class takes no further step). The spec: ovss_fast/kernels/reference.py, pixel_graph and
// propagation_cg.
#pragma once

#include "common/hostdevice.h"

namespace ovss_fast {

// one sRGB channel in [0, 1] -> linear RGB
template <typename T>
HOSTDEVICE T srgb_to_linear(T v) {
  const T c = v + static_cast<T>(0.055);
  return v > static_cast<T>(0.04045) ? static_cast<T>(pow(static_cast<double>((c > 0 ? c : T(0)) / T(1.055)), 2.4))
                                     : v / static_cast<T>(12.92);
}

template <typename T>
HOSTDEVICE T lab_f(T t) {
  const T th = static_cast<T>(0.008856);
  return t > th ? static_cast<T>(cbrt(static_cast<double>(t))) : static_cast<T>(7.787) * t + static_cast<T>(4.0 / 29.0);
}

// sRGB (r, g, b) in [0, 1] -> (L / 100, a / 128, b / 128), as kornia.color.rgb_to_lab then LPOSS's scaling
template <typename T>
HOSTDEVICE void scaled_lab(T r, T g, T b, T* out) {
  const T lr = srgb_to_linear(r), lg = srgb_to_linear(g), lb = srgb_to_linear(b);
  const T x = (static_cast<T>(0.412453) * lr + static_cast<T>(0.357580) * lg + static_cast<T>(0.180423) * lb) /
              static_cast<T>(0.95047);
  const T y = static_cast<T>(0.212671) * lr + static_cast<T>(0.715160) * lg + static_cast<T>(0.072169) * lb;
  const T z = (static_cast<T>(0.019334) * lr + static_cast<T>(0.119193) * lg + static_cast<T>(0.950227) * lb) /
              static_cast<T>(1.08883);
  const T fx = lab_f(x), fy = lab_f(y), fz = lab_f(z);
  out[0] = (static_cast<T>(116.0) * fy - static_cast<T>(16.0)) / static_cast<T>(100.0);
  out[1] = static_cast<T>(500.0) * (fx - fy) / static_cast<T>(128.0);
  out[2] = static_cast<T>(200.0) * (fy - fz) / static_cast<T>(128.0);
}

// the edge weight between two pixels whose scaled Lab colours differ by (d0, d1, d2)
template <typename T>
HOSTDEVICE T pixel_edge_weight(T d0, T d1, T d2, T inv_tau) {
  return math_exp(-math_sqrt(d0 * d0 + d1 * d1 + d2 * d2) * inv_tau);
}

// 1 / sqrt(degree), a degree of 0 counting as 1 (normalize_connection_graph)
template <typename T>
HOSTDEVICE T inverse_sqrt_degree(T degree) {
  return static_cast<T>(1) / math_sqrt(degree == T(0) ? T(1) : degree);
}

// CG, one class: the step size rho / (p . A p), 0 once the class has stopped
template <typename T>
HOSTDEVICE T cg_step(bool active, T rho, T pq) {
  return active ? rho / pq : T(0);
}

// CG, one class, after a step: whether it goes on (cupyx: break when ||r|| <= tol ||b||)
template <typename T>
HOSTDEVICE bool cg_continues(bool active, T rho_new, T atol) {
  return active && !(math_sqrt(rho_new) <= atol);
}

// CG, one class: beta = rho_new / rho for the next direction p = r + beta p (unused once stopped)
template <typename T>
HOSTDEVICE T cg_beta(bool active, T rho_new, T rho) {
  return active ? rho_new / rho : T(0);
}

}  // namespace ovss_fast
