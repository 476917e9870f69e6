// CUDA maximum-velocity scores (shared/method.md section 3, "mv"):
//
//   T = K;  sk_iters times: rows of T to sum 1, then columns (floor 1e-30)
//   f(0) = N q;  f(l) = T^T f(l-1);  integrated: S = sum_{l=1..steps} (f(l) - 1)
//   velocity: lstar = first l >= 1 with |f(l) - f(l-1)| <= tau (steps+1 if never),
//             S = lstar + f(0) / (1 + f(0))   (slow settling wins; ties to the larger f(0))
//   dead class -> -inf
//
// One launch per call, with two schedules (csrc/cuda/discrepancy_coop.cuh says why):
//
// "coop" (default where cooperative launches work): a co-resident grid, grid.sync()
// between phases. Sinkhorn-Knopp in double: row sums with a warp per row, column sums
// with a block per 32-column slab (its warps split the rows); then each chain step is
// one product K^T h shared out as [64 x 16] output tiles over all SMs, the step's
// elementwise work (scale, readout, next h) fused into each tile's epilogue; last, one
// block per (batch, class) column for the dead-class check and the output.
//
// "tile" (fallback, OVSS_FAST_CUDA_DISCREPANCY=tile): each block owns one (batch, tile
// of kClassTile classes) and runs everything itself, the batch being a grid dimension:
//  1. Sinkhorn-Knopp as scaling vectors in double, T = diag(r) K diag(c): row sums
//     r * (K c) with a warp per row, column sums c * (K^T r) with a thread per
//     column, and e = T^T 1 - 1. Every block of a batch repeats this O(sk_iters N^2)
//     work rather than synchronising across blocks; it costs about
//     sk_iters / (steps kClassTile) of the chain.
//  2. The chain as deviations d = f - 1 (csrc/common/markov_math.h says why):
//     d(l) = c * (K^T (r * d(l-1))) + e, a thread per column j (coalesced K reads),
//     h = r * d double-buffered so no thread overwrites what another still reads.
//     Each thread owns its columns for the whole chain, so the readout state
//     (accumulator or lstar, and d(l-1)) is private to it and lives in global scratch.
// Elementwise math: csrc/common/markov_math.h, shared with the CPU kernel.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>

#include "../common/markov_math.h"
#include "discrepancy_coop.cuh"
#include "markov_scores_kernel.h"

namespace ovss_fast {
namespace {

using namespace tile_schedule;  // kClassTile, kThreads, kWarps, warp_sum

// Vector stride: N rounded up to 4 elements, so every vector starts 16-byte aligned.
__host__ __device__ inline int64_t padded(int64_t N) { return (N + 3) & ~int64_t{3}; }

// vectors per block, each padded(N) elements of T: r, c, e, h0 [kClassTile], h1 [kClassTile].
// During Sinkhorn-Knopp the double r, c (2 padded(N) doubles) occupy h1's place.
constexpr int64_t kVectors = 3 + 2 * kClassTile;
static_assert(kClassTile * sizeof(float) >= 2 * sizeof(double), "double SK vectors must fit in h1");
// readout state per block: state [kClassTile] (acc or lstar), dprev [kClassTile]
constexpr int64_t kStateVectors = 2 * kClassTile;

template <typename T>
__global__ void __launch_bounds__(kThreads)
markov_scores_kernel(const T* __restrict__ q,       // [B, N, C]
                     const T* __restrict__ kernel,  // [B, N, N]
                     T* __restrict__ out,           // [B, N, C]
                     T* __restrict__ state,         // [B * tiles, kStateVectors, padded(N)]
                     T* __restrict__ vectors,       // [B * tiles, kVectors, padded(N)], or nullptr: shared
                     int64_t N, int64_t C, int64_t tiles, int64_t sk_iters, int64_t steps, int readout,
                     T tau) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T red[kClassTile][kWarps];
  __shared__ bool col_dead[kClassTile];

