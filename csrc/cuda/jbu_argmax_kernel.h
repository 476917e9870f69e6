// Launcher of the CUDA jbu_argmax kernel (method.md section 4): fused joint bilateral upsampling + argmax over classes (ties to the lowest class); never holds [B, C, H, W].
// No torch headers: csrc/cuda/jbu_argmax.cpp fills the struct; p.out is labels [B, H, W] int64.
#pragma once

#include <cuda_runtime.h>

#include "jbu_params.h"

namespace ovss_fast {

cudaError_t launch_jbu_argmax(const JbuParams& p, cudaStream_t stream);

}  // namespace ovss_fast
