// method.md section 4 on CUDA: joint bilateral upsampling of scores to the guide's size.
// The kernel is jbu_kernel in jbu_device.cuh (one thread per output pixel).

#include <cuda_runtime.h>

#include "jbu_upsample_kernel.h"
#include "jbu_device.cuh"

namespace ovss_fast {

cudaError_t launch_jbu_upsample(const JbuParams& p, cudaStream_t stream) {
  return p.is_double ? launch_jbu_typed<double, false>(p, stream) : launch_jbu_typed<float, false>(p, stream);
}

}  // namespace ovss_fast