  const int64_t b = blockIdx.x / tiles;
  const int64_t c0 = (blockIdx.x % tiles) * kClassTile;
  const int nc = static_cast<int>(C - c0 < kClassTile ? C - c0 : kClassTile);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t P = padded(N);
  const T* K = kernel + b * N * N;
  const T* Q = q + b * N * C;
  T* vec = vectors == nullptr ? reinterpret_cast<T*>(smem_raw)
                              : vectors + static_cast<int64_t>(blockIdx.x) * kVectors * P;
  T* r = vec;                                 // [N]
  T* cs = vec + P;                            // [N]
  T* e = vec + 2 * P;                         // [N]
  T* h_cur = vec + 3 * P;                     // [kClassTile, P]
  T* h_nxt = vec + (3 + kClassTile) * P;      // [kClassTile, P]
  double* rd = reinterpret_cast<double*>(h_nxt);  // [N], Sinkhorn-Knopp only
  double* cd = rd + P;                            // [N], Sinkhorn-Knopp only
  T* st = state + static_cast<int64_t>(blockIdx.x) * kStateVectors * P;
  T* acc_or_lstar = st;                       // [kClassTile, P]
  T* dprev = st + kClassTile * P;             // [kClassTile, P]
  const bool velocity = readout == kMarkovVelocity;
  const T tn = static_cast<T>(N);
  const int isteps = static_cast<int>(steps);

  auto q_at = [&](int64_t j, int c) -> T { return c < nc ? Q[j * C + c0 + c] : T(0); };

  // 1. Sinkhorn-Knopp scaling vectors (double) and e = c * (K^T r) - 1
  for (int64_t j = tid; j < N; j += kThreads) {
    rd[j] = 1.0;
    cd[j] = 1.0;
  }
  __syncthreads();
  // K^T rd for column j, in double; `finish(j, colsum)` consumes it
  auto columns = [&](auto finish) {
    for (int64_t j = tid; j < N; j += kThreads) {
      double acc = 0.0;
#pragma unroll 4
      for (int64_t i = 0; i < N; ++i) acc += static_cast<double>(K[i * N + j]) * rd[i];
      finish(j, acc);
    }
  };
  for (int64_t s = 0; s < sk_iters; ++s) {
    for (int64_t i = warp; i < N; i += kWarps) {
      const T* row = K + i * N;
      double acc = 0.0;
      for (int64_t j = lane; j < N; j += 32) acc += static_cast<double>(row[j]) * cd[j];
      acc = warp_sum(acc);
      if (lane == 0) rd[i] = sk_scale_update(rd[i], acc);
    }
    __syncthreads();
    columns([&](int64_t j, double ktr) {
      const double cj = sk_scale_update(cd[j], ktr);
      cd[j] = cj;
      e[j] = static_cast<T>(cj * ktr - 1.0);  // T's column sum - 1 with this (final?) r, c
    });
    __syncthreads();
  }
  if (sk_iters == 0) {
    columns([&](int64_t j, double ktr) { e[j] = static_cast<T>(cd[j] * ktr - 1.0); });
  }
  for (int64_t j = tid; j < N; j += kThreads) {
    r[j] = static_cast<T>(rd[j]);
    cs[j] = static_cast<T>(cd[j]);
  }

  // dead classes: q column sums
  {
    T qsum[kClassTile];
#pragma unroll
    for (int c = 0; c < kClassTile; ++c) qsum[c] = T(0);
    for (int64_t j = tid; j < N; j += kThreads) {
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) qsum[c] += q_at(j, c);
    }
#pragma unroll
    for (int c = 0; c < kClassTile; ++c) {
      qsum[c] = warp_sum(qsum[c]);
      if (lane == 0) red[c][warp] = qsum[c];
    }
    __syncthreads();  // also: r, cs, e complete; rd, cd (h_nxt) no longer read
    if (tid < kClassTile) {
      T s = T(0);
      for (int w = 0; w < kWarps; ++w) s += red[tid][w];
      col_dead[tid] = !(s > T(0));
    }
  }

