// Shared pieces of the cooperative (grid-synchronised) schedule of sinkhorn_scores
// and markov_scores: a tiled [N, N] x [N, C] product for one output tile, the
// reductions, and the choice between the two CUDA schedules. CUDA headers only.
//
// Why a cooperative schedule: every iteration of both modes is a product with K
// ([N, N] x [N, C]) followed by elementwise work, and iteration l+1 needs all of
// iteration l. A block per class tile (the "tile" schedule) keeps every block
// independent but makes each block read all of K per iteration, so a call runs at
// one SM's L2 bandwidth: fine for many classes, slow for few classes and large N.
// The cooperative schedule spreads each product over the whole GPU (output tiles of
// kTileRows x kTileCls) and separates the iterations with grid.sync(): still one
// launch (cudaLaunchCooperativeKernel, grid no larger than what is co-resident).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace ovss_fast {
namespace coop {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kClassTile = 4;                                  // classes per block of the tile schedule
constexpr int kTileRows = 64;                                  // output rows per tile
constexpr int kTileCls = 16;                                   // classes per tile
constexpr int kChunk = 32;                                     // reduction chunk staged in shared memory
constexpr int kRowGroups = kThreads / kTileCls;                // 16
constexpr int kRowsPerThread = kTileRows / kRowGroups;         // 4
static_assert(kTileRows * kTileCls == kThreads * kRowsPerThread, "tile must split evenly over the block");

template <typename T>
struct TileSmem {
  T a[kTileRows][kChunk + 1];  // +1: the transposed stores and the row reads avoid bank conflicts
  T x[kChunk][kTileCls];
};

template <typename T>
__device__ inline T warp_sum(T x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block of one value per thread; every thread gets the total.
// `red` holds kThreads / 32 values; the call synchronises the block twice.
template <typename T>
__device__ inline T block_sum(T x, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kThreads / 32; ++w) total += red[w];
  __syncthreads();
  return total;
}

// Output tile t of a [B, N, C] product: batch b, rows i0.., classes c0..
struct Tile {
  int64_t b, i0, c0;
};

__device__ inline Tile tile_of(int64_t t, int64_t N, int64_t C) {
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t cls_tiles = (C + kTileCls - 1) / kTileCls;
  Tile tile;
  tile.b = t / (row_tiles * cls_tiles);
  const int64_t rem = t % (row_tiles * cls_tiles);
  tile.i0 = (rem / cls_tiles) * kTileRows;
  tile.c0 = (rem % cls_tiles) * kTileCls;
  return tile;
}

__host__ __device__ inline int64_t tile_count(int64_t B, int64_t N, int64_t C) {
  return B * ((N + kTileRows - 1) / kTileRows) * ((C + kTileCls - 1) / kTileCls);
}

// This thread's outputs of the tile: rows i0 + row(m), class c0 + cls().
__device__ inline int tile_row(int m) { return static_cast<int>(threadIdx.x) / kTileCls + kRowGroups * m; }
__device__ inline int tile_cls() { return static_cast<int>(threadIdx.x) % kTileCls; }

// acc[m] = sum_k A[i0 + tile_row(m), k] * X[k, c0 + tile_cls()] with A = K (TRANS false)
// or A = K^T (TRANS true). K: [N, N] and X: [N, C] (row-major) of one batch element.
// Out-of-range rows, columns and classes contribute 0.
template <typename T, bool TRANS>
__device__ void tile_product(const T* __restrict__ K, const T* __restrict__ X, int64_t N, int64_t C, int64_t i0,
                             int64_t c0, TileSmem<T>& sm, T (&acc)[kRowsPerThread]) {
  const int tid = threadIdx.x;
  const int tc = tile_cls();
#pragma unroll
  for (int m = 0; m < kRowsPerThread; ++m) acc[m] = T(0);
  for (int64_t k0 = 0; k0 < N; k0 += kChunk) {
    for (int e = tid; e < kTileRows * kChunk; e += kThreads) {
      // consecutive threads read consecutive addresses of K in both cases
      const int r = TRANS ? e % kTileRows : e / kChunk;
      const int kk = TRANS ? e / kTileRows : e % kChunk;
      const int64_t i = i0 + r, k = k0 + kk;
      T val = T(0);
      if (i < N && k < N) val = TRANS ? K[k * N + i] : K[i * N + k];
      sm.a[r][kk] = val;
    }
    for (int e = tid; e < kChunk * kTileCls; e += kThreads) {
      const int kk = e / kTileCls, cc = e % kTileCls;
      const int64_t k = k0 + kk, c = c0 + cc;
      sm.x[kk][cc] = (k < N && c < C) ? X[k * C + c] : T(0);
    }
    __syncthreads();
    // a partial sum per chunk, added to acc once: the rounding error grows with
    // kChunk + N / kChunk terms rather than N (N = 4096 sequentially misses 1e-4 in op)
    T part[kRowsPerThread];
#pragma unroll
    for (int m = 0; m < kRowsPerThread; ++m) part[m] = T(0);
#pragma unroll 8
    for (int kk = 0; kk < kChunk; ++kk) {
      const T xv = sm.x[kk][tc];
#pragma unroll
      for (int m = 0; m < kRowsPerThread; ++m) part[m] += sm.a[tile_row(m)][kk] * xv;
    }
#pragma unroll
    for (int m = 0; m < kRowsPerThread; ++m) acc[m] += part[m];
    __syncthreads();
  }
}

// Which CUDA schedule runs: OVSS_FAST_CUDA_DISCREPANCY=coop|tile forces one; by default
// the cooperative one where the device supports cooperative launches.
inline bool use_cooperative() {
  const char* env = std::getenv("OVSS_FAST_CUDA_DISCREPANCY");
  if (env != nullptr && std::strcmp(env, "tile") == 0) return false;
  if (env != nullptr && std::strcmp(env, "coop") == 0) return true;
  int dev = 0, coop = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess) return false;
  return coop != 0;
}

