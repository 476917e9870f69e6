// method.md section 1 on the CPU: Q[b, :, c] = column-normalised (NMS'd) softmax of
// scale * cos(feats, text). The dot products are one GEMM written straight into the
// output [B*N, C] (feats against the unit text vectors, so nothing the size of feats
// is copied); the rest is two passes over that [B, N, C] buffer: per patch (norm,
// scale, softmax, NMS along "classes") and per class (NMS along "patches": the
// column's max, then the threshold; column sums, then normalisation). Nothing
// larger than [B, N, C] is ever allocated. Elementwise math: common/class_distributions_math.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/class_distributions_checks.h"
#include "common/class_distributions_math.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {
namespace {

// classes per task of the per-class pass
constexpr int64_t kCols = 64;

// text rows divided by their max |entry|, then by their floored norms, as the reference does
template <typename T>
void unit_text(const T* text,  // [C, D]
               T* unit,        // [C, D]
               int64_t C, int64_t D) {
  for (int64_t c = 0; c < C; ++c) {
    const T* t = text + c * D;
    T m = 0;
    for (int64_t d = 0; d < D; ++d) m = (t[d] < T(0) ? -t[d] : t[d]) > m ? (t[d] < T(0) ? -t[d] : t[d]) : m;
    const T sc = norm_scale(m);
    T ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += (t[d] / sc) * (t[d] / sc);
    const T nrm = feature_norm(ss);
    for (int64_t d = 0; d < D; ++d) unit[c * D + d] = (t[d] / sc) / nrm;
  }
}

// One patch: logits from the dot products in p (in place), softmax, NMS. Every loop is
// elementwise or a lane reduction, so it vectorises (cpu_simd.h).
template <typename T>
OVSS_INLINE void patch_softmax(const T* x,  // [D]
                          T* p,        // [C]: dot products with the unit text vectors in, P out
                          int64_t C, int64_t D, T scale, T nms) {
  const T xs = norm_scale(lane_max_abs(x, D));
  const T xn = feature_norm(lane_scaled_sum_of_squares(x, D, xs));
  for (int64_t c = 0; c < C; ++c) p[c] = class_logit(p[c], xs, xn, scale);
  const T lmax = lane_max(p, C, neg_inf<T>());
  for (int64_t c = 0; c < C; ++c) p[c] = softmax_numerator(p[c], lmax);
  const T sum = lane_sum(p, C);
  for (int64_t c = 0; c < C; ++c) p[c] = p[c] / sum;
  if (nms > T(0)) {
    const T pmax = lane_max(p, C, T(0));
    for (int64_t c = 0; c < C; ++c) p[c] = nms_keep(p[c], pmax, nms);
  }
}

// columns c0..c1 (at most kCols) of one image [N, C]: with nms > 0, the "patches" NMS
// (entries below nms * the column's max over patches become 0, in place), then the sums s
template <typename T>
OVSS_INLINE void column_sums(T* p, int64_t N, int64_t C, int64_t c0, int64_t c1, T nms, T* s) {
  if (nms > T(0)) {
    T m[kCols];
    for (int64_t c = c0; c < c1; ++c) m[c - c0] = T(0);
    for (int64_t i = 0; i < N; ++i) {
      const T* row = p + i * C;
      for (int64_t c = c0; c < c1; ++c) m[c - c0] = row[c] > m[c - c0] ? row[c] : m[c - c0];
    }
    for (int64_t i = 0; i < N; ++i) {
      T* row = p + i * C;
      for (int64_t c = c0; c < c1; ++c) row[c] = nms_keep(row[c], m[c - c0], nms);
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    const T* row = p + i * C;
    for (int64_t c = c0; c < c1; ++c) s[c] += row[c];
  }
}

template <typename T>
OVSS_INLINE void normalise_rows(T* p, const T* colsum, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) p[r * C + c] = normalise_column(p[r * C + c], colsum[c]);
}

// float32 entry points, compiled for several instruction sets (cpu_simd.h)
OVSS_CPU_CLONES void patch_softmax_rows_f32(const float* x, float* p, int64_t rows, int64_t C, int64_t D, float scale,
                                            float nms) {
  for (int64_t r = 0; r < rows; ++r) patch_softmax<float>(x + r * D, p + r * C, C, D, scale, nms);
}
OVSS_CPU_CLONES void column_sums_f32(float* p, int64_t N, int64_t C, int64_t c0, int64_t c1, float nms, float* s) {
  column_sums<float>(p, N, C, c0, c1, nms, s);
}
OVSS_CPU_CLONES void normalise_rows_f32(float* p, const float* colsum, int64_t rows, int64_t C) {
  normalise_rows<float>(p, colsum, rows, C);
}
inline void patch_softmax_rows(const float* x, float* p, int64_t rows, int64_t C, int64_t D, float scale, float nms) {
  patch_softmax_rows_f32(x, p, rows, C, D, scale, nms);
}
inline void patch_softmax_rows(const double* x, double* p, int64_t rows, int64_t C, int64_t D, double scale,
                               double nms) {
  for (int64_t r = 0; r < rows; ++r) patch_softmax<double>(x + r * D, p + r * C, C, D, scale, nms);
}
inline void column_sums_any(float* p, int64_t N, int64_t C, int64_t c0, int64_t c1, float nms, float* s) {
  column_sums_f32(p, N, C, c0, c1, nms, s);
}
inline void column_sums_any(double* p, int64_t N, int64_t C, int64_t c0, int64_t c1, double nms, double* s) {
  column_sums<double>(p, N, C, c0, c1, nms, s);
}
inline void normalise_rows_any(float* p, const float* colsum, int64_t rows, int64_t C) {
  normalise_rows_f32(p, colsum, rows, C);
}
inline void normalise_rows_any(double* p, const double* colsum, int64_t rows, int64_t C) {
  normalise_rows<double>(p, colsum, rows, C);
}

// out holds feats . unit_text on entry and Q on exit
template <typename T>
void class_distributions_cpu_impl(const T* feats,  // [B, N, D]
                                  T* out,          // [B, N, C]
                                  int64_t B, int64_t N, int64_t C, int64_t D, T scale, T nms, int axis) {
  const T nms_classes = axis == kNmsClasses ? nms : T(0), nms_patches = axis == kNmsPatches ? nms : T(0);
  // per patch: logits, softmax, NMS along classes (in place)
  at::parallel_for(0, B * N, 64, [&](int64_t r0, int64_t r1) {
    patch_softmax_rows(feats + r0 * D, out + r0 * C, r1 - r0, C, D, scale, nms_classes);
  });
  // per class: NMS along patches, column sums over patches (rows outer so each row is read contiguously)
  std::vector<T> colsum(B * C, T(0));
  const int64_t blocks_per_image = (C + kCols - 1) / kCols;
  at::parallel_for(0, B * blocks_per_image, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / blocks_per_image;
      const int64_t c0 = (k % blocks_per_image) * kCols, c1 = std::min(C, c0 + kCols);
      column_sums_any(out + b * N * C, N, C, c0, c1, nms_patches, colsum.data() + b * C);
    }
  });
  // the column normalisation, a row block at a time (blocks never straddle images)
  at::parallel_for(0, B * N, 256, [&](int64_t r0, int64_t r1) {
    while (r0 < r1) {
      const int64_t b = r0 / N, stop = std::min(r1, (b + 1) * N);
      normalise_rows_any(out + r0 * C, colsum.data() + b * C, stop - r0, C);
      r0 = stop;
    }
  });
}

