// LPOSS's patch-stage kNN and edge weights on the CPU (docs/lposs.md; the spec: reference.lposs_graph):
// feats [N, D] (L2-normalised by the caller), positions [N, 2] -> (index [N, k'], w [N, k']), k' = min(k, N):
// each node's k' largest inner products (itself among them), the lower index first among equal ones (a strict
// order on (similarity desc, index asc), so the set is unique), and w = max(0, s)^gamma exp(-sigma dist^dist_pow)
// with dist the Euclidean distance of the positions. The order within a row is unspecified.
//
// The similarity matrix is symmetric: it is computed by tiles (I, J), J >= I only, of kTile x kTile (each tile
// one single-threaded matrix product of the same shape whatever the thread count), and each off-diagonal
// tile serves the rows of I and, transposed, the rows of J. Each row keeps a buffer of candidates (at most
// 2 k' + 16): a candidate enters if it reaches the row's k'-th best so far, and a full buffer is cut back to its
// k' best (std::nth_element by the strict order). Memory: the buffers O(N k) plus one strip of tiles [kTile, N]; never N x N.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {
namespace {

constexpr int64_t kTile = 256;

template <typename T>
struct Cand {
  T s;
  int32_t j;
};

// the strict order of the selection: higher similarity first, then the lower index
template <typename T>
inline bool better(T s, int32_t j, T ts, int32_t tj) {
  return s > ts || (s == ts && j < tj);
}

// Each row's candidates: a buffer of at most cap = 2 k + kChunk. Candidates are appended without a branch
// (the store always happens, the size grows when s reaches the row's threshold: the k-th best at the last cut,
// -inf before), in chunks of kChunk; a buffer that might overflow is first cut back to its k best.
constexpr int64_t kChunk = 16;

template <typename T>
struct RowBuffers {
  int64_t k, cap;
  std::unique_ptr<Cand<T>[]> buf;  // [N, cap], uninitialised (each row is written before it is read)
  std::vector<int64_t> size;
  std::vector<T> thr_s;  // the k-th best similarity after the last cut (-inf before)

  RowBuffers(int64_t N, int64_t k_) : k(k_), cap(2 * k_ + kChunk), buf(new Cand<T>[N * cap]), size(N, 0),
                                      thr_s(N, -std::numeric_limits<T>::infinity()) {}

  // keep the row's k best, in its first k places. A histogram of the similarities over kBins bins of [-1, 1]
  // (the bin is a non-decreasing function of s; values outside fall in the end bins) finds the bin that holds
  // the k-th best: the candidates of the bins above it are kept, and of that bin's candidates the best by
  // the strict order (similarity, then lower index). No branch per candidate but the rare bin match.
  void cut(int64_t i) {
    constexpr int kBins = 2048;
    thread_local std::vector<int32_t> hist;
    thread_local std::vector<Cand<T>> ties;
    const auto bin = [](T s) -> int {
      const T x = (s + T(1)) * T(kBins / 2);
      return x >= T(kBins - 1) ? kBins - 1 : x > T(0) ? static_cast<int>(x) : 0;
    };
    Cand<T>* b = buf.get() + i * cap;
    const int64_t n = size[i];
    hist.assign(kBins, 0);
    for (int64_t u = 0; u < n; ++u) hist[bin(b[u].s)] += 1;
    int64_t above = 0;
    int top = kBins - 1;
    for (; top > 0 && above + hist[top] < k; --top) above += hist[top];
    ties.clear();
    int64_t m = 0;
    for (int64_t u = 0; u < n; ++u) {
      const Cand<T> c = b[u];
      const int bc = bin(c.s);
      if (bc == top) ties.push_back(c);
      b[m] = c;
      m += bc > top;
    }
    const int64_t need = k - m;  // 1 <= need <= ties.size()
    const auto order = [](const Cand<T>& x, const Cand<T>& y) { return better(x.s, x.j, y.s, y.j); };
    std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end(), order);
    std::copy(ties.begin(), ties.begin() + need, b + m);
    size[i] = k;
    thr_s[i] = ties[need - 1].s;
  }
  // row i sees s[u * stride] for u < n, the similarity with node j0 + u * jstep
  OVSS_INLINE void append(int64_t i, const T* s, int64_t stride, int64_t n, int32_t j0, int32_t jstep) {
    Cand<T>* b = buf.get() + i * cap;
    for (int64_t u0 = 0; u0 < n; u0 += kChunk) {
      if (size[i] + kChunk > cap) cut(i);
      const T t = thr_s[i];
      int64_t sz = size[i];
      const int64_t u1 = std::min(n, u0 + kChunk);
      for (int64_t u = u0; u < u1; ++u) {
        const T x = s[u * stride];
        // NaN (from NaN features) is kept as -inf, which sorts last
        b[sz] = {x == x ? x : -std::numeric_limits<T>::infinity(), static_cast<int32_t>(j0 + u * jstep)};
        sz += !(x < t);
      }
      size[i] = sz;
    }
  }
};

