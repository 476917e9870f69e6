// CUDA wrapper of knn_propagation (LPOSS's patch stage after the kNN; csrc/cuda/knn_propagation_kernel.cu):
// checks, then W + W^T as CSR built on the device with torch ops, no host synchronisation after the checks:
// the entries (i, index[i, e], w[i, e]) followed by their transposes, stably sorted by row (so a row lists
// its kNN entries, then W^T's in order of i, as the CPU kernel does), row starts by a binary search of
// the sorted rows. Self-links (index[i, e] == i) stay as entries of weight 0: the diagonal is removed
// (they add exactly 0 to every sum). The CG's vectors are the class planes b^T [C, N].

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "common/propagation_checks.h"
#include "cuda/cuda_call.h"
#include "cuda/propagation_buffers.h"
#include "cuda/propagation_kernel.h"

namespace ovss_fast {
namespace {

at::Tensor knn_propagation_cuda(const at::Tensor& index,    // [N, k] int64
                                const at::Tensor& weights,  // [N, k]
                                const at::Tensor& b,        // [N, C]
                                double alpha, int64_t iters, double tol) {
  check_knn_propagation_args(index, weights, b, alpha, iters, tol, c10::DeviceType::CUDA);
  return on_cuda(b, "b", [&](cudaStream_t stream) {
    const auto dt = compute_dtype(b, weights);
    if (b.numel() == 0) return at::empty(b.sizes(), b.options().dtype(dt));
    const int64_t N = b.size(0), C = b.size(1), k = index.size(1);
    const auto longs = index.options().dtype(at::kLong);
    const at::Tensor rows = at::arange(N, longs).unsqueeze(1).expand({N, k}).reshape({-1});
    const at::Tensor cols = index.reshape({-1});
    const at::Tensor w = prepare(weights, dt).reshape({-1});
    const at::Tensor w_off = at::where(rows.eq(cols), at::zeros_like(w), w);
    const at::Tensor all_rows = at::cat({rows, cols}), all_cols = at::cat({cols, rows});
    const at::Tensor order = std::get<1>(all_rows.sort(/*stable=*/true, 0, false));
    const at::Tensor row = all_rows.index_select(0, order).contiguous();
    const at::Tensor col = all_cols.index_select(0, order).contiguous();
    at::Tensor val = at::cat({w_off, w_off}).index_select(0, order).contiguous();
    const at::Tensor crow = at::searchsorted(row, at::arange(N + 1, longs)).contiguous();
    at::Tensor inv = at::empty({N}, val.options());
    const at::Tensor planes = prepare(b, dt).t().contiguous();  // [C, N]
    CgTensors t;
    KnnPropagationParams p{};
    p.cg = make_cg(t, planes, N, C, kKnnMatvecRows, alpha, iters, tol);
    p.crow = crow.const_data_ptr<int64_t>();
    p.row = row.const_data_ptr<int64_t>();
    p.col = col.const_data_ptr<int64_t>();
    p.val = val.mutable_data_ptr();
    p.inv = inv.mutable_data_ptr();
    p.nnz = row.numel();
    check_launch(launch_knn_propagation(p, stream), "knn_propagation", "index ", shape_str(index), ", b ",
                 shape_str(b));
    return t.x.t().contiguous();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("knn_propagation", &knn_propagation_cuda); }

}  // namespace ovss_fast
