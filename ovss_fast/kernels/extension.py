"""The compiled backends "cpu" and "cuda": thin calls into ``torch.ops.ovss_fast``.

Importing this module imports :mod:`ovss_fast.kernels._C` (built by ``pip install
--no-build-isolation -e .``); when that fails the ImportError propagates and the
registry in :mod:`ovss_fast.kernels.dispatch` marks both backends unavailable with its
message. The op schemas live in ``csrc/ops.cpp``; each kernel registers itself for
the CPU or CUDA dispatch key, and :meth:`ExtensionBackend.unsupported_reasons`
asks the dispatcher whether the kernel exists, so an op without a kernel for a
device falls back cleanly instead of failing at call time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ovss_fast.kernels import (
    _C,  # noqa: F401  (loads the library; its static initialisers register the ops)
    fake,  # noqa: F401  (register_fake for torch.compile)
    propagation,
)
from ovss_fast.kernels.common import EPS, ITERS, RADIUS, SIGMA_RANGE, SIGMA_SPATIAL, SK_ITERS, STEPS, TAU
from ovss_fast.kernels.dispatch import OPS, Backend

#: dtypes the kernels take (half and bfloat16 are computed in float32 by the C++ wrappers)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: (op, device type) -> the compiled kernel the op needs there; None: PyTorch ops only. label_propagation's
#: kNN is the compiled knn_edges on the CPU (csrc/cpu/knn_edges.cpp, built with knn_propagation), a blocked
#: matmul + top-k in PyTorch elsewhere; the graph and CG are the compiled knn_propagation
#: (csrc/cpu/knn_propagation.cpp, csrc/cuda/knn_propagation*; kernels/propagation.py)
KERNEL_FOR = {("label_propagation", "cpu"): "knn_edges", ("label_propagation", "cuda"): "knn_propagation"}
#: the JBU kernels take at most this radius ((2r+1)^2 taps per pixel; csrc/common/jbu_prepare.h)
MAX_JBU_RADIUS = 64


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``ovss_fast::<op>`` has a kernel registered for ``dispatch_key`` ("CPU" or "CUDA")."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"ovss_fast::{op}", dispatch_key))
    except RuntimeError:  # schema not registered at all
        return False


class ExtensionBackend(Backend):
    """One device type of the compiled extension; every op calls ``torch.ops.ovss_fast.<op>``."""

    #: class_distributions applies nms_axis "patches" itself (in the CPU kernel; as the exact post-pass on Q in
    #: the CUDA wrapper, csrc/common/class_distributions_checks.h)
    takes_nms_axis = True

    def __init__(self, name: str, device_type: str, dispatch_key: str) -> None:
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key

    def unsupported_reasons(self, op: str, tensors: Sequence[Tensor], params: Mapping[str, Any]) -> list[str]:
        reasons = []
        if op not in OPS:
            return [f"{self.name} backend has no op {op!r}"]
        if self.device_type == "cuda" and not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        elif (kernel := KERNEL_FOR.get((op, self.device_type), op)) and not has_kernel(kernel, self.dispatch_key):
            what = "this build has no CUDA kernels" if self.device_type == "cuda" else "not compiled in"
            reasons.append(f"{self.name} backend has no kernel for {op} ({what})")
        for i, t in enumerate(tensors):
            if t.device.type != self.device_type:
                reasons.append(f"{self.name} backend needs {self.device_type} tensors, input {i} is on {t.device}")
                break
        for i, t in enumerate(tensors):
            if t.dtype not in KERNEL_DTYPES:
                reasons.append(f"{self.name} backend does not take dtype {t.dtype} (input {i})")
                break
        if op.startswith("jbu_") and int(params.get("radius", 0)) > MAX_JBU_RADIUS:
            reasons.append(f"{self.name} backend takes radius <= {MAX_JBU_RADIUS}, got {params['radius']}")
        return reasons

    # method.md section 1
    def class_distributions(self, feats: Tensor, text: Tensor, *, scale: float = 100.0, nms: float = 0.0,
                            nms_axis: str = "classes") -> Tensor:
        """feats [B, N, D], text [C, D] -> Q [B, N, C]."""
        return torch.ops.ovss_fast.class_distributions(feats, text, float(scale), float(nms), str(nms_axis))

    # section 2
    def gibbs_kernel(self, affinity: Tensor, *, eps: float = EPS) -> tuple[Tensor, Tensor]:
        """affinity [B, N, N] -> (cost [B, N, N], kernel [B, N, N])."""
        cost, kernel = torch.ops.ovss_fast.gibbs_kernel(affinity, float(eps))
        return cost, kernel

    # section 3
    def kl_scores(self, q: Tensor) -> Tensor:
        """q [B, N, C] -> scores [B, N, C]."""
        return torch.ops.ovss_fast.kl_scores(q)

    def sinkhorn_scores(self, q: Tensor, kernel: Tensor, *, eps: float = EPS, iters: int = ITERS) -> Tensor:
        """q [B, N, C], kernel [B, N, N] -> scores [B, N, C]."""
        return torch.ops.ovss_fast.sinkhorn_scores(q, kernel, float(eps), int(iters))

    def markov_scores(
        self,
        q: Tensor,
        kernel: Tensor,
        *,
        sk_iters: int = SK_ITERS,
        steps: int = STEPS,
        readout: str = "integrated",
        tau: float = TAU,
    ) -> Tensor:
        """q [B, N, C], kernel [B, N, N] -> scores [B, N, C]."""
        return torch.ops.ovss_fast.markov_scores(q, kernel, int(sk_iters), int(steps), str(readout), float(tau))

    # section 4
    def jbu_upsample(
        self, scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL, sigma_range: float = SIGMA_RANGE,
        radius: int = RADIUS,
    ) -> Tensor:
        """scores [B, C, h, w], guide [B, 3, H, W] -> [B, C, H, W]."""
        return torch.ops.ovss_fast.jbu_upsample(scores, guide, float(sigma_spatial), float(sigma_range), int(radius))

    def jbu_argmax(
        self, scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL, sigma_range: float = SIGMA_RANGE,
        radius: int = RADIUS,
    ) -> Tensor:
        """scores [B, C, h, w], guide [B, 3, H, W] -> labels [B, H, W] int64."""
        return torch.ops.ovss_fast.jbu_argmax(scores, guide, float(sigma_spatial), float(sigma_range), int(radius))

    # refiners: LPOSS / LPOSS+
    def label_propagation(self, scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400,
                          gamma: float = 3.0, sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95,
                          iters: int = 10, tol: float = 1e-6) -> Tensor:
        """scores [B, N, C], feats [B, N, D], positions [B, N, 2] -> [B, N, C] (:mod:`.propagation`)."""
        return propagation.label_propagation(scores, feats, positions, k=k, gamma=gamma, sigma=sigma,
                                             dist_pow=dist_pow, alpha=alpha, iters=iters, tol=tol)

    def pixel_propagation(self, scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01,
                          alpha: float = 0.95, iters: int = 10, tol: float = 1e-6) -> Tensor:
        """scores [B, C, H, W], image [B, 3, H, W] -> [B, C, H, W] (the stencil CG in C++ / CUDA)."""
        return torch.ops.ovss_fast.pixel_propagation(scores, image, int(radius), float(tau), float(alpha),
                                                     int(iters), float(tol))

    # refiners
    def pamr(self, scores: Tensor, image: Tensor, *, iters: int = 10, dilations: Sequence[int] = (8, 16)) -> Tensor:
        """scores [B, C, h, w], image [B, K, H, W] -> [B, C, H, W] (csrc/cpu/pamr.cpp, csrc/cuda/pamr.cpp)."""
        return torch.ops.ovss_fast.pamr(scores, image, int(iters), [int(d) for d in dilations])


CPU_BACKEND = ExtensionBackend("cpu", "cpu", "CPU")
CUDA_BACKEND = ExtensionBackend("cuda", "cuda", "CUDA")
