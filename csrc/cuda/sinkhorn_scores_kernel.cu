// CUDA optimal-path scores (shared/method.md section 3, "op"):
//
//   a = 1 / N;  v = 1;  repeat iters:  u = a / max(K v, 1e-30);  v = q / max(K^T u, 1e-30)
//   f = eps * log(a / max(K v, 1e-30));  S[i, c] = mean_i f - f[i];  dead class -> -inf
//
// One launch per call, with two schedules (csrc/cuda/discrepancy_coop.cuh says why):
//
// "coop" (default where cooperative launches work): a co-resident grid that shares
// every product out as [64 rows x 16 classes] output tiles over all SMs, the
// elementwise update fused into each tile's epilogue, grid.sync() between half-steps;
// then one block per (batch, class) column for the mean and the -inf of dead classes.
//
// "tile" (fallback, OVSS_FAST_CUDA_DISCREPANCY=tile): classes are independent given K,
// so each block owns one (batch, tile of kClassTile classes) and runs every iteration itself:
// no grid-wide synchronisation, no host round trips, the batch is a grid dimension.
// K is read from global memory (it stays in L2 across iterations: N = 2048 is
// 16 MB in float); each K element loaded serves kClassTile classes. u and v of the
// tile live in shared memory when they fit (opt-in size), else in global scratch.
//
//   K v   : a warp per row i (coalesced along the row), lanes reduced by shuffles
//   K^T u : a thread per column j (consecutive threads read consecutive K[i, j])
//
// Elementwise math: csrc/common/sinkhorn_math.h, shared with the CPU kernel.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>

#include "../common/sinkhorn_math.h"
#include "discrepancy_coop.cuh"
#include "sinkhorn_scores_kernel.h"

namespace ovss_fast {
namespace {

using namespace tile_schedule;  // kClassTile, kThreads, kWarps, warp_sum
constexpr int kSumChunk = 64;  // rows per partial sum in the K^T u column pass

template <typename T>
__global__ void __launch_bounds__(kThreads)
sinkhorn_scores_kernel(const T* __restrict__ q,       // [B, N, C]
                       const T* __restrict__ kernel,  // [B, N, N]
                       T* __restrict__ out,           // [B, N, C]
                       T* __restrict__ scratch,       // [B * tiles, 2, kClassTile, N] or nullptr
                       int64_t N, int64_t C, int64_t tiles, T eps, int64_t iters) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T red[kClassTile][kWarps];  // block reductions
  __shared__ T col_mean[kClassTile];
  __shared__ bool col_dead[kClassTile];

  const int64_t b = blockIdx.x / tiles;
  const int64_t c0 = (blockIdx.x % tiles) * kClassTile;
  const int nc = static_cast<int>(C - c0 < kClassTile ? C - c0 : kClassTile);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* K = kernel + b * N * N;
  const T* Q = q + b * N * C;
  T* vec = scratch == nullptr ? reinterpret_cast<T*>(smem_raw)
                              : scratch + static_cast<int64_t>(blockIdx.x) * 2 * kClassTile * N;
  T* u = vec;                     // [kClassTile, N]
  T* v = vec + kClassTile * N;    // [kClassTile, N]
  const T a = T(1) / static_cast<T>(N);
  const T log_a = log(a);

  // classes past C (a partial last tile) run with q = 0 and are never written
  auto q_at = [&](int64_t j, int c) -> T { return c < nc ? Q[j * C + c0 + c] : T(0); };

  for (int64_t j = tid; j < N; j += kThreads) {
#pragma unroll
    for (int c = 0; c < kClassTile; ++c) v[c * N + j] = T(1);
  }
  __syncthreads();

