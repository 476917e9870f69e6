// HOSTDEVICE: inline functions that both the host compiler (CPU kernels) and nvcc
// (CUDA kernels) compile, so the CPU tests exercise the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define HOSTDEVICE __host__ __device__ __forceinline__
#else
#define HOSTDEVICE inline
#endif

#include <cmath>

namespace ovss_fast {

// method.md section 3: divisions floor their denominators here (a normal float32)
constexpr double kDenomFloor = 1e-30;
// method.md section 2: added to the symmetrised affinity before the log
constexpr double kLogFloor = 1e-12;

}  // namespace ovss_fast
