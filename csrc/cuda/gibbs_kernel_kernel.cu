// method.md section 2 on CUDA: cost C = normalised -log(Sym / M + 1e-12), Sym =
// (A + A^T)/2 and M its per-image max, kernel K = exp(-C / eps). Two passes over [B, N, N] in 32 x 32 tiles, each block staging
// its tile and the mirror tile in shared memory so A and A^T are both read coalesced:
//   1. Sym's per-image min and max (upper-triangle tiles only: Sym is symmetric),
//      a warp-shuffle reduction per block, then one atomicMin / atomicMax per block on
//      order-preserving integer keys of the floats;
//   2. C and K for every tile, written coalesced.
// -log is decreasing, so min / max of Craw come from Sym's max / min
// (common/gibbs_kernel_math.h).

#include <cuda_runtime.h>

#include "../common/gibbs_kernel_math.h"
#include "gibbs_kernel_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

constexpr int kTile = 32;
constexpr int kRows = 8;  // block (32, 8): each thread covers 4 rows of its tile

// Integer keys that order like the floats they encode (-0.0 just below +0.0).
__device__ __forceinline__ long long order_key(float v) {
  const int i = __float_as_int(v);
  return static_cast<long long>(i >= 0 ? i : i ^ 0x7fffffff);
}
__device__ __forceinline__ long long order_key(double v) {
  const long long i = __double_as_longlong(v);
  return i >= 0 ? i : i ^ 0x7fffffffffffffffLL;
}
template <typename T>
__device__ __forceinline__ T from_key(long long k);
template <>
__device__ __forceinline__ float from_key<float>(long long k) {
  const int i = static_cast<int>(k);
  return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff);
}
template <>
__device__ __forceinline__ double from_key<double>(long long k) {
  return __longlong_as_double(k >= 0 ? k : k ^ 0x7fffffffffffffffLL);
}

template <typename T>
__global__ void init_minmax_kernel(long long* minmax, int64_t B) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    minmax[2 * b] = order_key(static_cast<T>(INFINITY));
    minmax[2 * b + 1] = order_key(-static_cast<T>(INFINITY));
  }
}

// Stage tile (ti, tj) of A and tile (tj, ti) into shared memory; sym(r, c) of the tile
// is then 0.5 * (a[r][c] + at[c][r]).
template <typename T>
__device__ void load_tiles(const T* __restrict__ a, int64_t N, int64_t i0, int64_t j0, T (*ta)[kTile + 1],
                           T (*tt)[kTile + 1]) {
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t i = i0 + r, j = j0 + threadIdx.x;
    ta[r][threadIdx.x] = (i < N && j < N) ? a[i * N + j] : T(0);
    const int64_t i2 = j0 + r, j2 = i0 + threadIdx.x;  // rows of the mirror tile
    tt[r][threadIdx.x] = (i2 < N && j2 < N) ? a[i2 * N + j2] : T(0);
  }
  __syncthreads();
}

template <typename T>
__global__ void sym_minmax_kernel(const T* __restrict__ affinity,  // [B, N, N]
                                  long long* __restrict__ minmax,  // [B, 2]
                                  int64_t B, int64_t N) {
  __shared__ T ta[kTile][kTile + 1];
  __shared__ T tt[kTile][kTile + 1];
  __shared__ T red[32];
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (ti > tj) return;  // Sym is symmetric: the upper tiles cover every pair
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    load_tiles(affinity + b * N * N, N, i0, j0, ta, tt);
    T lo = static_cast<T>(INFINITY), hi = -static_cast<T>(INFINITY);
    for (int r = threadIdx.y; r < kTile; r += kRows) {
      const int64_t i = i0 + r, j = j0 + threadIdx.x;
      if (i < N && j < N) {
        const T s = symmetric_affinity(ta[r][threadIdx.x], tt[threadIdx.x][r]);
        lo = s < lo ? s : lo;
        hi = s > hi ? s : hi;
      }
    }
    // the block is (32, 8): reduce over its 256 threads as one flat block
    lo = block_reduce(lo, MinOp(), red);
    hi = block_reduce(hi, MaxOp(), red);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      atomicMin(&minmax[2 * b], order_key(lo));
      atomicMax(&minmax[2 * b + 1], order_key(hi));
    }
  }
}

template <typename T>
__global__ void gibbs_values_kernel(const T* __restrict__ affinity,      // [B, N, N]
                                   const long long* __restrict__ minmax,  // [B, 2]
                                   T* __restrict__ cost,                  // [B, N, N]
                                   T* __restrict__ kern,                  // [B, N, N]
                                   int64_t B, int64_t N, T eps) {
  __shared__ T ta[kTile][kTile + 1];
  __shared__ T tt[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    load_tiles(affinity + b * N * N, N, i0, j0, ta, tt);
    T scale, lo, span;
    cost_range(from_key<T>(minmax[2 * b]), from_key<T>(minmax[2 * b + 1]), &scale, &lo, &span);
    for (int r = threadIdx.y; r < kTile; r += kRows) {
      const int64_t i = i0 + r, j = j0 + threadIdx.x;
      if (i < N && j < N) {
        const T c = normalised_cost(symmetric_affinity(ta[r][threadIdx.x], tt[threadIdx.x][r]), scale, lo, span);
        cost[(b * N + i) * N + j] = c;
        kern[(b * N + i) * N + j] = gibbs_value(c, eps);
      }
    }
    __syncthreads();  // the tiles are reloaded for the next image
  }
}

template <typename T>
cudaError_t launch(const GibbsKernelParams& p, cudaStream_t stream) {
  const T* a = static_cast<const T*>(p.affinity);
  init_minmax_kernel<T><<<grid_for(p.B, 256), 256, 0, stream>>>(p.minmax, p.B);
  const unsigned int tiles = static_cast<unsigned int>((p.N + kTile - 1) / kTile);
  const dim3 grid(tiles, tiles, static_cast<unsigned int>(p.B < 65535 ? p.B : 65535));
  const dim3 block(kTile, kRows);
  sym_minmax_kernel<T><<<grid, block, 0, stream>>>(a, p.minmax, p.B, p.N);
  gibbs_values_kernel<T><<<grid, block, 0, stream>>>(a, p.minmax, static_cast<T*>(p.cost), static_cast<T*>(p.kernel),
                                                    p.B, p.N, static_cast<T>(p.eps));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gibbs_kernel(const GibbsKernelParams& p, cudaStream_t stream) {
  return p.is_double ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace ovss_fast
