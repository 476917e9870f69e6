// method.md section 4 on the CPU: joint bilateral upsampling of scores [B, C, h, w] to
// the guide's [H, W]. One output row per task: per pixel the tap weights are computed
// once (cpu/jbu_cpu.h), then every class accumulates over the taps from channels-last
// scores; the row is written back channel-first.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/jbu_prepare.h"
#include "cpu/cpu_simd.h"
#include "cpu/jbu_cpu.h"

namespace ovss_fast {
namespace {

// one output row: per pixel the taps, then all classes; written back channel-first
template <typename T>
OVSS_INLINE void upsample_row(const JbuShape<T>& s, const T* st, const T* g, const T* gd, int64_t b, int64_t y,
                         T* weight, int64_t* offset, T* row, T* out) {
  const int64_t hw = s.h * s.w, HW = s.H * s.W, C = s.C;
  for (int64_t x = 0; x < s.W; ++x) {
    T den;
    const int n = jbu_pixel_taps(s, g + b * 3 * HW, gd + b * 6 * hw, y, x, weight, offset, &den);
    T* num = row + x * C;
    jbu_pixel_numerators(st + b * hw * C, weight, offset, n, C, num);
    for (int64_t c = 0; c < C; ++c) num[c] = num[c] / den;
  }
  for (int64_t c = 0; c < C; ++c) {
    T* o = out + ((b * C + c) * s.H + y) * s.W;
    for (int64_t x = 0; x < s.W; ++x) o[x] = row[x * C + c];
  }
}

OVSS_CPU_CLONES void upsample_row_f32(const JbuShape<float>& s, const float* st, const float* g, const float* gd,
                                      int64_t b, int64_t y, float* weight, int64_t* offset, float* row, float* out) {
  upsample_row<float>(s, st, g, gd, b, y, weight, offset, row, out);
}
inline void upsample_row_any(const JbuShape<float>& s, const float* st, const float* g, const float* gd, int64_t b,
                             int64_t y, float* weight, int64_t* offset, float* row, float* out) {
  upsample_row_f32(s, st, g, gd, b, y, weight, offset, row, out);
}
inline void upsample_row_any(const JbuShape<double>& s, const double* st, const double* g, const double* gd,
                             int64_t b, int64_t y, double* weight, int64_t* offset, double* row, double* out) {
  upsample_row<double>(s, st, g, gd, b, y, weight, offset, row, out);
}

template <typename T>
void jbu_upsample_cpu_impl(const JbuShape<T>& s,
                           const T* st,  // [B, h*w, C] channels-last scores
                           const T* g,   // [B, 3, H, W]
                           const T* gd,  // [B, 6, h, w] (hi, lo)
                           T* out) {     // [B, C, H, W]
  const int taps = (2 * s.radius + 1) * (2 * s.radius + 1);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> weight(taps), row(s.W * s.C);
    std::vector<int64_t> offset(taps);
    for (int64_t r = r0; r < r1; ++r)
      upsample_row_any(s, st, g, gd, r / s.H, r % s.H, weight.data(), offset.data(), row.data(), out);
  });
}

at::Tensor jbu_upsample_cpu(const at::Tensor& scores, const at::Tensor& guide, double sigma_spatial,
                            double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CPU);
  const auto dt = compute_dtype(scores, guide);
  const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
  at::Tensor out = at::empty({B, C, H, W}, scores.options().dtype(dt));
  if (out.numel() == 0) return out;
  const JbuInputs in = prepare_jbu(scores, guide, true);
  const at::Tensor st = in.scores.permute({0, 2, 3, 1}).contiguous();  // [B, h, w, C]
  if (dt == at::kDouble) {
    jbu_upsample_cpu_impl<double>(jbu_shape<double>(in, sigma_spatial, sigma_range, radius),
                                  st.const_data_ptr<double>(), in.guide.const_data_ptr<double>(),
                                  in.gd.const_data_ptr<double>(), out.mutable_data_ptr<double>());
  } else {
    jbu_upsample_cpu_impl<float>(jbu_shape<float>(in, sigma_spatial, sigma_range, radius),
                                 st.const_data_ptr<float>(), in.guide.const_data_ptr<float>(),
                                 in.gd.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("jbu_upsample", &jbu_upsample_cpu); }

}  // namespace ovss_fast