  // 2. the chain on deviations d = f - 1
  for (int64_t j = tid; j < N; j += kThreads) {
#pragma unroll
    for (int c = 0; c < kClassTile; ++c) {
      const T d0 = tn * q_at(j, c) - T(1);
      h_cur[c * P + j] = r[j] * d0;
      dprev[c * P + j] = d0;
      acc_or_lstar[c * P + j] = velocity ? static_cast<T>(steps + 1) : T(0);
    }
  }
  __syncthreads();
  for (int64_t l = 1; l <= steps; ++l) {
    for (int64_t j = tid; j < N; j += kThreads) {
      T acc[kClassTile];
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) acc[c] = T(0);
#pragma unroll 4
      for (int64_t i = 0; i < N; ++i) {
        const T kij = K[i * N + j];
#pragma unroll
        for (int c = 0; c < kClassTile; ++c) acc[c] += kij * h_cur[c * P + i];
      }
      const T cj = cs[j], rj = r[j], ej = e[j];
#pragma unroll
      for (int c = 0; c < kClassTile; ++c) {
        const T d = markov_deviation_step(cj, acc[c], ej);
        const int64_t k = c * P + j;
        if (velocity) {
          acc_or_lstar[k] = velocity_update(acc_or_lstar[k], d, dprev[k], tau, static_cast<int>(l), isteps);
          dprev[k] = d;
        } else {
          acc_or_lstar[k] += d;
        }
        h_nxt[k] = rj * d;
      }
    }
    __syncthreads();  // h_nxt complete before anyone reads it; h_cur free for the next writes
    T* t = h_cur;
    h_cur = h_nxt;
    h_nxt = t;
  }

  T* O = out + b * N * C;
  for (int64_t j = tid; j < N; j += kThreads) {
    for (int c = 0; c < nc; ++c) {
      T s = acc_or_lstar[c * P + j];
      if (velocity) s = velocity_score(s, tn * Q[j * C + c0 + c]);
      O[j * C + c0 + c] = col_dead[c] ? -INFINITY : s;
    }
  }
}

// ---------------------------------------------------------------- cooperative schedule
template <typename T>
struct CoopArgs {
  const T* q;       // [B, N, C]
  const T* kernel;  // [B, N, N]
  T* out;           // [B, N, C]
  double* rd;       // [B, N] scratch: row scaling r
  double* cd;       // [B, N] scratch: column scaling c
  T* rt;            // [B, N] r in T
  T* ct;            // [B, N] c in T
  T* et;            // [B, N] e = T^T 1 - 1 in T
  T* h0;            // [B, N, C] r * d, double-buffered with h1
  T* h1;            // [B, N, C]
  T* acc;           // [B, N, C] integrated sum or lstar
  T* dprev;         // [B, N, C] d(l-1) (velocity)
  int64_t B, N, C, sk_iters, steps;
  int readout;
  T tau;
};

constexpr int kSlab = 32;  // columns per block in the column-sum pass

