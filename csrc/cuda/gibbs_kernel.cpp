// CUDA wrapper of gibbs_kernel (method.md section 2): checks, dtype and layout,
// allocation, launches on the current stream (csrc/cuda/gibbs_kernel_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "cuda/gibbs_kernel_kernel.h"

namespace ovss_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> gibbs_kernel_cuda(const at::Tensor& affinity,  // [B, N, N]
                                                     double eps) {
  check_rank(affinity, "affinity", 3, "[B, N, N]");
  check_floating(affinity, "affinity");
  check_device(affinity, "affinity", c10::DeviceType::CUDA);
  TORCH_CHECK(affinity.size(1) == affinity.size(2), "affinity must be square [B, N, N], got shape ",
              shape_str(affinity));
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const c10::cuda::CUDAGuard guard(affinity.device());
  const auto dt = compute_dtype(affinity);
  const at::Tensor a = prepare(affinity, dt);
  at::Tensor cost = at::empty(a.sizes(), a.options());
  at::Tensor kern = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return {cost, kern};
  at::Tensor minmax = at::empty({a.size(0), 2}, a.options().dtype(at::kLong));
  GibbsKernelParams p{};
  p.affinity = a.const_data_ptr();
  p.cost = cost.mutable_data_ptr();
  p.kernel = kern.mutable_data_ptr();
  p.minmax = reinterpret_cast<long long*>(minmax.mutable_data_ptr<int64_t>());
  p.B = a.size(0);
  p.N = a.size(1);
  p.eps = eps;
  p.is_double = dt == at::kDouble;
  const cudaError_t err = launch_gibbs_kernel(p, c10::cuda::getCurrentCUDAStream(affinity.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "gibbs_kernel (CUDA): kernel launch failed: ", cudaGetErrorString(err),
              " (affinity ", shape_str(affinity), ")");
  return {cost, kern};
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("gibbs_kernel", &gibbs_kernel_cuda); }

}  // namespace ovss_fast
