// The batched CG's device buffers for the CUDA wrappers of LPOSS / LPOSS+ (pixel_propagation.cpp,
// knn_propagation.cpp): allocation and the PropagationCg struct of cuda/propagation_kernel.h. Host only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include "cuda/propagation_kernel.h"

namespace ovss_fast {

// The CG's buffers for b [ncols, n] (contiguous, compute dtype); the caller keeps the tensors alive.
struct CgTensors {
  at::Tensor x, r, p, q, partial, scalars, active, any;
};

inline PropagationCg make_cg(CgTensors& t, const at::Tensor& b, int64_t n, int64_t ncols, int64_t matvec_rows,
                             double alpha, int64_t iters, double tol) {
  TORCH_CHECK(ncols <= 65535, "propagation (CUDA): at most 65535 columns (images x classes), got ", ncols);
  t.x = at::zeros_like(b);
  t.r = b.clone();
  t.p = b.clone();
  t.q = at::empty_like(b);
  const auto f64 = b.options().dtype(at::kDouble);
  t.partial = at::empty({ncols * propagation_partial_blocks(n, matvec_rows)}, f64);
  t.scalars = at::empty({4 * ncols}, f64);
  t.active = at::empty({ncols}, b.options().dtype(at::kInt));
  t.any = at::zeros({iters + 1}, b.options().dtype(at::kInt));
  PropagationCg cg{};
  cg.x = t.x.mutable_data_ptr();
  cg.r = t.r.mutable_data_ptr();
  cg.p = t.p.mutable_data_ptr();
  cg.q = t.q.mutable_data_ptr();
  cg.partial = t.partial.mutable_data_ptr<double>();
  cg.scalars = t.scalars.mutable_data_ptr<double>();
  cg.active = t.active.mutable_data_ptr<int>();
  cg.any = t.any.mutable_data_ptr<int>();
  cg.n = n;
  cg.ncols = ncols;
  cg.iters = iters;
  cg.alpha = alpha;
  cg.tol = tol;
  cg.is_double = b.scalar_type() == at::kDouble;
  return cg;
}

}  // namespace ovss_fast