  // K v for the tile: a warp per row; `finish(i, c, kv)` consumes the row's result
  auto k_times_v = [&](auto finish) {
    for (int64_t i = warp; i < N; i += kWarps) {
      T acc[kClassTile];
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) acc[c] = T(0);
      const T* row = K + i * N;
      for (int64_t j = lane; j < N; j += 32) {
        const T kij = row[j];
#pragma unroll
        for (int c = 0; c < kClassTile; ++c) acc[c] += kij * v[c * N + j];
      }
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) acc[c] = warp_sum(acc[c]);
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < kClassTile; ++c) finish(i, c, acc[c]);
      }
    }
  };

  for (int64_t it = 0; it < iters; ++it) {
    k_times_v([&](int64_t i, int c, T kv) { u[c * N + i] = sinkhorn_u(a, kv); });
    __syncthreads();
    // v = q / max(K^T u, floor): a thread per column
    for (int64_t j = tid; j < N; j += kThreads) {
      T acc[kClassTile];
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) acc[c] = T(0);
      // partial sums over chunks of kSumChunk rows bound the rounding error's growth
      for (int64_t i0 = 0; i0 < N; i0 += kSumChunk) {
        const int64_t i1 = i0 + kSumChunk < N ? i0 + kSumChunk : N;
        T part[kClassTile];
#pragma unroll
        for (int c = 0; c < kClassTile; ++c) part[c] = T(0);
        for (int64_t i = i0; i < i1; ++i) {
          const T kij = K[i * N + j];
#pragma unroll
          for (int c = 0; c < kClassTile; ++c) part[c] += kij * u[c * N + i];
        }
#pragma unroll
        for (int c = 0; c < kClassTile; ++c) acc[c] += part[c];
      }
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) v[c * N + j] = sinkhorn_v(q_at(j, c), acc[c]);
    }
    __syncthreads();
  }

  // potential f into u, then the per-class means and dead flags
  k_times_v([&](int64_t i, int c, T kv) { u[c * N + i] = sinkhorn_potential(eps, log_a, kv); });
  __syncthreads();
  T fsum[kClassTile], qsum[kClassTile];
#pragma unroll
  for (int c = 0; c < kClassTile; ++c) fsum[c] = qsum[c] = T(0);
  for (int64_t j = tid; j < N; j += kThreads) {
#pragma unroll
    for (int c = 0; c < kClassTile; ++c) {
      fsum[c] += u[c * N + j];
      qsum[c] += q_at(j, c);
    }
  }
#pragma unroll
  for (int c = 0; c < kClassTile; ++c) {
    fsum[c] = warp_sum(fsum[c]);
    if (lane == 0) red[c][warp] = fsum[c];
  }
  __syncthreads();
  if (tid < kClassTile) {
    T s = T(0);
    for (int w = 0; w < kWarps; ++w) s += red[tid][w];
    col_mean[tid] = s / static_cast<T>(N);
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kClassTile; ++c) {
    qsum[c] = warp_sum(qsum[c]);
    if (lane == 0) red[c][warp] = qsum[c];
  }
  __syncthreads();
  if (tid < kClassTile) {
    T s = T(0);
    for (int w = 0; w < kWarps; ++w) s += red[tid][w];
    col_dead[tid] = !(s > T(0));
  }
  __syncthreads();

  T* O = out + b * N * C;
  for (int64_t j = tid; j < N; j += kThreads) {
    for (int c = 0; c < nc; ++c) {
      O[j * C + c0 + c] = col_dead[c] ? -INFINITY : col_mean[c] - u[c * N + j];
    }
  }
}

// ---------------------------------------------------------------- cooperative schedule
template <typename T>
struct CoopArgs {
  const T* q;       // [B, N, C]
  const T* kernel;  // [B, N, N]
  T* out;           // [B, N, C]
  T* u;             // [B, N, C] scratch: u, then the potential f
  T* v;             // [B, N, C] scratch
  int64_t B, N, C, iters;
  T eps;
};

