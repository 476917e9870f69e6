// Launcher of the CUDA maximum-velocity kernel (shared/method.md section 3, "mv").
// No torch headers: the wrapper csrc/cuda/markov_scores.cpp fills the struct.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "discrepancy_params.h"

namespace ovss_fast {

struct MarkovScoresParams : DiscrepancyParams {  // scratch: markov_scores_scratch_bytes(...), never nullptr when > 0
  int64_t sk_iters, steps;
  int readout;  // kMarkovIntegrated or kMarkovVelocity (csrc/common/markov_math.h)
  double tau;
};

// Global scratch the launch needs (the per-class readout state always lives there;
// the scaling and chain vectors too when they do not fit in shared memory).
size_t markov_scores_scratch_bytes(const MarkovScoresParams& p);

// One launch for the whole batch on `stream`; returns the launch's error code.
cudaError_t launch_markov_scores(const MarkovScoresParams& p, cudaStream_t stream);

}  // namespace ovss_fast
