// PAMR on the CPU (csrc/common/pamr_math.h has the formulas; reference.py pamr is the spec):
// the affinities A [B, P, H, W] once, in double (one task per image row: pamr_affinity_pixel's
// operations in its order, as loops over the row), rounded to the compute dtype, then `iters` steps that ping-pong between two [B, C, H, W]
// buffers. A step's task is one image row of every class: the row's P affinity rows (P W values,
// cache resident) serve all C classes. Within a class's row, the columns whose neighbours all lie on
// the image are register blocks of 4 vectors accumulated over the P neighbours (contiguous loads of
// a_j and of the source row shifted by dx_j); only the reach of the largest dilation at each end
// reads clamped indices (replicate padding without a padded copy). Never the peers' [B, C, P, H, W]
// unfold: memory is the two buffers + A.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string.h>

#include <algorithm>
#include <vector>

#include "common/pamr_checks.h"
#include "common/pamr_math.h"
#include "cpu/cpu_memory.h"
#include "cpu/cpu_simd.h"

namespace ovss_fast {
namespace {

// neighbour j of one output row: the offset of its source pixel for column x, row_j W + x + dx_j, minus x
// (valid for the interior columns, where no neighbour leaves the image), its source row and column shift
struct PamrTap {
  int64_t offset, row, dx;
};

// The taps of output row y, and the interior columns [*x_lo, *x_hi) where every x + dx_j is on the image.
void pamr_row_taps(const std::vector<int64_t>& dil, int64_t y, int64_t H, int64_t W, PamrTap* taps, int64_t* x_lo,
                   int64_t* x_hi) {
  int64_t reach = 0;
  for (size_t i = 0; i < dil.size(); ++i) {
    reach = std::max(reach, dil[i]);
    for (int o = 0; o < 8; ++o) {
      int dy, dx;
      pamr_offset(o, &dy, &dx);
      PamrTap& t = taps[8 * i + o];
      t.row = pamr_clamp(y + dy * dil[i], H);
      t.dx = dx * dil[i];
      t.offset = t.row * W + t.dx;
    }
  }
  *x_lo = std::min(reach, W);
  *x_hi = std::max(*x_lo, W - reach);
}

// one output pixel near the left or right border: the clamped reads, in j order from a_0 m_0
template <typename T>
OVSS_INLINE T pamr_border_pixel(const T* a, int64_t hw, const T* src, const PamrTap* taps, int P, int64_t W,
                                int64_t x) {
  T acc = a[0] * src[taps[0].row * W + pamr_clamp(x + taps[0].dx, W)];
  for (int j = 1; j < P; ++j) acc += a[j * hw] * src[taps[j].row * W + pamr_clamp(x + taps[j].dx, W)];
  return acc;
}

// one output row of one class: out[x] = sum_j a_j[x] src[row_j][x + dx_j] (clamped), summed in j order from
// a_0 m_0 (the same order in the border and interior paths, and as the reference's). Interior: register
// blocks of 4 vectors, each accumulated over all P neighbours before one store (a and src each read once).
template <typename T>
OVSS_INLINE void pamr_row_class(const T* __restrict a, int64_t hw, const T* __restrict src, T* __restrict out,
                                const PamrTap* taps, int P, int64_t W, int64_t x_lo, int64_t x_hi) {
  typedef typename Vec32<T>::type V;
  constexpr int64_t L = Vec32<T>::kLen;
  for (int64_t x = 0; x < x_lo; ++x) out[x] = pamr_border_pixel(a + x, hw, src, taps, P, W, x);
  int64_t x = x_lo;
  for (; x + 4 * L <= x_hi; x += 4 * L) {
    V acc[4], av, sv;
    for (int u = 0; u < 4; ++u) {
      memcpy(&av, a + x + u * L, sizeof(V));
      memcpy(&sv, src + taps[0].offset + x + u * L, sizeof(V));
      acc[u] = av * sv;
    }
    for (int j = 1; j < P; ++j) {
      const T* aj = a + j * hw + x;
      const T* sj = src + taps[j].offset + x;
      for (int u = 0; u < 4; ++u) {
        memcpy(&av, aj + u * L, sizeof(V));
        memcpy(&sv, sj + u * L, sizeof(V));
        acc[u] += av * sv;
      }
    }
    memcpy(out + x, acc, sizeof(acc));
  }
  for (; x < x_hi; ++x) {
    T acc = a[x] * src[taps[0].offset + x];
    for (int j = 1; j < P; ++j) acc += a[j * hw + x] * src[taps[j].offset + x];
    out[x] = acc;
  }
  for (x = x_hi; x < W; ++x) out[x] = pamr_border_pixel(a + x, hw, src, taps, P, W, x);
}

// row y of image b for every class: a = &A[b, 0, y, 0], src / dst = &M[b, 0, 0, 0]
template <typename T>
OVSS_INLINE void pamr_row_all_classes(const T* a, const T* src, T* dst, int64_t C, int64_t H, int64_t W, int64_t y,
                                      const PamrTap* taps, int P, int64_t x_lo, int64_t x_hi) {
  const int64_t hw = H * W;
  for (int64_t c = 0; c < C; ++c)
    pamr_row_class<T>(a, hw, src + c * hw, dst + c * hw + y * W, taps, P, W, x_lo, x_hi);
}

OVSS_CPU_CLONES void pamr_row_f32(const float* a, const float* src, float* dst, int64_t C, int64_t H, int64_t W,
                                  int64_t y, const PamrTap* taps, int P, int64_t x_lo, int64_t x_hi) {
  pamr_row_all_classes<float>(a, src, dst, C, H, W, y, taps, P, x_lo, x_hi);
}

OVSS_CPU_CLONES void pamr_row_f64(const double* a, const double* src, double* dst, int64_t C, int64_t H, int64_t W,
                                  int64_t y, const PamrTap* taps, int P, int64_t x_lo, int64_t x_hi) {
  pamr_row_all_classes<double>(a, src, dst, C, H, W, y, taps, P, x_lo, x_hi);
}

void pamr_row(const float* a, const float* src, float* dst, int64_t C, int64_t H, int64_t W, int64_t y,
              const PamrTap* taps, int P, int64_t x_lo, int64_t x_hi) {
  pamr_row_f32(a, src, dst, C, H, W, y, taps, P, x_lo, x_hi);
}
void pamr_row(const double* a, const double* src, double* dst, int64_t C, int64_t H, int64_t W, int64_t y,
              const PamrTap* taps, int P, int64_t x_lo, int64_t x_hi) {
  pamr_row_f64(a, src, dst, C, H, W, y, taps, P, x_lo, x_hi);
}

// grain of a parallel_for over rows that each cost `per_row` multiply-adds: about 1M per task at least
// (a step of a small image is tens of microseconds; waking threads for it cost 10x that on a busy machine)
int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, per_row)); }

