// Launcher of the CUDA class_distributions kernels (method.md section 1). No torch
// headers: csrc/cuda/class_distributions.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ovss_fast {

struct ClassDistributionsParams {
  const void* feats;  // [B, N, D] contiguous, float or double
  const void* text;   // [C, D] contiguous, same dtype
  void* out;          // [B, N, C] contiguous, same dtype
  void* scratch;      // class_distributions_scratch_bytes(p) bytes: unit text [D, C], column sums [B, C]
  int64_t B, N, C, D;
  double scale, nms;
  bool is_double;
};

size_t class_distributions_scratch_bytes(const ClassDistributionsParams& p);

// Shared memory one patch's block needs; the wrapper rejects D + C beyond the device's limit.
size_t class_distributions_shared_bytes(const ClassDistributionsParams& p);

cudaError_t launch_class_distributions(const ClassDistributionsParams& p, cudaStream_t stream);

}  // namespace ovss_fast