// Co-resident grid for a cooperative launch of `kernel` (kThreads threads, static shared memory only).
inline cudaError_t cooperative_grid(const void* kernel, int* grid) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorCooperativeLaunchTooLarge;
  *grid = sms * (per_sm < 2 ? per_sm : 2);
  return cudaSuccess;
}

// Cooperative launch of `kernel(args)` (one by-value argument struct) on its co-resident grid.
template <typename Args>
inline cudaError_t launch_cooperative(const void* kernel, Args& args, cudaStream_t stream) {
  int grid = 0;
  const cudaError_t err = cooperative_grid(kernel, &grid);
  if (err != cudaSuccess) return err;
  void* kargs[] = {&args};
  return cudaLaunchCooperativeKernel(kernel, dim3(grid), dim3(kThreads), kargs, 0, stream);
}

// The tile schedule's dynamic shared memory limit: what a block may opt in to on the current device,
// less 1 KiB for the kernels' static shared arrays (0 when the query fails).
inline size_t optin_shared_limit() {
  int dev = 0, limit = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return limit > 1024 ? static_cast<size_t>(limit) - 1024 : 0;
}

// A tile-schedule launch: `kernel<<<blocks, kThreads, smem, stream>>>(args...)`, opting in to `smem` bytes
// of dynamic shared memory first when smem > 0; returns the launch's error code.
template <typename... Params, typename... Args>
inline cudaError_t launch_tile(void (*kernel)(Params...), int64_t blocks, size_t smem, cudaStream_t stream,
                               Args... args) {
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  if (smem > 0) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// launch_sinkhorn_scores / launch_markov_scores: nothing for an empty problem, else the cooperative or the
// tile schedule (use_cooperative) in float or double: coop(T{}) / tile(T{}) launch it for element type T.
template <typename Params, typename Coop, typename Tile>
inline cudaError_t dispatch(const Params& p, Coop coop, Tile tile) {
  if (p.B == 0 || p.N == 0 || p.C == 0) return cudaSuccess;
  if (use_cooperative()) return p.is_double ? coop(double{}) : coop(float{});
  return p.is_double ? tile(double{}) : tile(float{});
}

// The fields every CoopArgs<T> has, from the launch parameters: q, kernel, out as T*, and B, N, C.
template <typename T, typename Args, typename Params>
inline void set_common_args(Args& args, const Params& p) {
  args.q = static_cast<const T*>(p.q);
  args.kernel = static_cast<const T*>(p.kernel);
  args.out = static_cast<T*>(p.out);
  args.B = p.B;
  args.N = p.N;
  args.C = p.C;
}

// Bytes rounded up to 256 so each scratch array starts aligned.
inline size_t aligned_bytes(size_t n) { return (n + 255) & ~size_t{255}; }

}  // namespace coop

// What the tile schedule's kernels (a block of kThreads threads per batch and kClassTile classes) of
// both files take from coop.
namespace tile_schedule {
using coop::kClassTile;
using coop::kThreads;
using coop::kWarps;
using coop::warp_sum;
}  // namespace tile_schedule

}  // namespace ovss_fast
