// Block-wide reductions for the CUDA kernels of ovss_fast (CUDA headers only).
#pragma once

#include <cuda_runtime.h>

namespace ovss_fast {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

// Reduces v over the block (its thread count a multiple of 32, at most 1024; 1D, 2D
// or 3D, warps taken in linear thread order); every thread gets the result. `shared`
// holds at least 32 values; the call synchronises the block.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int warps = (blockDim.x * blockDim.y * blockDim.z) >> 5;
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (tid == 0) {
    T r = shared[0];
    for (int k = 1; k < warps; ++k) r = op(r, shared[k]);
    shared[0] = r;
  }
  __syncthreads();
  const T r = shared[0];
  __syncthreads();  // shared may be reused right after
  return r;
}

inline unsigned int grid_for(long long total, int threads, unsigned int cap = 1u << 20) {
  long long blocks = (total + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks < cap ? blocks : cap);
}

}  // namespace ovss_fast
