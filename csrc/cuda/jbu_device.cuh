// The CUDA joint bilateral upsampling kernel (method.md section 4), instantiated by
// jbu_upsample_kernel.cu (writes [B, C, H, W]) and jbu_argmax_kernel.cu (keeps only
// the running best class per pixel: labels [B, H, W]). CUDA headers only; the
// arithmetic is common/jbu_math.h, the same the CPU kernels run.
//
// One thread per output pixel, x fastest (guide reads and output writes coalesce;
// neighbouring pixels share low-res taps, so score reads hit cache). A pixel's tap
// weights are computed once into shared memory, [tap][thread], then reused for every
// class. With too many taps for shared memory (large radius) the kernel recomputes
// each tap's weight per class instead: the same arithmetic, so the same numbers.
// Weights as the CPU kernels (cpu/jbu_cpu.h): float exponents in double, one pass for
// their max and one for the weights (jbu_wide_exponent); double the relative exponents.
// (The CPU's class-innermost matrix product does not carry over: a thread would hold
// C numerators; here the class loop reuses the shared weights instead.)
#pragma once

#include <cuda_runtime.h>

#include <stdint.h>

#include "../common/jbu_math.h"
#include "jbu_params.h"
#include "reduce.cuh"

namespace ovss_fast {

template <typename T>
struct JbuPixel {
  double py, px;  // p' (jbu_lowres_position)
  T g0, g1, g2;
  int64_t cy, cx;
  const T* gd;  // [6, h, w] of the pixel's image (hi, lo)
  int64_t h, w;
  int radius;
  T inv_s, inv_r;
  JbuTap<T> peak;  // double: the tap of the largest exponent (find_max)
  T rmax;          // double: the largest exponent relative to the peak (find_max)
  double emax;     // float: the largest exponent, in double (find_max)

  // tap (dy, dx) and its flat low-res index; false when it is off the grid
  __device__ __forceinline__ bool tap(int dy, int dx, JbuTap<T>* t, int* q) const {
    const int64_t qy = cy + dy, qx = cx + dx;
    if (qy < 0 || qy >= h || qx < 0 || qx >= w) return false;
    const int64_t k = qy * w + qx;
    *t = jbu_tap(qy, py, qx, px, g0, g1, g2, gd, k, h * w);
    *q = static_cast<int>(k);
    return true;
  }

  // float: the exponent of tap (dy, dx) in double (jbu_wide_exponent, as the CPU kernel)
  __device__ __forceinline__ bool wide(int dy, int dx, double* e, int* q) const {
    const int64_t qy = cy + dy, qx = cx + dx;
    if (qy < 0 || qy >= h || qx < 0 || qx >= w) return false;
    const int64_t k = qy * w + qx, hw = h * w;
    *e = jbu_wide_exponent(static_cast<double>(qy) - py, static_cast<double>(qx) - px,
                           static_cast<double>(g0) - jbu_guide_wide(gd, 0, k, hw),
                           static_cast<double>(g1) - jbu_guide_wide(gd, 1, k, hw),
                           static_cast<double>(g2) - jbu_guide_wide(gd, 2, k, hw), static_cast<double>(inv_s),
                           static_cast<double>(inv_r));
    *q = static_cast<int>(k);
    return true;
  }

  // double: the exponent of tap (dy, dx) relative to the peak (common/jbu_math.h, "Precision")
  __device__ __forceinline__ bool relative(int dy, int dx, T* r, int* q) const {
    JbuTap<T> t;
    if (!tap(dy, dx, &t, q)) return false;
    *r = jbu_relative_exponent(t, peak, inv_s, inv_r);
    return true;
  }

  // the passes before the weights: float one (max e), double two (peak tap, max relative exponent)
  __device__ __forceinline__ void find_max() {
    if constexpr (sizeof(T) == 4) {
      emax = -static_cast<double>(INFINITY);
      for (int dy = -radius; dy <= radius; ++dy)
        for (int dx = -radius; dx <= radius; ++dx) {
          double e;
          int q;
          if (wide(dy, dx, &e, &q)) emax = e > emax ? e : emax;
        }
    } else {
      T best = neg_inf<T>();
      for (int dy = -radius; dy <= radius; ++dy)
        for (int dx = -radius; dx <= radius; ++dx) {
          JbuTap<T> t;
          int q;
          if (!tap(dy, dx, &t, &q)) continue;
          const T e = jbu_tap_exponent(t, inv_s, inv_r);
          if (e > best) {
            best = e;
            peak = t;
          }
        }
      rmax = neg_inf<T>();
      for (int dy = -radius; dy <= radius; ++dy)
        for (int dx = -radius; dx <= radius; ++dx) {
          T r;
          int q;
          if (relative(dy, dx, &r, &q)) rmax = r > rmax ? r : rmax;
        }
    }
  }

