// Launchers of the CUDA kernels of LPOSS / LPOSS+ (docs/lposs.md; the spec: reference.pixel_propagation,
// label_propagation, propagation_cg). No torch headers: csrc/cuda/pixel_propagation.cpp and
// knn_propagation.cpp allocate every buffer and fill the structs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ovss_fast {

// rows (pixels, nodes) per block of each kernel that writes per-block partial sums
constexpr int kPixelMatvecRows = 128;  // pixel_propagation's stencil product: a thread per pixel
constexpr int kKnnMatvecRows = 4;      // knn_propagation's CSR product: a warp per node
constexpr int kCgUpdateRows = 256;     // the CG's x / r update

// The per-block partial sums (double) one column needs: the most blocks any of its kernels uses.
inline int64_t propagation_partial_blocks(int64_t n, int64_t matvec_rows) {
  const int64_t a = (n + matvec_rows - 1) / matvec_rows, b = (n + kCgUpdateRows - 1) / kCgUpdateRows;
  return a > b ? a : b;
}

// The batched CG's state, all on the device. A column is one class of one image; its vectors hold the
// column's n nodes contiguously ([ncols, n], the layout of scores [B, C, H, W] read as [B C, H W]).
struct PropagationCg {
  void* x;           // [ncols, n] zeros on entry, the solution on return
  void* r;           // [ncols, n] b on entry
  void* p;           // [ncols, n] b on entry
  void* q;           // [ncols, n] scratch: p - alpha S p
  double* partial;   // [ncols, propagation_partial_blocks(n, ...)] scratch
  double* scalars;   // [4, ncols] scratch: rho, atol, step, beta (values of the compute dtype)
  int* active;       // [ncols] scratch
  int* any;          // [iters + 1] zeros: any[t] != 0 while some column still runs at step t
  int64_t n, ncols, iters;
  double alpha, tol;
  bool is_double;    // the compute dtype of every T buffer (float32 otherwise)
};

struct PixelPropagationParams {
  const void* image;  // [B, 3, H, W] sRGB in [0, 1], compute dtype, contiguous
  void* lab;          // [B, 3, H W] scratch: scaled Lab planes
  void* s;            // [B, F, H W] scratch: the forward half of the stencil, F = 2 r (r + 1)
  void* inv;          // [B, H W] scratch: d^-1/2
  int64_t B, C, H, W, r;
  double tau;
  PropagationCg cg;   // ncols = B C, n = H W
};

struct KnnPropagationParams {
  const int64_t* crow;  // [N + 1] CSR row starts of W + W^T (diagonal removed)
  const int64_t* row;   // [nnz] each entry's row
  const int64_t* col;   // [nnz] each entry's column
  void* val;            // [nnz] w on entry, s = w d_i^-1/2 d_j^-1/2 after
  void* inv;            // [N] scratch: d^-1/2
  int64_t nnz;
  PropagationCg cg;     // ncols = C, n = N
};

cudaError_t launch_pixel_propagation(const PixelPropagationParams& p, cudaStream_t stream);
cudaError_t launch_knn_propagation(const KnnPropagationParams& p, cudaStream_t stream);

}  // namespace ovss_fast
