// method.md section 3, mode "kl": S[b, i, c] = Q log(N Q), 0 where Q = 0, -inf for a
// class whose Q column is all zero. The arithmetic is kl_term in common/kl_scores_math.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/kl_scores_math.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {
namespace {

template <typename T>
OVSS_INLINE void kl_row(const T* q, const uint8_t* alive, T* out, int64_t C, int64_t N) {
  const T n = static_cast<T>(N);
  for (int64_t c = 0; c < C; ++c) out[c] = kl_term(q[c], n, alive[c] != 0);
}

OVSS_CPU_CLONES void kl_row_f32(const float* q, const uint8_t* alive, float* out, int64_t C, int64_t N) {
  kl_row<float>(q, alive, out, C, N);
}
inline void kl_row_any(const float* q, const uint8_t* alive, float* out, int64_t C, int64_t N) {
  kl_row_f32(q, alive, out, C, N);
}
inline void kl_row_any(const double* q, const uint8_t* alive, double* out, int64_t C, int64_t N) {
  kl_row<double>(q, alive, out, C, N);
}

template <typename T>
void kl_scores_cpu_impl(const T* q,  // [B, N, C]
                        T* out,       // [B, N, C]
                        int64_t B, int64_t N, int64_t C) {
  // a column is alive when any entry is > 0 (q >= 0, so that is "its sum is > 0")
  std::vector<uint8_t> alive(B * C, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* a = alive.data() + b * C;
      for (int64_t i = 0; i < N; ++i) {
        const T* row = q + (b * N + i) * C;
        for (int64_t c = 0; c < C; ++c) a[c] |= row[c] > T(0);
      }
    }
  });
  at::parallel_for(0, B * N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) kl_row_any(q + r * C, alive.data() + (r / N) * C, out + r * C, C, N);
  });
}

at::Tensor kl_scores_cpu(const at::Tensor& q) {
  check_rank(q, "q", 3, "[B, N, C]");
  check_floating(q, "q");
  check_device(q, "q", c10::DeviceType::CPU);
  const auto dt = compute_dtype(q);
  const at::Tensor qc = prepare(q, dt);
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  if (out.numel() == 0) return out;
  const int64_t B = qc.size(0), N = qc.size(1), C = qc.size(2);
  if (dt == at::kDouble) {
    kl_scores_cpu_impl<double>(qc.const_data_ptr<double>(), out.mutable_data_ptr<double>(), B, N, C);
  } else {
    kl_scores_cpu_impl<float>(qc.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, N, C);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("kl_scores", &kl_scores_cpu); }

}  // namespace ovss_fast
