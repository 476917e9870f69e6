// method.md section 3, "kl", on CUDA: S = Q log(N Q), 0 where Q = 0, -inf for a dead
// class. Two launches: one thread per (b, c) marks live columns (coalesced over c),
// then one thread per element applies kl_term (common/kl_scores_math.h).

#include <cuda_runtime.h>

#include "../common/kl_scores_math.h"
#include "kl_scores_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

template <typename T>
__global__ void kl_alive_kernel(const T* __restrict__ q,  // [B, N, C]
                                unsigned char* __restrict__ alive,  // [B, C]
                                int64_t B, int64_t N, int64_t C) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < B * C;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / C, c = k % C;
    unsigned char a = 0;
    for (int64_t i = 0; i < N && !a; ++i) a = q[(b * N + i) * C + c] > T(0);
    alive[k] = a;
  }
}

template <typename T>
__global__ void kl_scores_kernel(const T* __restrict__ q,                  // [B, N, C]
                                 const unsigned char* __restrict__ alive,  // [B, C]
                                 T* __restrict__ out,                      // [B, N, C]
                                 int64_t total, int64_t N, int64_t C) {
  const T n = static_cast<T>(N);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = k % C, b = k / (N * C);
    out[k] = kl_term(q[k], n, alive[b * C + c] != 0);
  }
}

template <typename T>
cudaError_t launch(const KlScoresParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const T* q = static_cast<const T*>(p.q);
  kl_alive_kernel<T><<<grid_for(p.B * p.C, kThreads), kThreads, 0, stream>>>(q, p.alive, p.B, p.N, p.C);
  const int64_t total = p.B * p.N * p.C;
  kl_scores_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(q, p.alive, static_cast<T*>(p.out), total,
                                                                          p.N, p.C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kl_scores(const KlScoresParams& p, cudaStream_t stream) {
  return p.is_double ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace ovss_fast
