// method.md section 1 on CUDA: Q[b, :, c] = column-normalised (NMS'd) softmax over
// classes of scale * cos(feats, text). Four launches on one stream:
//   1. unit text, transposed to [D, C] so the per-class dot products read it coalesced;
//   2. one block per patch: its feature row in shared memory, norm, C logits, softmax
//      and NMS with block reductions, P written to the output;
//   3. one thread per (b, c): column sums over patches (coalesced over c);
//   4. one thread per element: the column normalisation.
// Nothing larger than [B, N, C] is allocated. Math: common/class_distributions_math.h.

#include <cuda_runtime.h>

#include "../common/class_distributions_math.h"
#include "class_distributions_kernel.h"
#include "reduce.cuh"

namespace ovss_fast {
namespace {

constexpr int kRowThreads = 128;

template <typename T>
__global__ void unit_text_kernel(const T* __restrict__ text,  // [C, D]
                                 T* __restrict__ unit_t,      // [D, C]
                                 int64_t C, int64_t D) {
  __shared__ T red[32];
  const int64_t c = blockIdx.x;
  const T* t = text + c * D;
  T m = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) m = fabs(t[d]) > m ? fabs(t[d]) : m;
  const T sc = norm_scale(block_reduce(m, MaxOp(), red));
  T ss = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += (t[d] / sc) * (t[d] / sc);
  const T nrm = feature_norm(block_reduce(ss, SumOp(), red));
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) unit_t[d * C + c] = (t[d] / sc) / nrm;
}

template <typename T>
__global__ void patch_softmax_kernel(const T* __restrict__ feats,   // [B, N, D]
                                     const T* __restrict__ unit_t,  // [D, C]
                                     T* __restrict__ out,           // [B, N, C]
                                     int64_t rows, int64_t C, int64_t D, T scale, T nms) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [D]
  T* ls = xs + D;                          // [C]
  __shared__ T red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = feats + r * D;
    T m = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const T v = x[d];
      xs[d] = v;
      m = fabs(v) > m ? fabs(v) : m;
    }
    const T sc = norm_scale(block_reduce(m, MaxOp(), red));  // also publishes xs
    T ss = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += (xs[d] / sc) * (xs[d] / sc);
    const T xn = feature_norm(block_reduce(ss, SumOp(), red));
    T lmax = neg_inf<T>();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += xs[d] * unit_t[d * C + c];
      const T l = class_logit(dot, sc, xn, scale);
      ls[c] = l;
      lmax = l > lmax ? l : lmax;
    }
    lmax = block_reduce(lmax, MaxOp(), red);
    T sum = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const T e = softmax_numerator(ls[c], lmax);
      ls[c] = e;
      sum += e;
    }
    sum = block_reduce(sum, SumOp(), red);
    T pmax = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const T p = ls[c] / sum;
      ls[c] = p;
      pmax = p > pmax ? p : pmax;
    }
    pmax = block_reduce(pmax, MaxOp(), red);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      out[r * C + c] = nms > T(0) ? nms_keep(ls[c], pmax, nms) : ls[c];
    }
    __syncthreads();  // xs and ls are rewritten by the next row
  }
}

template <typename T>
__global__ void column_sum_kernel(const T* __restrict__ p,  // [B, N, C]
                                  T* __restrict__ colsum,   // [B, C]
                                  int64_t B, int64_t N, int64_t C) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < B * C;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / C, c = k % C;
    T s = 0;
    for (int64_t i = 0; i < N; ++i) s += p[(b * N + i) * C + c];
    colsum[k] = s;
  }
}

template <typename T>
__global__ void normalise_kernel(T* __restrict__ out,             // [B, N, C]
                                 const T* __restrict__ colsum,    // [B, C]
                                 int64_t total, int64_t N, int64_t C) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = k % C, b = k / (N * C);
    out[k] = normalise_column(out[k], colsum[b * C + c]);
  }
}

template <typename T>
cudaError_t launch(const ClassDistributionsParams& p, cudaStream_t stream) {
  T* unit_t = static_cast<T*>(p.scratch);  // [D, C]
  T* colsum = unit_t + p.D * p.C;          // [B, C]
  T* out = static_cast<T*>(p.out);
  if (p.D > 0) {
    unit_text_kernel<T><<<static_cast<unsigned int>(p.C), kRowThreads, 0, stream>>>(static_cast<const T*>(p.text),
                                                                                     unit_t, p.C, p.D);
  }
  const int64_t rows = p.B * p.N;
  const size_t shared = class_distributions_shared_bytes(p);
  if (shared > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(patch_softmax_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  patch_softmax_kernel<T><<<grid_for(rows, 1), kRowThreads, shared, stream>>>(
      static_cast<const T*>(p.feats), unit_t, out, rows, p.C, p.D, static_cast<T>(p.scale), static_cast<T>(p.nms));
  constexpr int kThreads = 256;
  column_sum_kernel<T><<<grid_for(p.B * p.C, kThreads), kThreads, 0, stream>>>(out, colsum, p.B, p.N, p.C);
  const int64_t total = rows * p.C;
  normalise_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(out, colsum, total, p.N, p.C);
  return cudaGetLastError();
}

}  // namespace

size_t class_distributions_scratch_bytes(const ClassDistributionsParams& p) {
  const size_t elem = p.is_double ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(p.D * p.C + p.B * p.C) * elem;
}

size_t class_distributions_shared_bytes(const ClassDistributionsParams& p) {
  const size_t elem = p.is_double ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(p.D + p.C) * elem;
}

cudaError_t launch_class_distributions(const ClassDistributionsParams& p, cudaStream_t stream) {
  return p.is_double ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace ovss_fast