template <typename T>
__global__ void __launch_bounds__(coop::kThreads) markov_scores_coop_kernel(const CoopArgs<T> p) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  __shared__ coop::TileSmem<T> sm;
  __shared__ double slab[coop::kThreads / 32][kSlab];
  __shared__ T red[coop::kThreads / 32];
  const int64_t N = p.N, C = p.C, NC = N * C, BN = p.B * N;
  const int64_t total = p.B * NC;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  const int64_t gthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gwarp = gtid >> 5, gwarps = gthreads >> 5;
  const bool velocity = p.readout == kMarkovVelocity;
  const T tn = static_cast<T>(N);
  const int isteps = static_cast<int>(p.steps);

  for (int64_t k = gtid; k < BN; k += gthreads) {
    p.rd[k] = 1.0;
    p.cd[k] = 1.0;
  }
  grid.sync();

  // column sums K^T rd in double, a block per (batch, 32-column slab); `finish(b*N + j, sum)`
  const int64_t slabs_per_batch = (N + kSlab - 1) / kSlab;
  auto column_sums = [&](auto finish) {
    for (int64_t s = blockIdx.x; s < p.B * slabs_per_batch; s += gridDim.x) {
      const int64_t b = s / slabs_per_batch;
      const int64_t j = (s % slabs_per_batch) * kSlab + lane;
      const T* K = p.kernel + b * N * N;
      const double* r = p.rd + b * N;
      double acc = 0.0;
      if (j < N) {
        for (int64_t i = warp; i < N; i += coop::kThreads / 32) acc += static_cast<double>(K[i * N + j]) * r[i];
      }
      slab[warp][lane] = acc;
      __syncthreads();
      if (warp == 0 && j < N) {
        double sum = 0.0;
        for (int w = 0; w < coop::kThreads / 32; ++w) sum += slab[w][lane];
        finish(b * N + j, sum);
      }
      __syncthreads();
    }
  };

  for (int64_t s = 0; s < p.sk_iters; ++s) {
    for (int64_t row = gwarp; row < BN; row += gwarps) {  // row sums K cd, a warp per row
      const int64_t b = row / N;
      const T* Krow = p.kernel + row * N;  // (b, i) row of K: b * N * N + i * N
      const double* c = p.cd + b * N;
      double acc = 0.0;
      for (int64_t j = lane; j < N; j += 32) acc += static_cast<double>(Krow[j]) * c[j];
      acc = coop::warp_sum(acc);
      if (lane == 0) p.rd[row] = sk_scale_update(p.rd[row], acc);
    }
    grid.sync();
    column_sums([&](int64_t k, double ktr) {
      const double cj = sk_scale_update(p.cd[k], ktr);
      p.cd[k] = cj;
      p.et[k] = static_cast<T>(cj * ktr - 1.0);
    });
    grid.sync();
  }
  if (p.sk_iters == 0) {
    column_sums([&](int64_t k, double ktr) { p.et[k] = static_cast<T>(p.cd[k] * ktr - 1.0); });
  }
  for (int64_t k = gtid; k < BN; k += gthreads) {
    p.rt[k] = static_cast<T>(p.rd[k]);
    p.ct[k] = static_cast<T>(p.cd[k]);
  }
  for (int64_t e = gtid; e < total; e += gthreads) {
    const T d0 = tn * p.q[e] - T(1);
    p.h0[e] = static_cast<T>(p.rd[e / C]) * d0;
    p.dprev[e] = d0;
    p.acc[e] = velocity ? static_cast<T>(p.steps + 1) : T(0);
  }
  grid.sync();

  const int64_t tiles = coop::tile_count(p.B, N, C);
  T* h_cur = p.h0;
  T* h_nxt = p.h1;
  for (int64_t l = 1; l <= p.steps; ++l) {
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const coop::Tile tile = coop::tile_of(t, N, C);
      T acc[coop::kRowsPerThread];
      coop::tile_product<T, true>(p.kernel + tile.b * N * N, h_cur + tile.b * NC, N, C, tile.i0, tile.c0, sm, acc);
      const int64_t c = tile.c0 + coop::tile_cls();
#pragma unroll
      for (int m = 0; m < coop::kRowsPerThread; ++m) {
        const int64_t j = tile.i0 + coop::tile_row(m);
        if (j < N && c < C) {
          const int64_t bj = tile.b * N + j;
          const int64_t e = bj * C + c;
          const T d = markov_deviation_step(p.ct[bj], acc[m], p.et[bj]);
          if (velocity) {
            p.acc[e] = velocity_update(p.acc[e], d, p.dprev[e], p.tau, static_cast<int>(l), isteps);
            p.dprev[e] = d;
          } else {
            p.acc[e] += d;
          }
          h_nxt[e] = p.rt[bj] * d;
        }
      }
    }
    grid.sync();
    T* swap = h_cur;
    h_cur = h_nxt;
    h_nxt = swap;
  }

  // output: one block per (batch, class) column at a time
  for (int64_t col = blockIdx.x; col < p.B * C; col += gridDim.x) {
    const int64_t b = col / C, c = col % C;
    const T* qc = p.q + b * NC + c;
    T qs = T(0);
    for (int64_t i = tid; i < N; i += blockDim.x) qs += qc[i * C];
    const bool dead = !(coop::block_sum(qs, red) > T(0));
    for (int64_t i = tid; i < N; i += blockDim.x) {
      const int64_t e = b * NC + i * C + c;
      T s = p.acc[e];
      if (velocity) s = velocity_score(s, tn * p.q[e]);
      p.out[e] = dead ? -INFINITY : s;
    }
  }
}

struct CoopLayout {
  size_t rd, cd, rt, ct, et, h0, h1, acc, dprev, total;
};

