// Argument checks of the two LPOSS propagation ops (docs/lposs.md), for any device's wrapper: the messages
// name the argument and the shape seen. Host only: never include from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace ovss_fast {

// alpha in [0, 1) keeps I - alpha S positive definite
inline void check_propagation_cg_args(double alpha, int64_t iters, double tol) {
  TORCH_CHECK(alpha >= 0 && alpha < 1, "alpha should be in [0, 1), got ", alpha);
  TORCH_CHECK(iters >= 0, "iters should be >= 0, got ", iters);
  TORCH_CHECK(tol >= 0, "tol should be >= 0, got ", tol);
}

// pixel_propagation: scores [B, C, H, W], image [B, 3, H, W] on `device`
inline void check_pixel_propagation_args(const at::Tensor& scores, const at::Tensor& image, int64_t radius,
                                         double tau, double alpha, int64_t iters, double tol,
                                         c10::DeviceType device) {
  check_rank(scores, "scores", 4, "[B, C, H, W]");
  check_rank(image, "image", 4, "[B, 3, H, W]");
  check_floating(scores, "scores");
  check_floating(image, "image");
  check_device(scores, "scores", device);
  check_same_device(scores, "scores", image, "image");
  const int64_t B = scores.size(0), H = scores.size(2), W = scores.size(3);
  TORCH_CHECK(image.size(0) == B && image.size(1) == 3 && image.size(2) == H && image.size(3) == W,
              "image should be [B, 3, H, W] = [", B, ", 3, ", H, ", ", W, "] to match scores, got ", shape_str(image));
  TORCH_CHECK(radius >= 1 && radius <= 64, "radius should be in [1, 64], got ", radius);
  TORCH_CHECK(tau > 0, "tau should be > 0, got ", tau);
  check_propagation_cg_args(alpha, iters, tol);
}

// knn_propagation: index [N, k] int64 in [0, N), weights [N, k], b [N, C] on `device` (the range check syncs)
inline void check_knn_propagation_args(const at::Tensor& index, const at::Tensor& weights, const at::Tensor& b,
                                       double alpha, int64_t iters, double tol, c10::DeviceType device) {
  check_rank(b, "b", 2, "[N, C]");
  check_rank(weights, "weights", 2, "[N, k]");
  check_rank(index, "index", 2, "[N, k]");
  check_floating(b, "b");
  check_floating(weights, "weights");
  check_device(b, "b", device);
  check_same_device(b, "b", index, "index");
  check_same_device(b, "b", weights, "weights");
  const int64_t N = b.size(0);
  TORCH_CHECK(index.scalar_type() == at::kLong, "index should be int64, got ", index.scalar_type());
  TORCH_CHECK(index.size(0) == N && weights.sizes() == index.sizes(), "index and weights should be [N, k] with N = ",
              N, ", got ", shape_str(index), " and ", shape_str(weights));
  check_propagation_cg_args(alpha, iters, tol);
  if (index.numel() > 0) {
    TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < N, "index should lie in [0, ", N,
                ")");
  }
}

}  // namespace ovss_fast
