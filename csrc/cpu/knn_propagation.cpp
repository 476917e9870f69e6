// LPOSS's patch stage after the kNN (Stojnic et al., CVPR 2025; docs/lposs.md; the spec:
// reference.lposs_graph and label_propagation): from each node's neighbours index [N, k] and edge weights
// [N, k] (ovss_fast/kernels/propagation.py computes both), S = D^-1/2 (W + W^T, diagonal removed) D^-1/2
// as CSR in O(N k) (counting sort; an edge found from both ends merged into one entry), then x solves (I - alpha S) x = b per class by conjugate
// gradient from 0, b [N, C]. The sparse-dense product serves all C classes per stored entry (a node's classes
// contiguous); the CG is cpu/propagation_cg.h, blocks of 64 rows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/propagation_checks.h"
#include "cpu/cpu_simd.h"
#include "cpu/propagation_cg.h"
#include "cpu/propagation_matvec.h"

namespace ovss_fast {
namespace {

constexpr int64_t kRowsPerBlock = 64;

// q_i = p_i - alpha sum_e v_e p_{col_e} for the rows of one block; pq[c] = sum_i p_ic q_ic
// (cpu/propagation_matvec.h: the classes in register blocks, the rows walked once per block)
template <typename T>
OVSS_INLINE void csr_rows(const int64_t* crow, const int32_t* col, const T* v, const T* p, T* q, double* pq,
                          int64_t i0, int64_t i1, int64_t C, T alpha) {
  for (int64_t c = 0; c < C; ++c) pq[c] = 0;
  // one class block over all the rows, then the next: the neighbours' rows of one block of classes
  // ([N, 64] floats) stay in the L2 cache, where all of p may not
  for_class_blocks<T>(C, [&]<int NV>(int64_t c0) OVSS_LAMBDA_INLINE {
    for (int64_t i = i0; i < i1; ++i) csr_node<T, NV>(col, v, p, q, pq, i, crow[i], crow[i + 1], c0, C, alpha);
  });
}

OVSS_CPU_CLONES void csr_rows_f32(const int64_t* crow, const int32_t* col, const float* v, const float* p, float* q,
                                  double* pq, int64_t i0, int64_t i1, int64_t C, float alpha) {
  csr_rows<float>(crow, col, v, p, q, pq, i0, i1, C, alpha);
}
inline void csr_rows_any(const int64_t* crow, const int32_t* col, const float* v, const float* p, float* q,
                         double* pq, int64_t i0, int64_t i1, int64_t C, float alpha) {
  csr_rows_f32(crow, col, v, p, q, pq, i0, i1, C, alpha);
}
inline void csr_rows_any(const int64_t* crow, const int32_t* col, const double* v, const double* p, double* q,
                         double* pq, int64_t i0, int64_t i1, int64_t C, double alpha) {
  csr_rows<double>(crow, col, v, p, q, pq, i0, i1, C, alpha);
}

// The normalised graph S of W + W^T as CSR (crow [N + 1], col, v), the diagonal removed: row i lists its
// kNN entries (j != i), each plus w_ji where i is also in kNN(j), and then the entries (i in kNN(j), j not in
// kNN(i)) of W^T in order of j: one entry per pair, W_ij + W_ji. s_ij = w_ij / sqrt(d_i d_j), d the row sums
// (0 -> 1). The sums are taken in that order whatever the thread count.
template <typename T>
void symmetric_graph(const int64_t* index, const T* w, int64_t N, int64_t k, std::vector<int64_t>& crow,
                     std::vector<int32_t>& col, std::vector<T>& v) {
  // W^T by counting sort: tcol[tstart[j] ..] = the i with j in kNN(i), in order of i, tw their w_ij
  std::vector<int64_t> tstart(N + 1, 0), own(N + 1, 0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t e = 0; e < k; ++e) {
      const int64_t j = index[i * k + e];
      if (j != i) {
        tstart[j + 1] += 1;
        own[i + 1] += 1;
      }
    }
  for (int64_t i = 0; i < N; ++i) tstart[i + 1] += tstart[i];
  std::vector<int64_t> tcol(tstart[N]), fill(tstart.begin(), tstart.end() - 1);
  std::vector<T> tw(tstart[N]);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t e = 0; e < k; ++e) {
      const int64_t j = index[i * k + e];
      if (j != i) {
        tcol[fill[j]] = i;
        tw[fill[j]++] = w[i * k + e];
      }
    }
  // each row's length: its kNN entries, then the transposed ones whose column is not among them
  crow.assign(N + 1, 0);
  at::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> mine(N, 0);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t e = 0; e < k; ++e) mine[index[i * k + e]] = 1;
      int64_t n = own[i + 1];
      for (int64_t e = tstart[i]; e < tstart[i + 1]; ++e) n += mine[tcol[e]] ? 0 : 1;
      crow[i + 1] = n;
      for (int64_t e = 0; e < k; ++e) mine[index[i * k + e]] = 0;
    }
  });
  for (int64_t i = 0; i < N; ++i) crow[i + 1] += crow[i];
  col.resize(crow[N]);
  v.resize(crow[N]);
  std::vector<T> inv(N);
  at::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> slot(N, -1);  // column -> its entry in the row being built
    for (int64_t i = i0; i < i1; ++i) {
      int64_t n = crow[i];
      for (int64_t e = 0; e < k; ++e) {
        const int64_t j = index[i * k + e];
        if (j != i) {
          slot[j] = n;
          col[n] = static_cast<int32_t>(j);
          v[n++] = w[i * k + e];
        }
      }
      for (int64_t e = tstart[i]; e < tstart[i + 1]; ++e) {
        const int64_t j = tcol[e];
        if (slot[j] >= 0) {
          v[slot[j]] += tw[e];
        } else {
          col[n] = static_cast<int32_t>(j);
          v[n++] = tw[e];
        }
      }
      for (int64_t e = 0; e < k; ++e) slot[index[i * k + e]] = -1;
      T d = 0;
      for (int64_t e = crow[i]; e < crow[i + 1]; ++e) d += v[e];
      inv[i] = inverse_sqrt_degree(d);
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t e = crow[i]; e < crow[i + 1]; ++e) v[e] *= inv[i] * inv[col[e]];
  });
}

