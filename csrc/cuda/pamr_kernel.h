// Launchers of the CUDA PAMR kernels (csrc/common/pamr_math.h): the affinities once (in double), then,
// after the wrapper rounded them to the compute dtype, one launch per refinement step reading the
// previous step's buffer. No torch headers: csrc/cuda/pamr.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ovss_fast {

struct PamrParams {
  const double* image;      // [B, K, H, W] contiguous, double
  const void* scores;       // [B, C, H, W] contiguous: the first step's input (the resized scores)
  void* ping;               // [B, C, H, W] written by steps 0, 2, 4, ...
  void* pong;               // [B, C, H, W] written by steps 1, 3, ... (may be `scores`: step 0 has read it)
  double* affinity64;       // [B, P, H, W] written by launch_pamr_affinity, P = 8 nd
  const void* affinity;     // [B, P, H, W] read by launch_pamr_steps: affinity64 in the compute dtype
  const int64_t* dilations; // [nd] on the device
  int64_t B, C, K, H, W;
  int nd;
  int64_t iters;
  bool is_double;           // the compute dtype of scores, ping, pong, affinity
};

cudaError_t launch_pamr_affinity(const PamrParams& p, cudaStream_t stream);
cudaError_t launch_pamr_steps(const PamrParams& p, cudaStream_t stream);

}  // namespace ovss_fast
