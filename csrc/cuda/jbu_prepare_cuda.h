// Host-side: fills JbuParams from prepared inputs (CUDA wrappers of jbu_upsample and
// jbu_argmax). Host only: includes torch headers.
#pragma once

#include <limits>

#include "common/jbu_prepare.h"
#include "cuda/jbu_params.h"

namespace ovss_fast {

inline JbuParams jbu_params(const JbuInputs& in, double sigma_spatial, double sigma_range, int64_t radius, void* out) {
  TORCH_CHECK(in.h * in.w <= std::numeric_limits<int>::max(), "scores grid ", in.h, " x ", in.w,
              " is too large for the CUDA kernel");
  const JbuShape<double> s = jbu_shape<double>(in, sigma_spatial, sigma_range, radius);
  JbuParams p{};
  p.scores = in.scores.const_data_ptr();
  p.guide = in.guide.const_data_ptr();
  p.gd = in.gd.const_data_ptr();
  p.out = out;
  p.B = in.B;
  p.C = in.C;
  p.h = in.h;
  p.w = in.w;
  p.H = in.H;
  p.W = in.W;
  p.radius = static_cast<int>(radius);
  p.ratio_y = s.ratio_y;
  p.ratio_x = s.ratio_x;
  p.inv_s = s.inv_s;
  p.inv_r = s.inv_r;
  p.is_double = in.dtype == at::kDouble;
  return p;
}

}  // namespace ovss_fast