  // the weight of tap (dy, dx) (after find_max); false when it is off the grid
  __device__ __forceinline__ bool weight(int dy, int dx, T* wt, int* q) const {
    if constexpr (sizeof(T) == 4) {
      double e;
      if (!wide(dy, dx, &e, q)) return false;
      *wt = math_exp(static_cast<float>(e - emax));
    } else {
      T r;
      if (!relative(dy, dx, &r, q)) return false;
      *wt = jbu_weight(r, rmax);
    }
    return true;
  }
};

template <typename T, bool kSharedWeights, bool kArgmax>
__global__ void jbu_kernel(const T* __restrict__ scores,  // [B, C, h, w]
                           const T* __restrict__ guide,   // [B, 3, H, W]
                           const T* __restrict__ gd,      // [B, 6, h, w]
                           void* __restrict__ out,        // [B, C, H, W] T, or labels [B, H, W] int64
                           int64_t B, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, int radius,
                           double ratio_y, double ratio_x, T inv_s, T inv_r) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int taps = (2 * radius + 1) * (2 * radius + 1);
  T* wbuf = reinterpret_cast<T*>(smem_raw);                      // [taps][blockDim.x]
  int* obuf = reinterpret_cast<int*>(wbuf + taps * blockDim.x);  // [taps][blockDim.x]
  const int64_t HW = H * W, hw = h * w, total = B * HW;
  const int tid = threadIdx.x, bd = blockDim.x;
  for (int64_t pix = blockIdx.x * static_cast<int64_t>(bd) + tid; pix < total;
       pix += static_cast<int64_t>(gridDim.x) * bd) {
    const int64_t b = pix / HW, yx = pix % HW, y = yx / W, x = yx % W;
    JbuPixel<T> px;
    px.py = jbu_lowres_position(y, ratio_y);
    px.px = jbu_lowres_position(x, ratio_x);
    px.cy = jbu_nearest(px.py);
    px.cx = jbu_nearest(px.px);
    const T* g = guide + b * 3 * HW;
    px.g0 = g[yx];
    px.g1 = g[HW + yx];
    px.g2 = g[2 * HW + yx];
    px.gd = gd + b * 6 * hw;
    px.h = h;
    px.w = w;
    px.radius = radius;
    px.inv_s = inv_s;
    px.inv_r = inv_r;

    // the tap weights once per pixel (into shared memory when they fit) and their sum
    px.find_max();
    T den = 0;
    int n = 0;
    for (int dy = -radius; dy <= radius; ++dy)
      for (int dx = -radius; dx <= radius; ++dx) {
        T wt;
        int q;
        if (!px.weight(dy, dx, &wt, &q)) continue;
        if (kSharedWeights) {
          wbuf[n * bd + tid] = wt;
          obuf[n * bd + tid] = q;
        }
        den += wt;
        ++n;
      }

    // then every class over the same weights
    const T* sb = scores + b * C * hw;
    T best = neg_inf<T>();
    int64_t arg = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T* sc = sb + c * hw;
      T num = 0;
      if (kSharedWeights) {
        for (int t = 0; t < n; ++t) num = jbu_accumulate(num, wbuf[t * bd + tid], sc[obuf[t * bd + tid]]);
      } else {
        for (int dy = -radius; dy <= radius; ++dy)
          for (int dx = -radius; dx <= radius; ++dx) {
            T wt;
            int q;
            if (px.weight(dy, dx, &wt, &q)) num = jbu_accumulate(num, wt, sc[q]);
          }
      }
      const T v = num / den;
      if (kArgmax) {
        if (argmax_better(v, best)) {
          best = v;
          arg = c;
        }
      } else {
        static_cast<T*>(out)[(b * C + c) * HW + yx] = v;
      }
    }
    if (kArgmax) static_cast<int64_t*>(out)[pix] = arg;
  }
}

// Threads per block such that every thread's taps fit in 48 KiB of shared memory; 0 when
// not even a warp's do (the kernel then recomputes the weights per class).
inline int jbu_threads_for_shared(int taps, size_t elem) {
  for (int threads = 256; threads >= 32; threads /= 2) {
    if (static_cast<size_t>(taps) * (elem + sizeof(int)) * threads <= 48 * 1024) return threads;
  }
  return 0;
}

template <typename T, bool kArgmax>
cudaError_t launch_jbu_typed(const JbuParams& p, cudaStream_t stream) {
  const int taps = (2 * p.radius + 1) * (2 * p.radius + 1);
  const int threads = jbu_threads_for_shared(taps, sizeof(T));
  const int64_t total = p.B * p.H * p.W;
  const T* s = static_cast<const T*>(p.scores);
  const T* g = static_cast<const T*>(p.guide);
  const T* gd = static_cast<const T*>(p.gd);
  if (threads > 0) {
    const size_t shared = static_cast<size_t>(taps) * (sizeof(T) + sizeof(int)) * threads;
    jbu_kernel<T, true, kArgmax><<<grid_for(total, threads), threads, shared, stream>>>(
        s, g, gd, p.out, p.B, p.C, p.h, p.w, p.H, p.W, p.radius, p.ratio_y, p.ratio_x,
        static_cast<T>(p.inv_s), static_cast<T>(p.inv_r));
  } else {
    jbu_kernel<T, false, kArgmax><<<grid_for(total, 128), 128, 0, stream>>>(
        s, g, gd, p.out, p.B, p.C, p.h, p.w, p.H, p.W, p.radius, p.ratio_y, p.ratio_x,
        static_cast<T>(p.inv_s), static_cast<T>(p.inv_r));
  }
  return cudaGetLastError();
}

}  // namespace ovss_fast
