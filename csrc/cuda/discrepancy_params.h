// Launch parameters of the CUDA discrepancy kernels (sinkhorn_scores, markov_scores): the fields both
// share. No torch headers: the kernels' .cu files include it.
#pragma once

#include <cstdint>

namespace ovss_fast {

struct DiscrepancyParams {
  const void* q;       // [B, N, C] contiguous, float or double
  const void* kernel;  // [B, N, N] contiguous, same dtype
  void* out;           // [B, N, C] contiguous, same dtype
  void* scratch;       // the op's *_scratch_bytes(...) bytes (nullptr when that is 0)
  int64_t B, N, C;
  bool is_double;
};

}  // namespace ovss_fast