template <typename T>
__global__ void __launch_bounds__(coop::kThreads) sinkhorn_scores_coop_kernel(const CoopArgs<T> p) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  __shared__ coop::TileSmem<T> sm;
  __shared__ T red[coop::kThreads / 32];
  const int64_t N = p.N, C = p.C, NC = N * C;
  const int64_t total = p.B * NC;
  const int64_t tiles = coop::tile_count(p.B, N, C);
  const T a = T(1) / static_cast<T>(N);
  const T log_a = log(a);
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t e = gtid; e < total; e += gthreads) p.v[e] = T(1);
  grid.sync();

  // One product over all tiles: X [B, N, C] -> epilogue(b, i, c, value) for every in-range output.
  auto product = [&](auto trans, const T* X, auto epilogue) {
    constexpr bool kTrans = decltype(trans)::value;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const coop::Tile tile = coop::tile_of(t, N, C);
      T acc[coop::kRowsPerThread];
      coop::tile_product<T, kTrans>(p.kernel + tile.b * N * N, X + tile.b * NC, N, C, tile.i0, tile.c0, sm, acc);
      const int64_t c = tile.c0 + coop::tile_cls();
#pragma unroll
      for (int m = 0; m < coop::kRowsPerThread; ++m) {
        const int64_t i = tile.i0 + coop::tile_row(m);
        if (i < N && c < C) epilogue(tile.b * NC + i * C + c, acc[m]);
      }
    }
  };
  using NoTrans = std::integral_constant<bool, false>;
  using Trans = std::integral_constant<bool, true>;

  for (int64_t it = 0; it < p.iters; ++it) {
    product(NoTrans{}, p.v, [&](int64_t e, T kv) { p.u[e] = sinkhorn_u(a, kv); });
    grid.sync();
    product(Trans{}, p.u, [&](int64_t e, T ktu) { p.v[e] = sinkhorn_v(p.q[e], ktu); });
    grid.sync();
  }
  product(NoTrans{}, p.v, [&](int64_t e, T kv) { p.u[e] = sinkhorn_potential(p.eps, log_a, kv); });
  grid.sync();

  // readout: one block per (batch, class) column at a time
  for (int64_t col = blockIdx.x; col < p.B * C; col += gridDim.x) {
    const int64_t b = col / C, c = col % C;
    const T* f = p.u + b * NC + c;
    const T* qc = p.q + b * NC + c;
    T fs = T(0), qs = T(0);
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      fs += f[i * C];
      qs += qc[i * C];
    }
    const T mean = coop::block_sum(fs, red) / static_cast<T>(N);
    const bool dead = !(coop::block_sum(qs, red) > T(0));
    T* o = p.out + b * NC + c;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) o[i * C] = dead ? -INFINITY : mean - f[i * C];
  }
}

template <typename T>
size_t coop_scratch_bytes(const SinkhornScoresParams& p) {
  return 2 * coop::aligned_bytes(static_cast<size_t>(p.B * p.N * p.C) * sizeof(T));
}

template <typename T>
cudaError_t launch_coop(const SinkhornScoresParams& p, cudaStream_t stream) {
  if (p.scratch == nullptr) return cudaErrorInvalidValue;
  CoopArgs<T> args;
  coop::set_common_args<T>(args, p);
  args.u = static_cast<T*>(p.scratch);
  args.v = reinterpret_cast<T*>(static_cast<unsigned char*>(p.scratch) +
                                coop::aligned_bytes(static_cast<size_t>(p.B * p.N * p.C) * sizeof(T)));
  args.iters = p.iters;
  args.eps = static_cast<T>(p.eps);
  return coop::launch_cooperative(reinterpret_cast<const void*>(&sinkhorn_scores_coop_kernel<T>), args, stream);
}

// ---------------------------------------------------------------- tile schedule
template <typename T>
size_t shared_bytes(int64_t N) {
  return static_cast<size_t>(2) * kClassTile * static_cast<size_t>(N) * sizeof(T);
}

template <typename T>
cudaError_t launch_typed(const SinkhornScoresParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.C + kClassTile - 1) / kClassTile;
  // no scratch: u and v of a block in shared memory
  return coop::launch_tile(&sinkhorn_scores_kernel<T>, p.B * tiles, p.scratch == nullptr ? shared_bytes<T>(p.N) : 0,
                           stream, static_cast<const T*>(p.q), static_cast<const T*>(p.kernel),
                           static_cast<T*>(p.out), static_cast<T*>(p.scratch), p.N, p.C, tiles,
                           static_cast<T>(p.eps), p.iters);
}

}  // namespace

size_t sinkhorn_scores_scratch_bytes(const SinkhornScoresParams& p) {
  if (p.B == 0 || p.N == 0 || p.C == 0) return 0;
  if (coop::use_cooperative()) {
    return p.is_double ? coop_scratch_bytes<double>(p) : coop_scratch_bytes<float>(p);
  }
  const size_t elem = p.is_double ? sizeof(double) : sizeof(float);
  const size_t smem = static_cast<size_t>(2) * kClassTile * static_cast<size_t>(p.N) * elem;
  if (smem <= coop::optin_shared_limit()) return 0;
  const int64_t tiles = (p.C + kClassTile - 1) / kClassTile;
  return static_cast<size_t>(p.B * tiles) * smem;
}

cudaError_t launch_sinkhorn_scores(const SinkhornScoresParams& p, cudaStream_t stream) {
  return coop::dispatch(
      p, [&](auto t) { return launch_coop<decltype(t)>(p, stream); },
      [&](auto t) { return launch_typed<decltype(t)>(p, stream); });
}

}  // namespace ovss_fast