template <typename T>
void solve(const at::Tensor& index, const at::Tensor& weights, const at::Tensor& b, at::Tensor& x, T alpha,
           int64_t iters, T tol) {
  const int64_t N = b.size(0), C = b.size(1), k = index.size(1);
  std::vector<int64_t> crow;
  std::vector<int32_t> col;
  std::vector<T> v;
  symmetric_graph<T>(index.const_data_ptr<int64_t>(), weights.const_data_ptr<T>(), N, k, crow, col, v);
  const auto matvec = [&](int64_t blk, const T* p, T* q, double* pq) {
    csr_rows_any(crow.data(), col.data(), v.data(), p, q, pq, blk * kRowsPerBlock,
                 std::min(N, (blk + 1) * kRowsPerBlock), C, alpha);
  };
  at::Tensor r = b.clone(), p = at::empty_like(b), q = at::empty_like(b);
  batched_cg_cpu<T>(matvec, {r.mutable_data_ptr<T>(), x.mutable_data_ptr<T>(), p.mutable_data_ptr<T>(),
                             q.mutable_data_ptr<T>()},
                    N, C, kRowsPerBlock, iters, tol);
}

at::Tensor knn_propagation_cpu(const at::Tensor& index, const at::Tensor& weights, const at::Tensor& b,
                               double alpha, int64_t iters, double tol) {
  check_knn_propagation_args(index, weights, b, alpha, iters, tol, c10::DeviceType::CPU);
  TORCH_CHECK(b.size(0) < std::numeric_limits<int32_t>::max(), "b should have fewer than 2^31 - 1 rows, got ",
              b.size(0));
  const auto dt = compute_dtype(b, weights);
  if (b.numel() == 0) return at::empty(b.sizes(), b.options().dtype(dt));
  const at::Tensor bc = pad_classes(prepare(b, dt)), wc = prepare(weights, dt), ic = index.contiguous();
  at::Tensor x = at::empty(bc.sizes(), bc.options());
  if (dt == at::kDouble) {
    solve<double>(ic, wc, bc, x, alpha, iters, tol);
  } else {
    solve<float>(ic, wc, bc, x, static_cast<float>(alpha), iters, static_cast<float>(tol));
  }
  return x.narrow(1, 0, b.size(1)).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("knn_propagation", &knn_propagation_cpu); }

}  // namespace ovss_fast
