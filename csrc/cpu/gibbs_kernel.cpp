// method.md section 2 on the CPU: cost C = normalised -log((A + A^T)/2 + 1e-12) and
// kernel K = exp(-C / eps). Two passes over [B, N, N] in square tiles, each tile
// paired with its mirror image so A^T is read from cache: pass 1 finds Sym's min
// and max per image, pass 2 writes C and K. Sym is symmetric, so each unordered
// pair (i, j) is computed once and written to both (i, j) and (j, i): one log and
// one exp per pair. Math: common/gibbs_kernel_math.h.

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

namespace ovss_fast {
namespace {

constexpr int64_t kTile = 64;

// the tiles (ti, tj) with ti <= tj of an N x N matrix
std::vector<std::pair<int64_t, int64_t>> upper_tiles(int64_t N) {
  const int64_t nt = (N + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  tiles.reserve(nt * (nt + 1) / 2);
  for (int64_t ti = 0; ti < nt; ++ti)
    for (int64_t tj = ti; tj < nt; ++tj) tiles.emplace_back(ti, tj);
  return tiles;
}

template <typename T>
void gibbs_kernel_cpu_impl(const T* a,  // [B, N, N]
                           T* cost,     // [B, N, N]
                           T* kern,     // [B, N, N]
                           int64_t B, int64_t N, T eps) {
  const auto tiles = upper_tiles(N);
  const int64_t nt = static_cast<int64_t>(tiles.size());
  for (int64_t b = 0; b < B; ++b) {
    const T* ab = a + b * N * N;
    T* cb = cost + b * N * N;
    T* kb = kern + b * N * N;
    // pass 1: min and max of Sym over the image (the upper triangle, diagonal included, is all of it)
    using MinMax = std::pair<T, T>;
    const MinMax init{std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
    const MinMax mm = at::parallel_reduce(
        0, nt, 1, init,
        [&](int64_t k0, int64_t k1, MinMax acc) {
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t i0 = tiles[k].first * kTile, j0 = tiles[k].second * kTile;
            const int64_t i1 = std::min(N, i0 + kTile), j1 = std::min(N, j0 + kTile);
            for (int64_t i = i0; i < i1; ++i) {
              for (int64_t j = std::max(j0, i); j < j1; ++j) {
                const T s = symmetric_affinity(ab[i * N + j], ab[j * N + i]);
                acc.first = std::min(acc.first, s);
                acc.second = std::max(acc.second, s);
              }
            }
          }
          return acc;
        },
        [](MinMax x, MinMax y) { return MinMax{std::min(x.first, y.first), std::max(x.second, y.second)}; });
    T lo, span;
    cost_range(mm.first, mm.second, &lo, &span);
    // pass 2: cost and kernel, each unordered pair once, written to both halves
    at::parallel_for(0, nt, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t i0 = tiles[k].first * kTile, j0 = tiles[k].second * kTile;
        const int64_t i1 = std::min(N, i0 + kTile), j1 = std::min(N, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(j0, i); j < j1; ++j) {
            const T s = symmetric_affinity(ab[i * N + j], ab[j * N + i]);
            const T c = normalised_cost(s, lo, span);
            const T kv = gibbs_value(c, eps);
            cb[i * N + j] = c;
            kb[i * N + j] = kv;
            cb[j * N + i] = c;
            kb[j * N + i] = kv;
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> gibbs_kernel_cpu(const at::Tensor& affinity, double eps) {
  check_rank(affinity, "affinity", 3, "[B, N, N]");
  check_floating(affinity, "affinity");
  check_device(affinity, "affinity", c10::DeviceType::CPU);
  TORCH_CHECK(affinity.size(1) == affinity.size(2), "affinity must be square [B, N, N], got shape ",
              shape_str(affinity));
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
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
