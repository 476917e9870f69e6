// The batched conjugate gradient of LPOSS / LPOSS+ on CUDA (common/propagation_math.h has its per-class
// scalars; the spec: reference.propagation_cg; the CPU twin: cpu/propagation_cg.h): (I - alpha S) x = b for
// every column (a class of an image) at once, each with its own scalars and its own stop, x0 = 0.
// No host synchronisation: every step launches the same kernels; a step t reads any[t] (set by the previous
// step's scalars) and returns at once when every column has stopped. Per-column sums are taken per block in
// double, then over the blocks in a fixed order (block_reduce): the result does not depend on scheduling.
// The op gives the product: matvec(any_t) launches q = p - alpha S p with the partial sums of p . q per
// column and block ([ncols, blocks], row-major) and returns the block count it used.
#pragma once

#include <cuda_runtime.h>

#include "../common/propagation_math.h"
#include "propagation_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace cg {

constexpr int kScalarThreads = 256;
enum Scalar { kRho = 0, kAtol = 1, kStep = 2, kBeta = 3 };

// the sum of one column's per-block partials (column = blockIdx.x), the same on every thread
__device__ __forceinline__ double column_sum(const double* partial, int64_t blocks, double* shared) {
  const double* row = partial + blockIdx.x * blocks;
  double s = 0;
  for (int64_t k = threadIdx.x; k < blocks; k += blockDim.x) s += row[k];
  return block_reduce(s, SumOp{}, shared);
}

// partial[col, block] = sum of u^2 over the block's rows; grid (blocks, ncols), kCgUpdateRows threads
template <typename T>
__global__ void square_sum_kernel(const T* __restrict__ u, double* __restrict__ partial, int64_t n) {
  __shared__ double shared[32];
  const int64_t col = blockIdx.y, i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const double v = i < n ? static_cast<double>(u[col * n + i]) : 0.0;
  const double s = block_reduce(v * v, SumOp{}, shared);
  if (threadIdx.x == 0) partial[col * gridDim.x + blockIdx.x] = s;
}

// rho = b . b, atol = tol ||b||, active = rho > 0; grid ncols
template <typename T>
__global__ void start_kernel(const double* __restrict__ partial, int64_t blocks, double* __restrict__ scalars,
                             int* __restrict__ active, int* __restrict__ any, int64_t ncols, T tol) {
  __shared__ double shared[32];
  const T rho = static_cast<T>(column_sum(partial, blocks, shared));
  if (threadIdx.x == 0) {
    const int64_t c = blockIdx.x;
    scalars[kRho * ncols + c] = rho;
    scalars[kAtol * ncols + c] = tol * math_sqrt(rho);
    active[c] = rho > T(0);
    if (rho > T(0)) atomicOr(any, 1);
  }
}

// step = rho / (p . q) for a running column, 0 for a stopped one; grid ncols
template <typename T>
__global__ void step_kernel(const double* __restrict__ partial, int64_t blocks, double* __restrict__ scalars,
                            const int* __restrict__ active, const int* __restrict__ any_now, int64_t ncols) {
  if (*any_now == 0) return;
  __shared__ double shared[32];
  const T pq = static_cast<T>(column_sum(partial, blocks, shared));
  if (threadIdx.x == 0) {
    const int64_t c = blockIdx.x;
    scalars[kStep * ncols + c] = cg_step<T>(active[c] != 0, static_cast<T>(scalars[kRho * ncols + c]), pq);
  }
}

// x += step p, r -= step q, partial[col, block] = sum of r^2; grid (blocks, ncols), kCgUpdateRows threads
template <typename T>
__global__ void update_kernel(const T* __restrict__ p, const T* __restrict__ q, T* __restrict__ x,
                              T* __restrict__ r, const double* __restrict__ scalars, double* __restrict__ partial,
                              int64_t n, int64_t ncols, const int* __restrict__ any_now) {
  if (*any_now == 0) return;
  __shared__ double shared[32];
  const int64_t col = blockIdx.y, i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const T step = static_cast<T>(scalars[kStep * ncols + col]);
  double rr = 0;
  if (i < n) {
    const int64_t e = col * n + i;
    x[e] += step * p[e];
    const T ri = r[e] - step * q[e];
    r[e] = ri;
    rr = static_cast<double>(ri) * static_cast<double>(ri);
  }
  const double s = block_reduce(rr, SumOp{}, shared);
  if (threadIdx.x == 0) partial[col * gridDim.x + blockIdx.x] = s;
}

