// Launcher of the CUDA gibbs_kernel kernels (method.md section 2). No torch headers:
// csrc/cuda/gibbs_kernel.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ovss_fast {

struct GibbsKernelParams {
  const void* affinity;  // [B, N, N] contiguous, float or double
  void* cost;            // [B, N, N] contiguous, same dtype
  void* kernel;          // [B, N, N] contiguous, same dtype
  long long* minmax;     // [B, 2] scratch: order-preserving integer keys of Sym's min and max
  int64_t B, N;
  double eps;
  bool is_double;
};

cudaError_t launch_gibbs_kernel(const GibbsKernelParams& p, cudaStream_t stream);

}  // namespace ovss_fast
