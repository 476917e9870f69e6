// LPOSS+'s pixel stage on CUDA (docs/lposs.md; the spec: reference.pixel_graph and pixel_propagation; the CPU
// twin: cpu/pixel_propagation.cpp, which shares common/propagation_math.h): per image and class, x solves
// (I - alpha S) x = y0 by conjugate gradient from 0, S = D^-1/2 W D^-1/2, w_ij = exp(-||lab_i - lab_j|| / tau)
// for j in the (2r+1)^2 square around i (not i; inside the image).
// S is held as its forward half only, s [F, H W] per image, F = 2 r (r + 1) offsets (dy > 0, or dy = 0 and
// dx > 0), slot f = dy (2r+1) + dx - 1, pixel-major so a warp's loads are contiguous: s_ij = s_ji, so pixel
// i's backward neighbour j = i - o reads slot f of pixel j. Three kernels build it once (Lab; weights and
// degrees, the degree summed over the square in the CPU's slot order; the d^-1/2 scaling), then the batched CG
// (cuda/propagation_cg.cuh) over all B C columns at once, whose product is the stencil kernel below: a thread
// per pixel and kClassGroup classes, one weight load serving them all.

#include <cuda_runtime.h>

#include "../common/propagation_math.h"
#include "propagation_cg.cuh"
#include "propagation_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

constexpr int kClassGroup = 8;
constexpr int kThreads = 256;

// lab [B, 3, HW]: scaled Lab of every pixel
template <typename T>
__global__ void lab_kernel(const T* __restrict__ image, T* __restrict__ lab, int64_t B, int64_t HW) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < B * HW;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / HW, i = k % HW;
    const T* im = image + b * 3 * HW + i;
    T px[3];
    scaled_lab(im[0], im[HW], im[2 * HW], px);
    T* out = lab + b * 3 * HW + i;
    out[0] = px[0];
    out[HW] = px[1];
    out[2 * HW] = px[2];
  }
}

// the forward weights s [B, F, HW] (0 where the neighbour is off the image) and inv = d^-1/2 [B, HW], the
// degree summed over the whole square row by row (the CPU's slot order, so both round it alike)
template <typename T>
__global__ void weights_kernel(const T* __restrict__ lab, T* __restrict__ s, T* __restrict__ inv, int64_t B,
                               int64_t H, int64_t W, int r, T inv_tau) {
  const int64_t HW = H * W, F = 2 * r * (r + 1);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < B * HW;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / HW, i = k % HW, y = i / W, x = i % W;
    const T* L = lab + b * 3 * HW;
    const T l0 = L[i], l1 = L[HW + i], l2 = L[2 * HW + i];
    T* sb = s + b * F * HW + i;
    T degree = 0;
    for (int dy = -r; dy <= r; ++dy) {
      for (int dx = -r; dx <= r; ++dx) {
        if (dy == 0 && dx == 0) continue;
        const int64_t yy = y + dy, xx = x + dx;
        const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < W;
        T w = 0;
        if (inside) {
          const int64_t j = yy * W + xx;
          w = pixel_edge_weight(l0 - L[j], l1 - L[HW + j], l2 - L[2 * HW + j], inv_tau);
          degree += w;
        }
        if (dy > 0 || (dy == 0 && dx > 0)) sb[(dy * (2 * r + 1) + dx - 1) * HW] = w;
      }
    }
    inv[b * HW + i] = inverse_sqrt_degree(degree);
  }
}

// s_ij = w_ij d_i^-1/2 d_j^-1/2 over the forward half
template <typename T>
__global__ void normalise_kernel(T* __restrict__ s, const T* __restrict__ inv, int64_t B, int64_t H, int64_t W,
                                 int r) {
  const int64_t HW = H * W, F = 2 * r * (r + 1);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < B * HW;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / HW, i = k % HW, y = i / W, x = i % W;
    const T* ib = inv + b * HW;
    T* sb = s + b * F * HW + i;
    for (int dy = 0; dy <= r; ++dy) {
      for (int dx = dy == 0 ? 1 : -r; dx <= r; ++dx) {
        const int64_t yy = y + dy, xx = x + dx;
        if (yy < H && xx >= 0 && xx < W) sb[(dy * (2 * r + 1) + dx - 1) * HW] *= ib[i] * ib[yy * W + xx];
      }
    }
  }
}

