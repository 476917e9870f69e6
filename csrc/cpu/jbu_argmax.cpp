// method.md section 4, fused on the CPU: labels = argmax_c of the joint bilateral
// upsampling, without ever holding [B, C, H, W]. Per pixel the tap weights are
// computed once (cpu/jbu_cpu.h), the C numerators live in a per-thread buffer, and
// only the best class is written: memory O(B*H*W) besides the inputs.

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

// one output row: per pixel the taps, the C numerators, the best class
template <typename T>
OVSS_INLINE void argmax_row(const JbuShape<T>& s, const T* st, const T* g, const T* gd, int64_t b, int64_t y, T* weight,
                       int64_t* offset, T* num, int64_t* labels) {
  const int64_t hw = s.h * s.w, HW = s.H * s.W, C = s.C;
  for (int64_t x = 0; x < s.W; ++x) {
    T den;
    const int n = jbu_pixel_taps(s, g + b * 3 * HW, gd + b * 6 * hw, y, x, weight, offset, &den);
    jbu_pixel_numerators(st + b * hw * C, weight, offset, n, C, num);
    T best = neg_inf<T>();
    int64_t arg = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T v = num[c] / den;
      if (argmax_better(v, best)) {
        best = v;
        arg = c;
      }
    }
    labels[x] = arg;
  }
}

OVSS_CPU_CLONES void argmax_row_f32(const JbuShape<float>& s, const float* st, const float* g, const float* gd,
                                    int64_t b, int64_t y, float* weight, int64_t* offset, float* num,
                                    int64_t* labels) {
  argmax_row<float>(s, st, g, gd, b, y, weight, offset, num, labels);
}
inline void argmax_row_any(const JbuShape<float>& s, const float* st, const float* g, const float* gd, int64_t b,
                           int64_t y, float* weight, int64_t* offset, float* num, int64_t* labels) {
  argmax_row_f32(s, st, g, gd, b, y, weight, offset, num, labels);
}
inline void argmax_row_any(const JbuShape<double>& s, const double* st, const double* g, const double* gd, int64_t b,
                           int64_t y, double* weight, int64_t* offset, double* num, int64_t* labels) {
  argmax_row<double>(s, st, g, gd, b, y, weight, offset, num, labels);
}

template <typename T>
void jbu_argmax_cpu_impl(const JbuShape<T>& s,
                         const T* st,      // [B, h*w, C] channels-last scores
                         const T* g,       // [B, 3, H, W]
                         const T* gd,      // [B, 6, h, w] (hi, lo)
                         int64_t* labels)  // [B, H, W]
{
  const int taps = (2 * s.radius + 1) * (2 * s.radius + 1);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> weight(taps), num(s.C);
    std::vector<int64_t> offset(taps);
    for (int64_t r = r0; r < r1; ++r)
      argmax_row_any(s, st, g, gd, r / s.H, r % s.H, weight.data(), offset.data(), num.data(), labels + r * s.W);
  });
}

at::Tensor jbu_argmax_cpu(const at::Tensor& scores, const at::Tensor& guide, double sigma_spatial,
                          double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CPU);
  const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
  at::Tensor labels = at::empty({B, H, W}, scores.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  TORCH_CHECK(C > 0, "scores has C = 0 classes (shape ", shape_str(scores), "): no label to choose");
  const JbuInputs in = prepare_jbu(scores, guide, true);
  const at::Tensor st = in.scores.permute({0, 2, 3, 1}).contiguous();  // [B, h, w, C]
  if (in.dtype == at::kDouble) {
    jbu_argmax_cpu_impl<double>(jbu_shape<double>(in, sigma_spatial, sigma_range, radius),
                                st.const_data_ptr<double>(), in.guide.const_data_ptr<double>(),
                                in.gd.const_data_ptr<double>(), labels.mutable_data_ptr<int64_t>());
  } else {
    jbu_argmax_cpu_impl<float>(jbu_shape<float>(in, sigma_spatial, sigma_range, radius),
                               st.const_data_ptr<float>(), in.guide.const_data_ptr<float>(),
                               in.gd.const_data_ptr<float>(), labels.mutable_data_ptr<int64_t>());
  }
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("jbu_argmax", &jbu_argmax_cpu); }

}  // namespace ovss_fast
