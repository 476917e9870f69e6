// Parameters of the CUDA JBU kernels (method.md section 4), shared by
// jbu_upsample_kernel.h and jbu_argmax_kernel.h. No torch headers.
#pragma once

#include <cstdint>

namespace ovss_fast {

struct JbuParams {
  const void* scores;  // [B, C, h, w] contiguous, float or double
  const void* guide;   // [B, 3, H, W] contiguous, same dtype
  const void* gd;      // [B, 6, h, w] the guide area-averaged to the score grid: hi (0-2) + lo (3-5)
  void* out;           // jbu_upsample: [B, C, H, W] same dtype; jbu_argmax: labels [B, H, W] int64
  int64_t B, C, h, w, H, W;
  int radius;
  double ratio_y, ratio_x;  // h / H, w / W (in double for every dtype, as the float64 reference)
  double inv_s, inv_r;      // 1 / (2 sigma_s^2), 1 / (2 sigma_r^2)
  bool is_double;
};

}  // namespace ovss_fast
