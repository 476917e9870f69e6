// Host side shared by the CUDA wrappers of sinkhorn_scores and markov_scores: the inputs in the
// compute dtype, the output, the common launch parameters, and the launch check. Host only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/discrepancy_checks.h"
#include "cuda/cuda_call.h"
#include "cuda/discrepancy_params.h"

namespace ovss_fast {

// The tensors (common/discrepancy_checks.h: prepare_discrepancy); fills the shared fields of `p`
// (pointers, B, N, C, dtype) from q [B, N, C] and kernel [B, N, N].
inline DiscrepancyTensors discrepancy_tensors(const at::Tensor& q, const at::Tensor& kernel, DiscrepancyParams& p) {
  DiscrepancyTensors t = prepare_discrepancy(q, kernel);
  p.q = t.q.const_data_ptr();
  p.kernel = t.kernel.const_data_ptr();
  p.out = t.out.mutable_data_ptr();
  p.B = t.q.size(0);
  p.N = t.q.size(1);
  p.C = t.q.size(2);
  p.is_double = t.q.scalar_type() == at::kDouble;
  return t;
}

// The rest of a discrepancy wrapper, once its op-specific fields of `p` are set and checked: on q's device
// and stream, the tensors and shared fields (discrepancy_tensors), scratch_bytes(p) bytes of scratch, one
// launch(p, stream), the launch check; returns S [B, N, C] in the compute dtype.
template <typename Params>
at::Tensor run_discrepancy(const char* op, const at::Tensor& q, const at::Tensor& kernel, Params p,
                           size_t (*scratch_bytes)(const Params&), cudaError_t (*launch)(const Params&, cudaStream_t)) {
  return on_cuda(q, "q", [&](cudaStream_t stream) {
    const DiscrepancyTensors t = discrepancy_tensors(q, kernel, p);
    if (t.out.numel() == 0) return t.out;
    at::Tensor scratch;
    p.scratch = cuda_scratch(scratch, scratch_bytes(p), t.q);
    check_launch(launch(p, stream), op, "B=", p.B, ", N=", p.N, ", C=", p.C, "; where cooperative launches are ",
                 "refused (e.g. under MPS), OVSS_FAST_CUDA_DISCREPANCY=tile selects the other CUDA schedule");
    return t.out;
  });
}

}  // namespace ovss_fast
