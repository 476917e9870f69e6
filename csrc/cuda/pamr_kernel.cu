// PAMR on CUDA (csrc/common/pamr_math.h; reference.py pamr is the spec): one thread per pixel computes
// its P affinities in double (pamr_affinity_pixel; stores coalesced across x), then one launch per step, one thread
// per output element (pamr_step_pixel), reading the previous step's buffer: no [B, C, P, H, W] unfold.

#include <cuda_runtime.h>

#include "../common/pamr_math.h"
#include "pamr_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

template <typename T>
__global__ void pamr_affinity_kernel(const T* __restrict__ image,        // [B, K, H, W]
                                     const int64_t* __restrict__ dil,    // [nd]
                                     T* __restrict__ aff,                // [B, P, H, W]
                                     int64_t B, int64_t K, int64_t H, int64_t W, int nd) {
  const int64_t hw = H * W, total = B * hw, P = 8 * nd;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / hw, p = k % hw;
    pamr_affinity_pixel<T>(image + b * K * hw, K, H, W, dil, nd, p / W, p % W, aff + b * P * hw + p);
  }
}

template <typename T>
__global__ void pamr_step_kernel(const T* __restrict__ src,          // [B, C, H, W]
                                 const T* __restrict__ aff,          // [B, P, H, W]
                                 const int64_t* __restrict__ dil,    // [nd]
                                 T* __restrict__ dst,                // [B, C, H, W]
                                 int64_t B, int64_t C, int64_t H, int64_t W, int nd) {
  const int64_t hw = H * W, total = B * C * hw, P = 8 * nd;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = k / hw, p = k % hw, b = plane / C;
    dst[k] = pamr_step_pixel<T>(src + plane * hw, aff + b * P * hw + p, H, W, dil, nd, p / W, p % W);
  }
}

constexpr int kThreads = 256;

template <typename T>
cudaError_t launch_steps(const PamrParams& p, cudaStream_t stream) {
  const T* aff = static_cast<const T*>(p.affinity);
  const unsigned int grid = grid_for(p.B * p.C * p.H * p.W, kThreads);
  cudaError_t err = cudaSuccess;
  for (int64_t it = 0; it < p.iters && err == cudaSuccess; ++it) {
    const T* src = static_cast<const T*>(it == 0 ? p.scores : ((it - 1) % 2 == 0 ? p.ping : p.pong));
    T* dst = static_cast<T*>(it % 2 == 0 ? p.ping : p.pong);
    pamr_step_kernel<T><<<grid, kThreads, 0, stream>>>(src, aff, p.dilations, dst, p.B, p.C, p.H, p.W, p.nd);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t launch_pamr_affinity(const PamrParams& p, cudaStream_t stream) {
  pamr_affinity_kernel<double><<<grid_for(p.B * p.H * p.W, kThreads), kThreads, 0, stream>>>(
      p.image, p.dilations, p.affinity64, p.B, p.K, p.H, p.W, p.nd);
  return cudaGetLastError();
}

cudaError_t launch_pamr_steps(const PamrParams& p, cudaStream_t stream) {
  return p.is_double ? launch_steps<double>(p, stream) : launch_steps<float>(p, stream);
}

}  // namespace ovss_fast