// q = p - alpha S p for kClassGroup columns of one image and kPixelMatvecRows pixels, and the block's
// p . q per column into partial [B C, gridDim.x]; grid (pixel blocks, class groups, B)
template <typename T>
__global__ void __launch_bounds__(kPixelMatvecRows)
    stencil_matvec_kernel(const T* __restrict__ s, const T* __restrict__ p, T* __restrict__ q,
                          double* __restrict__ partial, int64_t C, int64_t H, int64_t W, int r, T alpha,
                          const int* __restrict__ any_now) {
  if (*any_now == 0) return;
  __shared__ double shared[32];
  const int64_t HW = H * W, F = 2 * r * (r + 1), b = blockIdx.z, c0 = blockIdx.y * kClassGroup;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kPixelMatvecRows) + threadIdx.x;
  const bool live = i < HW;
  const int64_t y = live ? i / W : 0, x = live ? i % W : 0;
  const T* sb = s + b * F * HW;
  const T* pb = p + (b * C + c0) * HW;
  const int groups = C - c0 < kClassGroup ? static_cast<int>(C - c0) : kClassGroup;
  T acc[kClassGroup];
#pragma unroll
  for (int g = 0; g < kClassGroup; ++g) acc[g] = 0;
  if (live) {
    for (int dy = 0; dy <= r; ++dy) {
      for (int dx = dy == 0 ? 1 : -r; dx <= r; ++dx) {
        const int64_t f = dy * (2 * r + 1) + dx - 1, o = dy * W + dx;
        if (y + dy < H && x + dx >= 0 && x + dx < W) {  // forward neighbour i + o: pixel i's own slot
          const T w = sb[f * HW + i];
#pragma unroll
          for (int g = 0; g < kClassGroup; ++g)
            if (g < groups) acc[g] += w * pb[g * HW + i + o];
        }
        if (y - dy >= 0 && x - dx >= 0 && x - dx < W) {  // backward neighbour i - o: its forward slot
          const T w = sb[f * HW + i - o];
#pragma unroll
          for (int g = 0; g < kClassGroup; ++g)
            if (g < groups) acc[g] += w * pb[g * HW + i - o];
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kClassGroup; ++g) {
    double pq = 0;
    if (live && g < groups) {
      const T pi = pb[g * HW + i];
      const T qi = pi - alpha * acc[g];
      q[(b * C + c0 + g) * HW + i] = qi;
      pq = static_cast<double>(pi) * static_cast<double>(qi);
    }
    const double sum = block_reduce(pq, SumOp{}, shared);  // every thread of the block takes part
    if (threadIdx.x == 0 && g < groups) partial[(b * C + c0 + g) * gridDim.x + blockIdx.x] = sum;
  }
}

template <typename T>
cudaError_t launch(const PixelPropagationParams& p, cudaStream_t stream) {
  const int64_t HW = p.H * p.W;
  const int r = static_cast<int>(p.r);
  const T* image = static_cast<const T*>(p.image);
  T* lab = static_cast<T*>(p.lab);
  T* s = static_cast<T*>(p.s);
  T* inv = static_cast<T*>(p.inv);
  const unsigned int grid = grid_for(p.B * HW, kThreads);
  lab_kernel<T><<<grid, kThreads, 0, stream>>>(image, lab, p.B, HW);
  weights_kernel<T><<<grid, kThreads, 0, stream>>>(lab, s, inv, p.B, p.H, p.W, r, T(1) / static_cast<T>(p.tau));
  normalise_kernel<T><<<grid, kThreads, 0, stream>>>(s, inv, p.B, p.H, p.W, r);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 mgrid(static_cast<unsigned int>((HW + kPixelMatvecRows - 1) / kPixelMatvecRows),
                   static_cast<unsigned int>((p.C + kClassGroup - 1) / kClassGroup), static_cast<unsigned int>(p.B));
  const T alpha = static_cast<T>(p.cg.alpha);
  const T* pv = static_cast<const T*>(p.cg.p);
  T* qv = static_cast<T*>(p.cg.q);
  const auto matvec = [&](const int* any_now) -> int64_t {
    stencil_matvec_kernel<T><<<mgrid, kPixelMatvecRows, 0, stream>>>(s, pv, qv, p.cg.partial, p.C, p.H, p.W, r,
                                                                      alpha, any_now);
    return mgrid.x;
  };
  return cg::run<T>(p.cg, matvec, stream);
}

}  // namespace

cudaError_t launch_pixel_propagation(const PixelPropagationParams& p, cudaStream_t stream) {
  return p.cg.is_double ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace ovss_fast
