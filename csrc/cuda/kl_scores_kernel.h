// Launcher of the CUDA kl_scores kernel (method.md section 3, "kl"). No torch headers:
// csrc/cuda/kl_scores.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ovss_fast {

struct KlScoresParams {
  const void* q;         // [B, N, C] contiguous, float or double
  void* out;             // [B, N, C] contiguous, same dtype
  unsigned char* alive;  // [B, C] scratch: 1 where the class column has mass
  int64_t B, N, C;
  bool is_double;
};

cudaError_t launch_kl_scores(const KlScoresParams& p, cudaStream_t stream);

}  // namespace ovss_fast
