// Every ovss_fast op schema, declared once (shared/style.md). Kernels register
// themselves per dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp.
//
// Importing ovss_fast.kernels._C loads this shared library; its static initialisers run
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL, after which the ops live in torch.ops.ovss_fast.

#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

extern "C" {
// An empty module named _C: `import ovss_fast.kernels._C` exists only to load the library
// (pytorch/extension-cpp does the same; no pybind11, which would slow the build).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "ovss_fast compiled ops; use torch.ops.ovss_fast.<op> or the ovss_fast API",
      -1,       // no per-interpreter state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}

namespace {
// How many threads one at::parallel_for of ours runs on (the build's OpenMP check, tests/test_ext.py):
// 1 when the extension was compiled without the parallel backend torch uses.
int64_t intra_op_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64)); });
  return __builtin_popcountll(seen.load());
}
}  // namespace

TORCH_LIBRARY(ovss_fast, m) {
  // method.md section 1: feats [B, N, D], text [C, D] -> Q [B, N, C]; nms_axis "classes" or "patches"
  m.def("class_distributions(Tensor feats, Tensor text, float scale, float nms, str nms_axis=\"classes\") -> Tensor");
  // section 2: affinity [B, N, N] -> (cost [B, N, N], kernel [B, N, N])
  m.def("gibbs_kernel(Tensor affinity, float eps) -> (Tensor, Tensor)");
  // section 3, kl: q [B, N, C] -> scores [B, N, C]
  m.def("kl_scores(Tensor q) -> Tensor");
  // section 3, op: q [B, N, C], kernel [B, N, N] -> scores [B, N, C]
  m.def("sinkhorn_scores(Tensor q, Tensor kernel, float eps, int iters) -> Tensor");
  // section 3, mv: q [B, N, C], kernel [B, N, N] -> scores [B, N, C]
  m.def("markov_scores(Tensor q, Tensor kernel, int sk_iters, int steps, str readout, float tau) -> Tensor");
  // section 4: scores [B, C, h, w], guide [B, 3, H, W] -> [B, C, H, W]
  m.def("jbu_upsample(Tensor scores, Tensor guide, float sigma_spatial, float sigma_range, int radius) -> Tensor");
  // section 4, fused: scores [B, C, h, w], guide [B, 3, H, W] -> labels [B, H, W] int64
  m.def("jbu_argmax(Tensor scores, Tensor guide, float sigma_spatial, float sigma_range, int radius) -> Tensor");
  // LPOSS+ pixel stage: scores [B, C, H, W], image [B, 3, H, W] sRGB in [0, 1] -> [B, C, H, W]
  m.def("pixel_propagation(Tensor scores, Tensor image, int radius, float tau, float alpha, int iters, float tol) "
        "-> Tensor");
  // LPOSS patch stage after the kNN: index [N, k], weights [N, k], b [N, C] -> x [N, C]
  m.def("knn_propagation(Tensor index, Tensor weights, Tensor b, float alpha, int iters, float tol) -> Tensor");
  // LPOSS patch-stage kNN + edge weights (CPU): feats [N, D] L2-normalised, positions [N, 2]
  // -> (index [N, min(k, N)] int64, weights [N, min(k, N)])
  m.def("knn_edges(Tensor feats, Tensor positions, int k, float gamma, float sigma, float dist_pow) "
        "-> (Tensor, Tensor)");

  // refiners, PAMR (Araslanov and Roth 2020; common/pamr_math.h): scores [B, C, h, w], image [B, K, H, W]
  // -> [B, C, H, W], the scores resized to H x W (bilinear, align_corners) then refined `iters` times
  m.def("pamr(Tensor scores, Tensor image, int iters, int[] dilations) -> Tensor");
  // diagnostics: the threads one at::parallel_for of the extension uses
  m.def("_intra_op_threads() -> int", &intra_op_threads);
}