template <typename T>
inline T edge_weight(T s, T d2, T gamma, T sigma, T dist_pow) {
  const T c = std::max(s, T(0));
  const T sg = gamma == T(3) ? c * c * c : gamma == T(1) ? c : gamma == T(2) ? c * c : std::pow(c, gamma);
  const T d = std::sqrt(d2);
  return sg * std::exp(-sigma * (dist_pow == T(1) ? d : std::pow(d, dist_pow)));
}

template <typename T>
void knn_edges_impl(const at::Tensor& feats, const at::Tensor& positions, int64_t k, T gamma, T sigma, T dist_pow,
                    at::Tensor& index, at::Tensor& weights) {
  const int64_t N = feats.size(0), tiles = (N + kTile - 1) / kTile;
  RowBuffers<T> rb(N, k);
  std::vector<at::Tensor> strip(tiles);
  for (int64_t I = 0; I < tiles; ++I) {
    const int64_t i0 = I * kTile, bi = std::min(kTile, N - i0);
    const at::Tensor fi = feats.narrow(0, i0, bi);
    // tiles (I, J), J >= I: sims of rows [i0, i0 + bi) with the rows of J
    at::parallel_for(I, tiles, 1, [&](int64_t J0, int64_t J1) {
      for (int64_t J = J0; J < J1; ++J) {
        const int64_t j0 = J * kTile, bj = std::min(kTile, N - j0);
        strip[J] = at::mm(fi, feats.narrow(0, j0, bj).t()).contiguous();
      }
    });
    // the rows of I: every tile of the strip, row by row
    at::parallel_for(0, bi, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t J = I; J < tiles; ++J) {
          const int64_t j0 = J * kTile, bj = std::min(kTile, N - j0);
          const T* s = strip[J].const_data_ptr<T>() + r * bj;
          rb.append(i0 + r, s, 1, bj, static_cast<int32_t>(j0), 1);
        }
    });
    // the rows of J > I: the off-diagonal tiles transposed (read along their rows)
    if (I + 1 < tiles) {
      at::parallel_for(i0 + bi, N, 64, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1;) {
          const int64_t J = a / kTile, j0 = J * kTile, bj = std::min(kTile, N - j0);
          const int64_t c1 = std::min(a1, j0 + bj);
          const T* base = strip[J].const_data_ptr<T>();
          for (int64_t c = a; c < c1; ++c)
            rb.append(c, base + (c - j0), bj, bi, static_cast<int32_t>(i0), 1);
          a = c1;
        }
      });
    }
  }
  const T* pos = positions.const_data_ptr<T>();
  int64_t* idx = index.mutable_data_ptr<int64_t>();
  T* w = weights.mutable_data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t a0, int64_t a1) {
    for (int64_t i = a0; i < a1; ++i) {
      if (rb.size[i] > k) rb.cut(i);
      const Cand<T>* b = rb.buf.get() + i * rb.cap;
      for (int64_t e = 0; e < k; ++e) {
        const int64_t j = b[e].j;
        const T dy = pos[2 * i] - pos[2 * j], dx = pos[2 * i + 1] - pos[2 * j + 1];
        idx[i * k + e] = j;
        w[i * k + e] = edge_weight<T>(b[e].s, dy * dy + dx * dx, gamma, sigma, dist_pow);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_edges_cpu(const at::Tensor& feats, const at::Tensor& positions, int64_t k,
                                                 double gamma, double sigma, double dist_pow) {
  check_rank(feats, "feats", 2, "[N, D]");
  check_rank(positions, "positions", 2, "[N, 2]");
  check_floating(feats, "feats");
  check_floating(positions, "positions");
  check_device(feats, "feats", c10::DeviceType::CPU);
  check_same_device(feats, "feats", positions, "positions");
  const int64_t N = feats.size(0);
  TORCH_CHECK(positions.size(0) == N && positions.size(1) == 2, "positions should be [N, 2] with N = ", N,
              ", got ", shape_str(positions));
  TORCH_CHECK(N < std::numeric_limits<int32_t>::max(), "feats should have fewer than 2^31 - 1 rows, got ", N);
  TORCH_CHECK(k >= 1, "k should be >= 1, got ", k);
  TORCH_CHECK(gamma >= 0, "gamma should be >= 0, got ", gamma);
  TORCH_CHECK(sigma >= 0, "sigma should be >= 0, got ", sigma);
  TORCH_CHECK(dist_pow > 0, "dist_pow should be > 0, got ", dist_pow);
  const auto dt = feats.scalar_type() == at::kDouble || positions.scalar_type() == at::kDouble ? at::kDouble
                                                                                               : at::kFloat;
  const int64_t kk = std::min(k, N);
  at::Tensor index = at::empty({N, kk}, feats.options().dtype(at::kLong));
  at::Tensor weights = at::empty({N, kk}, feats.options().dtype(dt));
  if (N == 0) return {index, weights};
  const at::Tensor f = feats.to(dt).contiguous(), p = positions.to(dt).contiguous();
  if (dt == at::kDouble) {
    knn_edges_impl<double>(f, p, kk, gamma, sigma, dist_pow, index, weights);
  } else {
    knn_edges_impl<float>(f, p, kk, static_cast<float>(gamma), static_cast<float>(sigma),
                          static_cast<float>(dist_pow), index, weights);
  }
  return {index, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("knn_edges", &knn_edges_cpu); }

}  // namespace ovss_fast