// rho_new = r . r; a column stops once ||r|| <= atol; beta = rho_new / rho; any[t + 1]; grid ncols
template <typename T>
__global__ void rho_kernel(const double* __restrict__ partial, int64_t blocks, double* __restrict__ scalars,
                           int* __restrict__ active, const int* __restrict__ any_now, int* __restrict__ any_next,
                           int64_t ncols) {
  if (*any_now == 0) return;
  __shared__ double shared[32];
  const T rho_new = static_cast<T>(column_sum(partial, blocks, shared));
  if (threadIdx.x == 0) {
    const int64_t c = blockIdx.x;
    const bool on = cg_continues<T>(active[c] != 0, rho_new, static_cast<T>(scalars[kAtol * ncols + c]));
    scalars[kBeta * ncols + c] = cg_beta<T>(on, rho_new, static_cast<T>(scalars[kRho * ncols + c]));
    scalars[kRho * ncols + c] = rho_new;
    active[c] = on;
    if (on) atomicOr(any_next, 1);
  }
}

// p = r + beta p for a running column, 0 for a stopped one
template <typename T>
__global__ void direction_kernel(T* __restrict__ p, const T* __restrict__ r, const double* __restrict__ scalars,
                                 const int* __restrict__ active, int64_t n, int64_t ncols,
                                 const int* __restrict__ any_next) {
  if (*any_next == 0) return;
  const int64_t total = n * ncols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e / n;
    p[e] = active[c] ? r[e] + static_cast<T>(scalars[kBeta * ncols + c]) * p[e] : T(0);
  }
}

// The whole solve on `stream`: start, then `iters` steps of matvec, step, update, rho, direction.
template <typename T, typename Matvec>
cudaError_t run(const PropagationCg& s, const Matvec& matvec, cudaStream_t stream) {
  T* x = static_cast<T*>(s.x);
  T* r = static_cast<T*>(s.r);
  T* p = static_cast<T*>(s.p);
  const T* q = static_cast<const T*>(s.q);
  const int64_t n = s.n, ncols = s.ncols;
  const dim3 rows_grid(static_cast<unsigned int>((n + kCgUpdateRows - 1) / kCgUpdateRows),
                       static_cast<unsigned int>(ncols));
  square_sum_kernel<T><<<rows_grid, kCgUpdateRows, 0, stream>>>(r, s.partial, n);
  start_kernel<T><<<static_cast<unsigned int>(ncols), kScalarThreads, 0, stream>>>(
      s.partial, rows_grid.x, s.scalars, s.active, s.any, ncols, static_cast<T>(s.tol));
  cudaError_t err = cudaGetLastError();
  const unsigned int elem_grid = grid_for(n * ncols, 256);
  for (int64_t t = 0; t < s.iters && err == cudaSuccess; ++t) {
    const int* any_now = s.any + t;
    const int64_t blocks = matvec(any_now);
    step_kernel<T><<<static_cast<unsigned int>(ncols), kScalarThreads, 0, stream>>>(s.partial, blocks, s.scalars,
                                                                                     s.active, any_now, ncols);
    update_kernel<T><<<rows_grid, kCgUpdateRows, 0, stream>>>(p, q, x, r, s.scalars, s.partial, n, ncols, any_now);
    rho_kernel<T><<<static_cast<unsigned int>(ncols), kScalarThreads, 0, stream>>>(
        s.partial, rows_grid.x, s.scalars, s.active, any_now, s.any + t + 1, ncols);
    direction_kernel<T><<<elem_grid, 256, 0, stream>>>(p, r, s.scalars, s.active, n, ncols, s.any + t + 1);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cg
}  // namespace ovss_fast
