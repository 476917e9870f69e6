// The input checks of the gibbs_kernel wrappers, shared by the CPU (csrc/cpu/gibbs_kernel.cpp) and
// CUDA (csrc/cuda/gibbs_kernel.cpp) ones. Host only: includes torch headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace ovss_fast {

// affinity [B, N, N] floating on `device`; eps > 0 (messages name the argument and what was seen).
inline void check_gibbs_kernel_args(const at::Tensor& affinity, double eps, c10::DeviceType device) {
  check_rank(affinity, "affinity", 3, "[B, N, N]");
  check_floating(affinity, "affinity");
  check_device(affinity, "affinity", device);
  TORCH_CHECK(affinity.size(1) == affinity.size(2), "affinity must be square [B, N, N], got shape ",
              shape_str(affinity));
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
}

}  // namespace ovss_fast
