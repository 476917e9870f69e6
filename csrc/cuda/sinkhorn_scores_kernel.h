// Launcher of the CUDA optimal-path kernel (shared/method.md section 3, "op").
// No torch headers: the wrapper csrc/cuda/sinkhorn_scores.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "discrepancy_params.h"

namespace ovss_fast {

struct SinkhornScoresParams : DiscrepancyParams {  // scratch: sinkhorn_scores_scratch_bytes(...)
  double eps;
  int64_t iters;
};

// Global scratch the launch needs: 0 when u and v of a block fit in shared memory
// on the current device, else 2 * CT * N elements per (batch, class tile).
size_t sinkhorn_scores_scratch_bytes(const SinkhornScoresParams& p);

// One launch for the whole batch on `stream`; returns the launch's error code.
cudaError_t launch_sinkhorn_scores(const SinkhornScoresParams& p, cudaStream_t stream);

}  // namespace ovss_fast
