// method.md section 4 on the CPU: joint bilateral upsampling of scores [B, C, h, w] to
// the guide's [H, W]. One output row per task, cut into segments that share their taps:
// per pixel the tap weights are computed once, the numerators are one small matrix
// product per segment from class-last scores (cpu/jbu_cpu.h), written back channel-first.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/jbu_prepare.h"
#include "cpu/cpu_memory.h"
#include "cpu/cpu_simd.h"
#include "cpu/jbu_cpu.h"

namespace ovss_fast {
namespace {

OVSS_CPU_CLONES void upsample_row_f32(const JbuCpuData<float>& d, const std::vector<JbuSegment>& segs, int64_t b,
                                      int64_t y, JbuWork<float>& wk, float* out) {
  jbu_row<float, false>(d, segs, b, y, wk, nullptr, out);
}

void upsample_row_f64(const JbuCpuData<double>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                      JbuWork<double>& wk, double* out) {
  jbu_row<double, false>(d, segs, b, y, wk, nullptr, out);
}

at::Tensor jbu_upsample_cpu(const at::Tensor& scores, const at::Tensor& guide, double sigma_spatial,
                            double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CPU);
  const auto dt = compute_dtype(scores, guide);
  const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
  at::Tensor out = at::empty({B, C, H, W}, scores.options().dtype(dt));
  if (out.numel() == 0) return out;
  const JbuInputs in = prepare_jbu(scores, guide, true, /*with_gd=*/false);  // Gd: jbu_cpu_data
  advise_huge_pages(out.data_ptr(), static_cast<size_t>(out.nbytes()));
  std::vector<at::Tensor> keep;
  if (dt == at::kDouble) {
    double* o = out.mutable_data_ptr<double>();
    jbu_cpu_rows(jbu_cpu_data<double>(in, sigma_spatial, sigma_range, radius, &keep),
                 [o](const JbuCpuData<double>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                     JbuWork<double>& wk) { upsample_row_f64(d, segs, b, y, wk, o); });
  } else {
    float* o = out.mutable_data_ptr<float>();
    jbu_cpu_rows(jbu_cpu_data<float>(in, sigma_spatial, sigma_range, radius, &keep),
                 [o](const JbuCpuData<float>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                     JbuWork<float>& wk) { upsample_row_f32(d, segs, b, y, wk, o); });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("jbu_upsample", &jbu_upsample_cpu); }

}  // namespace ovss_fast