inline CoopLayout coop_layout(const MarkovScoresParams& p) {
  const size_t elem = p.is_double ? sizeof(double) : sizeof(float);
  const size_t bn = static_cast<size_t>(p.B * p.N), bnc = static_cast<size_t>(p.B * p.N * p.C);
  CoopLayout l;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += coop::aligned_bytes(bytes);
    return at;
  };
  l.rd = take(bn * sizeof(double));
  l.cd = take(bn * sizeof(double));
  l.rt = take(bn * elem);
  l.ct = take(bn * elem);
  l.et = take(bn * elem);
  l.h0 = take(bnc * elem);
  l.h1 = take(bnc * elem);
  l.acc = take(bnc * elem);
  l.dprev = take(bnc * elem);
  l.total = off;
  return l;
}

template <typename T>
cudaError_t launch_coop(const MarkovScoresParams& p, cudaStream_t stream) {
  if (p.scratch == nullptr) return cudaErrorInvalidValue;
  const CoopLayout l = coop_layout(p);
  unsigned char* base = static_cast<unsigned char*>(p.scratch);
  CoopArgs<T> args;
  coop::set_common_args<T>(args, p);
  args.rd = reinterpret_cast<double*>(base + l.rd);
  args.cd = reinterpret_cast<double*>(base + l.cd);
  args.rt = reinterpret_cast<T*>(base + l.rt);
  args.ct = reinterpret_cast<T*>(base + l.ct);
  args.et = reinterpret_cast<T*>(base + l.et);
  args.h0 = reinterpret_cast<T*>(base + l.h0);
  args.h1 = reinterpret_cast<T*>(base + l.h1);
  args.acc = reinterpret_cast<T*>(base + l.acc);
  args.dprev = reinterpret_cast<T*>(base + l.dprev);
  args.sk_iters = p.sk_iters;
  args.steps = p.steps;
  args.readout = p.readout;
  args.tau = static_cast<T>(p.tau);
  return coop::launch_cooperative(reinterpret_cast<const void*>(&markov_scores_coop_kernel<T>), args, stream);
}

// ---------------------------------------------------------------- tile schedule
template <typename T>
size_t vector_bytes(int64_t N) {
  return static_cast<size_t>(kVectors) * static_cast<size_t>(padded(N)) * sizeof(T);
}

struct Layout {
  bool in_shared;
  size_t state_bytes, vector_bytes_total;
};

Layout layout_of(const MarkovScoresParams& p) {
  const size_t elem = p.is_double ? sizeof(double) : sizeof(float);
  const size_t blocks = static_cast<size_t>(p.B * ((p.C + kClassTile - 1) / kClassTile));
  const size_t P = static_cast<size_t>(padded(p.N));
  const size_t vec = static_cast<size_t>(kVectors) * P * elem;
  Layout l;
  l.in_shared = vec <= coop::optin_shared_limit();
  l.state_bytes = blocks * static_cast<size_t>(kStateVectors) * P * elem;
  l.vector_bytes_total = l.in_shared ? 0 : blocks * vec;
  return l;
}

template <typename T>
cudaError_t launch_typed(const MarkovScoresParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.C + kClassTile - 1) / kClassTile;
  if (p.scratch == nullptr) return cudaErrorInvalidValue;
  const Layout l = layout_of(p);
  T* state = static_cast<T*>(p.scratch);
  T* vectors = l.in_shared ? nullptr : reinterpret_cast<T*>(static_cast<unsigned char*>(p.scratch) + l.state_bytes);
  return coop::launch_tile(&markov_scores_kernel<T>, p.B * tiles, l.in_shared ? vector_bytes<T>(p.N) : 0, stream,
                           static_cast<const T*>(p.q), static_cast<const T*>(p.kernel), static_cast<T*>(p.out), state,
                           vectors, p.N, p.C, tiles, p.sk_iters, p.steps, p.readout, static_cast<T>(p.tau));
}

}  // namespace

size_t markov_scores_scratch_bytes(const MarkovScoresParams& p) {
  if (p.B == 0 || p.N == 0 || p.C == 0) return 0;
  if (coop::use_cooperative()) return coop_layout(p).total;
  const Layout l = layout_of(p);
  return l.state_bytes + l.vector_bytes_total;
}

cudaError_t launch_markov_scores(const MarkovScoresParams& p, cudaStream_t stream) {
  return coop::dispatch(
      p, [&](auto t) { return launch_coop<decltype(t)>(p, stream); },
      [&](auto t) { return launch_typed<decltype(t)>(p, stream); });
}

}  // namespace ovss_fast
