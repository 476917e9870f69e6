// CUDA wrapper of gibbs_kernel (method.md section 2): checks, dtype and layout,
// allocation, launches on the current stream (csrc/cuda/gibbs_kernel_kernel.cu).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common/gibbs_kernel_checks.h"
#include "cuda/cuda_call.h"
#include "cuda/gibbs_kernel_kernel.h"

namespace ovss_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> gibbs_kernel_cuda(const at::Tensor& affinity,  // [B, N, N]
                                                     double eps) {
  check_gibbs_kernel_args(affinity, eps, c10::DeviceType::CUDA);
  return on_cuda(affinity, "affinity", [&](cudaStream_t stream) -> std::tuple<at::Tensor, at::Tensor> {
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
    check_launch(launch_gibbs_kernel(p, stream), "gibbs_kernel", "affinity ", shape_str(affinity));
    return {cost, kern};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ovss_fast, CUDA, m) { m.impl("gibbs_kernel", &gibbs_kernel_cuda); }

}  // namespace ovss_fast