// x -> src[clamp(x + dx)] for x in [0, W): a row shifted by dx with replicate padding
OVSS_INLINE void shifted_row(const double* src, int64_t dx, int64_t W, double* out) {
  const int64_t lo = std::min<int64_t>(W, std::max<int64_t>(0, -dx));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(W, W - dx));
  for (int64_t x = 0; x < lo; ++x) out[x] = src[0];
  memcpy(out + lo, src + lo + dx, sizeof(double) * static_cast<size_t>(hi - lo));
  for (int64_t x = hi; x < W; ++x) out[x] = src[W - 1];
}

// pamr_affinity_pixel (common/pamr_math.h) for a whole row, operation for operation in the same order per
// pixel, as loops over x: row y of image b -> a = &A[b, 0, y, 0] of A [B, P, H, W] (stride hw between j).
// taps: [9 nd, W] scratch (the centre, then its 8 neighbours, per dilation); work: [3, W] scratch.
OVSS_CPU_CLONES void pamr_affinity_row(const double* img, int64_t K, int64_t H, int64_t W, const int64_t* dil,
                                       int nd, int64_t y, double* a, double* taps, double* work) {
  const int64_t hw = H * W;
  const int n = 9 * nd, P = 8 * nd;
  double* mean = work;
  double* ss = work + W;
  double* inv = work + 2 * W;  // 1 / (1e-8 + 0.1 s_k)
  for (int64_t k = 0; k < K; ++k) {
    const double* xk = img + k * hw;
    for (int i = 0; i < nd; ++i) {
      memcpy(taps + (9 * i) * W, xk + y * W, sizeof(double) * static_cast<size_t>(W));
      for (int o = 0; o < 8; ++o) {
        int dy, dx;
        pamr_offset(o, &dy, &dx);
        shifted_row(xk + pamr_clamp(y + dy * dil[i], H) * W, dx * dil[i], W, taps + (9 * i + 1 + o) * W);
      }
    }
    for (int64_t x = 0; x < W; ++x) mean[x] = 0;
    for (int t = 0; t < n; ++t)
      for (int64_t x = 0; x < W; ++x) mean[x] += taps[t * W + x];
    for (int64_t x = 0; x < W; ++x) {
      mean[x] = mean[x] / static_cast<double>(n);
      ss[x] = 0;
    }
    for (int t = 0; t < n; ++t) {
      const double* tt = taps + t * W;
      for (int64_t x = 0; x < W; ++x) ss[x] += (tt[x] - mean[x]) * (tt[x] - mean[x]);
    }
    for (int64_t x = 0; x < W; ++x) inv[x] = 1.0 / pamr_denominator(math_sqrt(ss[x] / static_cast<double>(n - 1)));
    const double* c = taps;  // the centre (row y of channel k)
    for (int i = 0; i < nd; ++i) {
      for (int o = 0; o < 8; ++o) {
        const double* tt = taps + (9 * i + 1 + o) * W;
        double* aj = a + (8 * i + o) * hw;
        for (int64_t x = 0; x < W; ++x) {
          const double diff = c[x] > tt[x] ? c[x] - tt[x] : tt[x] - c[x];
          const double e = -(diff * inv[x]);
          aj[x] = k == 0 ? e : aj[x] + e;
        }
      }
    }
  }
  // mean over k, then the softmax over the P neighbours (mean: the running max, ss: the total)
  double* mx = mean;
  double* total = ss;
  for (int64_t x = 0; x < W; ++x) {
    mx[x] = neg_inf<double>();
    total[x] = 0;
  }
  for (int j = 0; j < P; ++j) {
    double* aj = a + j * hw;
    for (int64_t x = 0; x < W; ++x) {
      const double e = aj[x] / static_cast<double>(K);
      aj[x] = e;
      mx[x] = e > mx[x] ? e : mx[x];
    }
  }
  for (int j = 0; j < P; ++j) {
    double* aj = a + j * hw;
    for (int64_t x = 0; x < W; ++x) {
      const double w = math_exp(aj[x] - mx[x]);
      aj[x] = w;
      total[x] += w;
    }
  }
  for (int j = 0; j < P; ++j) {
    double* aj = a + j * hw;
    for (int64_t x = 0; x < W; ++x) aj[x] = aj[x] / total[x];
  }
}

