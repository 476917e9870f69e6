// method.md section 4, fused on the CPU: labels = argmax_c of the joint bilateral
// upsampling, without ever holding [B, C, H, W]. Per row segment the tap weights are
// computed once per pixel and the numerators are one small matrix product
// (cpu/jbu_cpu.h); only the best class is written: memory O(B*H*W) besides the inputs
// (and the class-last scores, O(B*C*h*w)).

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

OVSS_CPU_CLONES void argmax_row_f32(const JbuCpuData<float>& d, const std::vector<JbuSegment>& segs, int64_t b,
                                    int64_t y, JbuWork<float>& wk, int64_t* labels) {
  jbu_row<float, true>(d, segs, b, y, wk, labels + (b * d.s.H + y) * d.s.W, nullptr);
}

void argmax_row_f64(const JbuCpuData<double>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                    JbuWork<double>& wk, int64_t* labels) {
  jbu_row<double, true>(d, segs, b, y, wk, labels + (b * d.s.H + y) * d.s.W, nullptr);
}

at::Tensor jbu_argmax_cpu(const at::Tensor& scores, const at::Tensor& guide, double sigma_spatial,
                          double sigma_range, int64_t radius) {
  check_jbu_args(scores, guide, sigma_spatial, sigma_range, radius, c10::DeviceType::CPU);
  const int64_t B = scores.size(0), C = scores.size(1), H = guide.size(2), W = guide.size(3);
  at::Tensor labels = at::empty({B, H, W}, scores.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  TORCH_CHECK(C > 0, "scores has C = 0 classes (shape ", shape_str(scores), "): no label to choose");
  const JbuInputs in = prepare_jbu(scores, guide, true, /*with_gd=*/false);  // Gd: jbu_cpu_data
  advise_huge_pages(labels.data_ptr(), static_cast<size_t>(labels.nbytes()));
  std::vector<at::Tensor> keep;
  int64_t* out = labels.mutable_data_ptr<int64_t>();
  if (in.dtype == at::kDouble) {
    jbu_cpu_rows(jbu_cpu_data<double>(in, sigma_spatial, sigma_range, radius, &keep),
                 [out](const JbuCpuData<double>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                       JbuWork<double>& wk) { argmax_row_f64(d, segs, b, y, wk, out); });
  } else {
    jbu_cpu_rows(jbu_cpu_data<float>(in, sigma_spatial, sigma_range, radius, &keep),
                 [out](const JbuCpuData<float>& d, const std::vector<JbuSegment>& segs, int64_t b, int64_t y,
                       JbuWork<float>& wk) { argmax_row_f32(d, segs, b, y, wk, out); });
  }
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("jbu_argmax", &jbu_argmax_cpu); }

}  // namespace ovss_fast
