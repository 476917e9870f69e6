// Launcher of the CUDA jbu_upsample kernel (method.md section 4): joint bilateral upsampling of scores to the guide's size.
// No torch headers: csrc/cuda/jbu_upsample.cpp fills the struct; p.out is [B, C, H, W], same dtype as the scores.
#pragma once

#include <cuda_runtime.h>

#include "jbu_params.h"

namespace ovss_fast {

cudaError_t launch_jbu_upsample(const JbuParams& p, cudaStream_t stream);

}  // namespace ovss_fast