// A [B, P, H, W] in double from the image [B, K, H, W] (double)
void pamr_affinities_cpu(const at::Tensor& image, const std::vector<int64_t>& dilations, at::Tensor& aff) {
  const int64_t B = image.size(0), K = image.size(1), H = image.size(2), W = image.size(3), hw = H * W;
  const int nd = static_cast<int>(dilations.size());
  const int64_t P = 8 * nd;
  const double* img = image.const_data_ptr<double>();
  double* A = aff.mutable_data_ptr<double>();
  at::parallel_for(0, B * H, row_grain(W * K * 3 * 9 * nd), [&](int64_t begin, int64_t end) {
    std::vector<double> taps(static_cast<size_t>(9 * nd * W)), work(static_cast<size_t>(3 * W));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      pamr_affinity_row(img + b * K * hw, K, H, W, dilations.data(), nd, y, A + b * P * hw + y * W, taps.data(),
                        work.data());
    }
  });
}

// the steps, ping-pong (common/pamr_checks.h): A [B, P, H, W] in T
template <typename T>
void pamr_steps_cpu(const PamrTensors& t, const at::Tensor& aff, int64_t iters) {
  const int64_t B = t.m0.size(0), C = t.m0.size(1), H = t.m0.size(2), W = t.m0.size(3);
  const int P = 8 * static_cast<int>(t.dilations.size());
  const int64_t hw = H * W;
  const T* A = aff.const_data_ptr<T>();
  for (int64_t it = 0; it < iters; ++it) {
    const T* src = it == 0 ? t.m0.const_data_ptr<T>() : ((it - 1) % 2 == 0 ? t.ping : t.pong).const_data_ptr<T>();
    T* dst = (it % 2 == 0 ? t.ping : t.pong).mutable_data_ptr<T>();
    at::parallel_for(0, B * H, row_grain(C * P * W), [&](int64_t begin, int64_t end) {
      std::vector<PamrTap> taps(P);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, y = r % H;
        int64_t x_lo, x_hi;
        pamr_row_taps(t.dilations, y, H, W, taps.data(), &x_lo, &x_hi);
        pamr_row(A + b * P * hw + y * W, src + b * C * hw, dst + b * C * hw, C, H, W, y, taps.data(), P, x_lo,
                 x_hi);
      }
    });
  }
}

at::Tensor pamr_cpu(const at::Tensor& scores,  // [B, C, h, w]
                    const at::Tensor& image,   // [B, K, H, W]
                    int64_t iters, c10::IntArrayRef dilations) {
  check_pamr_args(scores, image, iters, dilations, c10::DeviceType::CPU);
  const auto dt = compute_dtype(scores, image);
  const int64_t B = scores.size(0), C = scores.size(1), H = image.size(2), W = image.size(3);
  if (B * C * H * W == 0) return at::empty({B, C, H, W}, scores.options().dtype(dt));
  PamrTensors t = prepare_pamr(scores, image, iters, dilations);
  if (iters == 0) return pamr_result(t, 0);
  for (const at::Tensor* buf : {&t.ping, &t.pong})
    if (buf->defined()) advise_huge_pages(buf->data_ptr(), static_cast<size_t>(buf->nbytes()));
  at::Tensor aff = at::empty({B, 8 * static_cast<int64_t>(dilations.size()), H, W}, t.image.options());
  pamr_affinities_cpu(t.image, t.dilations, aff);
  aff = aff.to(dt);  // rounded once (a no-op in double)
  if (dt == at::kDouble) {
    pamr_steps_cpu<double>(t, aff, iters);
  } else {
    pamr_steps_cpu<float>(t, aff, iters);
  }
  return pamr_result(t, iters);
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CPU, m) { m.impl("pamr", &pamr_cpu); }

}  // namespace ovss_fast
