// Input checks for the C++ wrappers (CPU and CUDA): TORCH_CHECK messages that name
// the argument and the shape seen (method.md section 5). Host-only: never include
// this from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace ovss_fast {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

// "feats should be a 3D tensor [B, N, D], got 2D with shape [4, 8]"
inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.dim() == rank, name, " should be a ", rank, "D tensor ", layout, ", got ", t.dim(),
              "D with shape ", shape_str(t));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " has unsupported dtype ", s, "; expected float16, bfloat16, float32 or float64");
}

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, name, " should be on ", c10::DeviceTypeName(type, true),
              ", got a tensor on ", t.device());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "all inputs must be on one device, got ", an, " on ", a.device(),
              " and ", bn, " on ", b.device());
}

// method.md: float64 if any input is float64, else float32 (half / bfloat16 are computed in float32)
inline at::ScalarType compute_dtype(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// the input in the compute dtype, contiguous (a no-op when it already is both)
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

}  // namespace ovss_fast
