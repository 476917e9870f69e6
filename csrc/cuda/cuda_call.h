// What every CUDA wrapper (csrc/cuda/*.cpp) does around its kernel launch, in one place: the device
// check of the leading input, the device guard, the current stream, byte scratch, and the check of the
// launch's error code with a message naming the op and its inputs. Host only: includes torch headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/checks.h"

namespace ovss_fast {

// Checks that `lead` (the argument `name`) is a CUDA tensor, makes its device current and returns
// body(stream) run on that device's current stream.
template <typename Body>
auto on_cuda(const at::Tensor& lead, const char* name, Body&& body) {
  check_device(lead, name, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(lead.device());
  return body(c10::cuda::getCurrentCUDAStream(lead.device().index()).stream());
}

// Raises "<op> (CUDA): kernel launch failed: <error> (<what...>)" unless err is cudaSuccess.
template <typename... What>
void check_launch(cudaError_t err, const char* op, const What&... what) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err), " (", what...,
              ")");
}

// `bytes` of scratch on `like`'s device, kept alive by `holder`; nullptr when bytes == 0.
inline void* cuda_scratch(at::Tensor& holder, size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return nullptr;
  holder = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  return holder.mutable_data_ptr();
}

}  // namespace ovss_fast
