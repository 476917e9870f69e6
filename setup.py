"""Build script for ovss_fast and its C++/CUDA extension ``ovss_fast.kernels._C``.

Layout follows the pytorch/extension-cpp skeleton: every ``csrc/**/*.cpp`` is
compiled, plus every ``csrc/**/*.cu`` when building CUDA. The extension registers
its ops with ``TORCH_LIBRARY(ovss_fast, ...)``; importing ``ovss_fast.kernels._C`` loads
the library (a tiny ``PyInit__C`` stub in csrc/ops.cpp, no pybind11).

CUDA is built when a CUDA toolkit (``CUDA_HOME`` or ``nvcc`` on PATH) and a CUDA
build of torch are both present. Overrides:

    OVSS_FAST_FORCE_CUDA=1   build the CUDA sources regardless
    OVSS_FAST_FORCE_CPU=1    CPU-only (csrc/cuda/ is skipped entirely)
    TORCH_CUDA_ARCH_LIST     default "8.0;9.0+PTX" when unset
    MAX_JOBS                 parallel compile jobs (ninja)

Install: ``pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_cuda_home() -> None:
    # torch.utils.cpp_extension reads CUDA_HOME at import time, so set it before importing it
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _ext_modules() -> tuple[list, dict]:
    _default_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cpu = _flag("OVSS_FAST_FORCE_CPU")
    force_cuda = _flag("OVSS_FAST_FORCE_CUDA")
    if force_cpu and force_cuda:
        raise RuntimeError("set at most one of OVSS_FAST_FORCE_CPU and OVSS_FAST_FORCE_CUDA")
    toolkit = CUDA_HOME if CUDA_HOME else shutil.which("nvcc")
    torch_cuda = torch.version.cuda
    if force_cpu:
        use_cuda, why = False, "OVSS_FAST_FORCE_CPU=1"
    elif force_cuda:
        use_cuda, why = True, "OVSS_FAST_FORCE_CUDA=1"
    elif not toolkit:
        use_cuda, why = False, "no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)"
    elif not torch_cuda:
        use_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    else:
        use_cuda, why = True, "CUDA toolkit and CUDA torch found"

    # csrc/cuda/*.cpp include c10/cuda headers: they belong to CUDA builds only
    cpp = [s for s in _sources("csrc/**/*.cpp") if use_cuda or not s.startswith(os.path.join("csrc", "cuda") + os.sep)]
    cu = _sources("csrc/**/*.cu") if use_cuda else []
    # no contraction into FMA: CPU and CUDA kernels round the shared csrc/common math the same way;
    # -fno-trapping-math lets selects of computed values vectorise (values unchanged, FP traps unused)
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    # at::parallel_for (ATen/Parallel-inl.h) is inline: built without OpenMP it runs every
    # range on the calling thread. torch's Linux wheels use OpenMP (libgomp.so.1, which the
    # loader shares with torch's own copy), so our CPU kernels need -fopenmp to use its threads.
    link_args = []
    if sys.platform.startswith("linux") and torch.__config__.parallel_info().find("backend: OpenMP") >= 0:
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    define_macros = []  # Py_LIMITED_API comes from py_limited_api=True
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # without a visible GPU torch's own default is empty and the build fails
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        ext_cls = CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]}
        define_macros.append(("OVSS_FAST_WITH_CUDA", None))
    else:
        ext_cls = CppExtension
        extra = {"cxx": cxx_flags}

    print("ovss_fast build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch_cuda or 'none'})")
    print(f"  CUDA toolkit: {toolkit or 'not found'}")
    print(f"  CUDA kernels: {'yes' if use_cuda else 'no'} ({why})")
    if use_cuda:
        print(f"  TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    print(f"  OpenMP (at::parallel_for threads): {'yes' if link_args else 'no'}")
    print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")
    print(f"  sources: {len(cpp)} .cpp, {len(cu)} .cu")

    ext = ext_cls(
        "ovss_fast.kernels._C",
        cpp + cu,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=link_args,
        define_macros=define_macros,
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
