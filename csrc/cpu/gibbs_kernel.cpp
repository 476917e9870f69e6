// method.md section 2 on the CPU: cost C = normalised -log(Sym / M + 1e-12), Sym =
// (A + A^T)/2 and M its per-image max (scale-free), and kernel K = exp(-C / eps).
// Two passes over [B, N, N] in 64 x 64 tiles; each tile first copies its mirror tile
// of A, transposed, into a local buffer, so Sym's rows are two contiguous reads and
// the per-element math (common/gibbs_kernel_math.h, branch-free float exp / log)
// vectorises:
//   pass 1: Sym's min and max per image, over the upper tiles (Sym is symmetric);
//   pass 2: C and K for every tile, written row by row (M is pass 1's max).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/gibbs_kernel_math.h"
#include "common/gibbs_kernel_checks.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {
namespace {

constexpr int64_t kTile = 64;

// mt[ii * kTile + jj] = a[(j0 + jj) * N + (i0 + ii)]: the mirror tile, transposed
template <typename T>
OVSS_INLINE void load_mirror(const T* a, int64_t N, int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* mt) {
  for (int64_t jj = 0; jj < nj; ++jj) {
    const T* src = a + (j0 + jj) * N + i0;
    for (int64_t ii = 0; ii < ni; ++ii) mt[ii * kTile + jj] = src[ii];
  }
}

template <typename T>
OVSS_INLINE void tile_minmax(const T* a, int64_t N, int64_t i0, int64_t j0, T* lo, T* hi) {
  alignas(64) T mt[kTile * kTile];
  T lo_acc[kTile], hi_acc[kTile];
  const int64_t ni = std::min(kTile, N - i0), nj = std::min(kTile, N - j0);
  load_mirror(a, N, i0, ni, j0, nj, mt);
  for (int64_t jj = 0; jj < kTile; ++jj) {
    lo_acc[jj] = std::numeric_limits<T>::infinity();
    hi_acc[jj] = -std::numeric_limits<T>::infinity();
  }
  for (int64_t ii = 0; ii < ni; ++ii) {
    const T* row = a + (i0 + ii) * N + j0;
    const T* mrow = mt + ii * kTile;
    for (int64_t jj = 0; jj < nj; ++jj) {
      const T s = symmetric_affinity(row[jj], mrow[jj]);
      lo_acc[jj] = s < lo_acc[jj] ? s : lo_acc[jj];
      hi_acc[jj] = s > hi_acc[jj] ? s : hi_acc[jj];
    }
  }
  for (int64_t jj = 0; jj < nj; ++jj) {
    *lo = std::min(*lo, lo_acc[jj]);
    *hi = std::max(*hi, hi_acc[jj]);
  }
}

template <typename T>
OVSS_INLINE void tile_values(const T* a, int64_t N, int64_t i0, int64_t j0, T scale, T lo, T span, T eps, T* cost,
                             T* kern) {
  alignas(64) T mt[kTile * kTile];
  const int64_t ni = std::min(kTile, N - i0), nj = std::min(kTile, N - j0);
  load_mirror(a, N, i0, ni, j0, nj, mt);
  for (int64_t ii = 0; ii < ni; ++ii) {
    const int64_t off = (i0 + ii) * N + j0;
    const T* row = a + off;
    const T* mrow = mt + ii * kTile;
    T* crow = cost + off;
    T* krow = kern + off;
    for (int64_t jj = 0; jj < nj; ++jj) {
      const T c = normalised_cost(symmetric_affinity(row[jj], mrow[jj]), scale, lo, span);
      crow[jj] = c;
      krow[jj] = gibbs_value(c, eps);
    }
  }
}

// float32 entry points, compiled for several instruction sets (cpu_simd.h)
OVSS_CPU_CLONES void tile_minmax_f32(const float* a, int64_t N, int64_t i0, int64_t j0, float* lo, float* hi) {
  tile_minmax<float>(a, N, i0, j0, lo, hi);
}
OVSS_CPU_CLONES void tile_values_f32(const float* a, int64_t N, int64_t i0, int64_t j0, float scale, float lo,
                                     float span, float eps, float* cost, float* kern) {
  tile_values<float>(a, N, i0, j0, scale, lo, span, eps, cost, kern);
}
inline void tile_minmax_any(const float* a, int64_t N, int64_t i0, int64_t j0, float* lo, float* hi) {
  tile_minmax_f32(a, N, i0, j0, lo, hi);
}
inline void tile_minmax_any(const double* a, int64_t N, int64_t i0, int64_t j0, double* lo, double* hi) {
  tile_minmax<double>(a, N, i0, j0, lo, hi);
}
inline void tile_values_any(const float* a, int64_t N, int64_t i0, int64_t j0, float scale, float lo, float span,
                            float eps, float* cost, float* kern) {
  tile_values_f32(a, N, i0, j0, scale, lo, span, eps, cost, kern);
}
inline void tile_values_any(const double* a, int64_t N, int64_t i0, int64_t j0, double scale, double lo, double span,
                            double eps, double* cost, double* kern) {
  tile_values<double>(a, N, i0, j0, scale, lo, span, eps, cost, kern);
}

template <typename T>
void gibbs_kernel_cpu_impl(const T* a,  // [B, N, N]
                           T* cost,     // [B, N, N]
                           T* kern,     // [B, N, N]
                           int64_t B, int64_t N, T eps) {
  const int64_t nt = (N + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> upper;
  for (int64_t ti = 0; ti < nt; ++ti)
    for (int64_t tj = ti; tj < nt; ++tj) upper.emplace_back(ti, tj);
  const int64_t nu = static_cast<int64_t>(upper.size());
  for (int64_t b = 0; b < B; ++b) {
    const T* ab = a + b * N * N;
    using MinMax = std::pair<T, T>;
    const MinMax init{std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
    const MinMax mm = at::parallel_reduce(
        0, nu, 1, init,
        [&](int64_t k0, int64_t k1, MinMax acc) {
          for (int64_t k = k0; k < k1; ++k)
            tile_minmax_any(ab, N, upper[k].first * kTile, upper[k].second * kTile, &acc.first, &acc.second);
          return acc;
        },
        [](MinMax x, MinMax y) { return MinMax{std::min(x.first, y.first), std::max(x.second, y.second)}; });
    T scale, lo, span;
    cost_range(mm.first, mm.second, &scale, &lo, &span);
    at::parallel_for(0, nt * nt, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        tile_values_any(ab, N, (k / nt) * kTile, (k % nt) * kTile, scale, lo, span, eps, cost + b * N * N,
                        kern + b * N * N);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> gibbs_kernel_cpu(const at::Tensor& affinity,  // [B, N, N]
                                                    double eps) {
  check_gibbs_kernel_args(affinity, eps, c10::DeviceType::CPU);
  const auto dt = compute_dtype(affinity);
  const at::Tensor a = prepare(affinity, dt);
  at::Tensor cost = at::empty(a.sizes(), a.options());
  at::Tensor kern = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return {cost, kern};
  const int64_t B = a.size(0), N = a.size(1);
  if (dt == at::kDouble) {
    gibbs_kernel_cpu_impl<double>(a.const_data_ptr<double>(), cost.mutable_data_ptr<double>(),
                                  kern.mutable_data_ptr<double>(), B, N, eps);
  } else {
    gibbs_kernel_cpu_impl<float>(a.const_data_ptr<float>(), cost.mutable_data_ptr<float>(),
                                 kern.mutable_data_ptr<float>(), B, N, static_cast<float>(eps));
  }
  return {cost, kern};
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("gibbs_kernel", &gibbs_kernel_cpu); }

}  // namespace ovss_fast
