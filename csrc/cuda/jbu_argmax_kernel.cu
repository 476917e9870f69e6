// method.md section 4 on CUDA: fused joint bilateral upsampling + argmax over classes (ties to the lowest class); never holds [B, C, H, W].
// The kernel is jbu_kernel in jbu_device.cuh (one thread per output pixel).

#include <cuda_runtime.h>

#include "jbu_argmax_kernel.h"
#include "jbu_device.cuh"

namespace ovss_fast {

cudaError_t launch_jbu_argmax(const JbuParams& p, cudaStream_t stream) {
  return p.is_double ? launch_jbu_typed<double, true>(p, stream) : launch_jbu_typed<float, true>(p, stream);
}

}  // namespace ovss_fast
