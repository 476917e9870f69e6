// Host-side launch check shared by the CUDA wrappers of sinkhorn_scores and markov_scores.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ovss_fast {

inline void check_discrepancy_launch(cudaError_t err, const char* op, int64_t B, int64_t N, int64_t C) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err),
              " (B=", B, ", N=", N, ", C=", C, "); where cooperative launches are refused ",
              "(e.g. under MPS), OVSS_FAST_CUDA_DISCREPANCY=tile selects the other CUDA schedule");
}

}  // namespace ovss_fast
