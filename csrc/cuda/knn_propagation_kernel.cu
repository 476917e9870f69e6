// LPOSS's patch stage after the kNN on CUDA (docs/lposs.md; the spec: reference.lposs_graph and
// label_propagation; the CPU twin: cpu/knn_propagation.cpp): S = D^-1/2 (W + W^T, diagonal removed) D^-1/2 on
// the CSR the wrapper (knn_propagation.cpp) builds with torch ops, then x solves (I - alpha S) x = b for every
// class at once by the batched CG of cuda/propagation_cg.cuh. Vectors are class planes [C, N]. The product:
// a warp per node and kClassGroup classes, its lanes over the node's entries (one column index and weight load
// serving the whole group), summed by shuffles in a fixed order.

#include <cuda_runtime.h>

#include "../common/propagation_math.h"
#include "propagation_cg.cuh"
#include "propagation_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

constexpr int kClassGroup = 8;
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // lane 0 holds the sum
}

// inv[i] = d_i^-1/2, d_i the sum of row i's entries (0 -> 1); a warp per row (rows strided over the grid's warps,
// the same row for every lane of a warp, so whole warps loop and leave together)
template <typename T>
__global__ void degree_kernel(const int64_t* __restrict__ crow, const T* __restrict__ val, T* __restrict__ inv,
                              int64_t N) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; i < N; i += warps) {
    T d = 0;
    for (int64_t e = crow[i] + lane; e < crow[i + 1]; e += kWarp) d += val[e];
    d = warp_sum(d);
    if (lane == 0) inv[i] = inverse_sqrt_degree(d);
  }
}

template <typename T>
__global__ void scale_kernel(const int64_t* __restrict__ row, const int64_t* __restrict__ col, T* __restrict__ val,
                             const T* __restrict__ inv, int64_t nnz) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nnz;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    val[e] *= inv[row[e]] * inv[col[e]];
}

// q = p - alpha S p for kKnnMatvecRows nodes (a warp each) and kClassGroup classes, and the block's p . q per
// class into partial [C, gridDim.x]; grid (node blocks, class groups)
template <typename T>
__global__ void __launch_bounds__(kKnnMatvecRows * kWarp)
    csr_matvec_kernel(const int64_t* __restrict__ crow, const int64_t* __restrict__ col, const T* __restrict__ val,
                      const T* __restrict__ p, T* __restrict__ q, double* __restrict__ partial, int64_t N, int64_t C,
                      T alpha, const int* __restrict__ any_now) {
  if (*any_now == 0) return;
  __shared__ double pq_rows[kKnnMatvecRows][kClassGroup];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kKnnMatvecRows) + warp, c0 = blockIdx.y * kClassGroup;
  const int groups = C - c0 < kClassGroup ? static_cast<int>(C - c0) : kClassGroup;
  const T* pc = p + c0 * N;
  T acc[kClassGroup];
#pragma unroll
  for (int g = 0; g < kClassGroup; ++g) acc[g] = 0;
  if (i < N) {
    for (int64_t e = crow[i] + lane; e < crow[i + 1]; e += kWarp) {
      const int64_t j = col[e];
      const T w = val[e];
#pragma unroll
      for (int g = 0; g < kClassGroup; ++g)
        if (g < groups) acc[g] += w * pc[g * N + j];
    }
  }
#pragma unroll
  for (int g = 0; g < kClassGroup; ++g) acc[g] = warp_sum(acc[g]);
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kClassGroup; ++g) {
      double pq = 0;
      if (i < N && g < groups) {
        const T pi = pc[g * N + i];
        const T qi = pi - alpha * acc[g];
        q[(c0 + g) * N + i] = qi;
        pq = static_cast<double>(pi) * static_cast<double>(qi);
      }
      pq_rows[warp][g] = pq;
    }
  }
  __syncthreads();
  if (threadIdx.x < groups) {
    double s = 0;
    for (int w = 0; w < kKnnMatvecRows; ++w) s += pq_rows[w][threadIdx.x];
    partial[(c0 + threadIdx.x) * gridDim.x + blockIdx.x] = s;
  }
}

template <typename T>
cudaError_t launch(const KnnPropagationParams& p, cudaStream_t stream) {
  const int64_t N = p.cg.n, C = p.cg.ncols;
  T* val = static_cast<T*>(p.val);
  T* inv = static_cast<T*>(p.inv);
  degree_kernel<T><<<grid_for(N * kWarp, 256), 256, 0, stream>>>(p.crow, val, inv, N);
  scale_kernel<T><<<grid_for(p.nnz, 256), 256, 0, stream>>>(p.row, p.col, val, inv, p.nnz);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 mgrid(static_cast<unsigned int>((N + kKnnMatvecRows - 1) / kKnnMatvecRows),
                   static_cast<unsigned int>((C + kClassGroup - 1) / kClassGroup));
  const T alpha = static_cast<T>(p.cg.alpha);
  const T* pv = static_cast<const T*>(p.cg.p);
  T* qv = static_cast<T*>(p.cg.q);
  const auto matvec = [&](const int* any_now) -> int64_t {
    csr_matvec_kernel<T><<<mgrid, kKnnMatvecRows * kWarp, 0, stream>>>(p.crow, p.col, val, pv, qv, p.cg.partial, N,
                                                                         C, alpha, any_now);
    return mgrid.x;
  };
  return cg::run<T>(p.cg, matvec, stream);
}

}  // namespace

cudaError_t launch_knn_propagation(const KnnPropagationParams& p, cudaStream_t stream) {
  return p.cg.is_double ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace ovss_fast