at::Tensor class_distributions_cpu(const at::Tensor& feats, const at::Tensor& text, double scale, double nms,
                                  c10::string_view nms_axis) {
  check_features_and_text(feats, text, c10::DeviceType::CPU);
  const int axis = nms_axis_code(nms_axis);
  const auto dt = compute_dtype(feats, text);
  const int64_t B = feats.size(0), N = feats.size(1), D = feats.size(2), C = text.size(0);
  at::Tensor out = at::empty({B, N, C}, feats.options().dtype(dt));
  if (out.numel() == 0) return out;
  const at::Tensor x = prepare(feats, dt);
  const at::Tensor t = prepare(text, dt);
  at::Tensor unit = at::empty({C, D}, t.options());
  if (dt == at::kDouble) {
    unit_text<double>(t.const_data_ptr<double>(), unit.mutable_data_ptr<double>(), C, D);
  } else {
    unit_text<float>(t.const_data_ptr<float>(), unit.mutable_data_ptr<float>(), C, D);
  }
  // [B*N, D] @ [D, C] -> the output buffer
  at::Tensor out2d = out.view({B * N, C});
  at::mm_out(out2d, x.view({B * N, D}), unit.t());
  if (dt == at::kDouble) {
    class_distributions_cpu_impl<double>(x.const_data_ptr<double>(), out.mutable_data_ptr<double>(), B, N, C, D,
                                         scale, nms, axis);
  } else {
    class_distributions_cpu_impl<float>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, N, C, D,
                                        static_cast<float>(scale), static_cast<float>(nms), axis);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("class_distributions", &class_distributions_cpu); }

}  // namespace ovss_fast
