"""The Triton backend: ``backend="triton"``.

``TRITON_BACKEND`` runs the eight ops of :mod:`ovss_fast.kernels.reference` as Triton kernels, one
module per op (``class_distributions``, ``gibbs_kernel``, ``kl_scores``, ``sinkhorn_scores``,
``markov_scores``, ``jbu``), PAMR (``pamr``) and LPOSS / LPOSS+ (``propagation``: ``label_propagation``,
``pixel_propagation``). Importing this package never imports triton; the kernel modules
are imported on the first call, so ``import ovss_fast.kernels.triton`` works without triton and the
backend then reports "triton is not installed".

Tensors must be on a CUDA device, unless ``TRITON_INTERPRET=1`` was set before triton was
first imported: then the Triton interpreter runs the kernels on CPU tensors (slowly; with
that variable set, ``backend="auto"`` may pick this backend for CPU tensors, since it comes
before "cpu" in the auto order). Inputs are float16, bfloat16 or float32 and the kernels
compute in float32; float64 inputs are declined so that ``auto`` falls through to a backend
that computes in float64 (PAMR computes its affinities in float64 and stores them as float32).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ovss_fast.kernels.common import EPS, ITERS, RADIUS, SIGMA_RANGE, SIGMA_SPATIAL, SK_ITERS, STEPS, TAU
from ovss_fast.kernels.dispatch import Backend
from ovss_fast.kernels.triton._runtime import (
    GRAPHS,
    MAX_CLASSES,
    TritonOptions,
    interpret_requested,
    interpreting,
    resolve,
)

#: the most image channels the PAMR affinity kernel holds per pixel (BLOCK_K = next_pow2(K) in registers)
MAX_PAMR_CHANNELS = 64

_CPU_REASON = ("CPU tensors: Triton runs on CUDA (set TRITON_INTERPRET=1 before importing triton and pass "
               "backend='triton' to use the interpreter)")


def _triton_missing() -> bool:
    """True when triton cannot be found. Deliberately not an import: importing triton.language fixes,
    for the whole process, whether kernels compile or run in the interpreter (TRITON_INTERPRET)."""
    try:
        return importlib.util.find_spec("triton") is None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["triton"] = None
        return True


class TritonBackend(Backend):
    """Triton kernels for every op (float32 compute)."""

    name = "triton"
    #: sinkhorn_scores / markov_scores take ``symmetric=True`` (ops.discrepancy passes it for gibbs_kernel's K)
    takes_symmetric_kernel = True
    #: the keyword options its ops take (ops.discrepancy's ``backend_options``): TritonOptions' fields
    options = ("schedule", "precision", "gibbs", "graphs")

    def unsupported_reasons(self, op: str, tensors: Sequence[Tensor], params: Mapping[str, Any]) -> list[str]:
        if _triton_missing():
            return ["triton is not installed"]
        if not callable(getattr(type(self), op, None)):
            return [f"triton backend has no op {op!r}"]
        reasons = []
        if any(t.dtype == torch.float64 for t in tensors):
            reasons.append("float64: the Triton kernels compute in float32; use backend='cuda' or 'reference'")
        devices = {t.device.type for t in tensors}
        if devices - {"cuda", "cpu"}:
            reasons.append(f"{', '.join(sorted(devices - {'cuda', 'cpu'}))} tensors: Triton runs on CUDA")
        elif "cpu" in devices and not interpreting():
            if interpret_requested():
                reasons.append("CPU tensors: TRITON_INTERPRET=1 is set, but triton was imported without it earlier "
                               "in this process, so its kernels compile for CUDA")
            else:
                reasons.append(_CPU_REASON)
        elif devices == {"cuda"} and not torch.cuda.is_available():
            reasons.append("CUDA tensors but torch.cuda.is_available() is False")
        if op == "class_distributions" and len(tensors) > 1 and tensors[1].shape[0] > MAX_CLASSES:
            reasons.append(f"class_distributions holds at most {MAX_CLASSES} classes per program, "
                           f"got C = {tensors[1].shape[0]}")
        if op == "pamr" and len(tensors) > 1 and tensors[1].shape[1] > MAX_PAMR_CHANNELS:
            reasons.append(f"pamr holds at most {MAX_PAMR_CHANNELS} image channels per program, "
                           f"got K = {tensors[1].shape[1]}")
        if op == "pixel_propagation" and len(tensors) > 1:
            r = int(params.get("radius", 6))
            if 2 * r * (r + 1) * tensors[1].shape[-2] * tensors[1].shape[-1] >= 2**31:
                reasons.append("pixel_propagation indexes an image's stencil (2 r (r + 1) H W weights) in int32, "
                               f"too few for radius {r} at {tensors[1].shape[-2]} x {tensors[1].shape[-1]}")
        if op == "markov_scores" and params.get("readout", "integrated") not in ("integrated", "velocity"):
            reasons.append(f"unknown readout {params.get('readout')!r}")
        return reasons

    # ------------------------------------------------------------------ ops (reference signatures)
    def class_distributions(self, feats: Tensor, text: Tensor, *, scale: float = 100.0, nms: float = 0.0) -> Tensor:
        """feats: [B, N, D]; text: [C, D] -> Q: [B, N, C] float32."""
        from ovss_fast.kernels.triton import class_distributions as mod

        return mod.class_distributions(feats, text, scale=scale, nms=nms)

    def gibbs_kernel(self, affinity: Tensor, *, eps: float = EPS) -> tuple[Tensor, Tensor]:
        """affinity: [B, N, N] -> (cost [B, N, N], kernel [B, N, N]) float32."""
        from ovss_fast.kernels.triton import gibbs_kernel as mod

        return mod.gibbs_kernel(affinity, eps=eps)

    def gibbs_kernel_only(self, affinity: Tensor, *, eps: float = EPS, gibbs: str | None = None) -> Tensor:
        """affinity: [B, N, N] -> kernel [B, N, N] float32. ``gibbs="fused"``: symmetric tiles, no cost
        written (gibbs_kernel.gibbs_kernel_only); "separate" (the default): gibbs_kernel's K. None: the
        default option (TritonOptions, from OVSS_FAST_TRITON_GIBBS read at import)."""
        from ovss_fast.kernels.triton import gibbs_kernel as mod

        if resolve(gibbs=gibbs).gibbs == "fused":
            return mod.gibbs_kernel_only(affinity, eps=eps)
        return super().gibbs_kernel_only(affinity, eps=eps)

    def kl_scores(self, q: Tensor) -> Tensor:
        """q: [B, N, C] -> [B, N, C] float32."""
        from ovss_fast.kernels.triton import kl_scores as mod

        return mod.kl_scores(q)

    def sinkhorn_scores(self, q: Tensor, kernel: Tensor, *, eps: float = EPS, iters: int = ITERS,
                        symmetric: bool = False, schedule: str | None = None, precision: str | None = None,
                        graphs: bool | None = None) -> Tensor:
        """q: [B, N, C]; kernel: [B, N, N] -> [B, N, C] float32. ``symmetric=True`` promises K = K^T.
        ``schedule`` (preferred), ``precision``, ``graphs``: the Triton options (TritonOptions; None keeps
        the default)."""
        from ovss_fast.kernels.triton import sinkhorn_scores as mod

        opts = resolve(schedule=schedule, precision=precision, graphs=graphs)
        params = (float(eps), int(iters), bool(symmetric), opts.schedule, opts.precision)
        return GRAPHS.run(lambda q, k: mod.sinkhorn_scores(q, k, eps=params[0], iters=params[1],
                                                           symmetric=params[2], options=opts),
                          "sinkhorn_scores", params, q, kernel, graphs=opts.graphs)

    def markov_scores(self, q: Tensor, kernel: Tensor, *, sk_iters: int = SK_ITERS, steps: int = STEPS,
                      readout: str = "integrated", tau: float = TAU, symmetric: bool = False,
                      schedule: str | None = None, precision: str | None = None,
                      graphs: bool | None = None) -> Tensor:
        """q: [B, N, C]; kernel: [B, N, N] -> [B, N, C] float32. ``symmetric=True`` promises K = K^T.
        ``schedule`` (preferred), ``precision``, ``graphs``: the Triton options (None keeps the default)."""
        from ovss_fast.kernels.triton import markov_scores as mod

        opts = resolve(schedule=schedule, precision=precision, graphs=graphs)
        params = (int(sk_iters), int(steps), str(readout), float(tau), bool(symmetric), opts.schedule,
                  opts.precision)
        return GRAPHS.run(lambda q, k: mod.markov_scores(q, k, sk_iters=params[0], steps=params[1],
                                                         readout=params[2], tau=params[3], symmetric=params[4],
                                                         options=opts),
                          "markov_scores", params, q, kernel, graphs=opts.graphs)

    def jbu_upsample(self, scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL,
                     sigma_range: float = SIGMA_RANGE,
                     radius: int = RADIUS) -> Tensor:
        """scores: [B, C, h, w]; guide: [B, 3, H, W] -> [B, C, H, W] float32."""
        from ovss_fast.kernels.triton import jbu as mod

        return mod.jbu_upsample(scores, guide, sigma_spatial=sigma_spatial, sigma_range=sigma_range, radius=radius)

    def jbu_argmax(self, scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL,
                   sigma_range: float = SIGMA_RANGE,
                   radius: int = RADIUS) -> Tensor:
        """scores: [B, C, h, w]; guide: [B, 3, H, W] -> labels [B, H, W] int64."""
        from ovss_fast.kernels.triton import jbu as mod

        return mod.jbu_argmax(scores, guide, sigma_spatial=sigma_spatial, sigma_range=sigma_range, radius=radius)

    def pamr(self, scores: Tensor, image: Tensor, *, iters: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
        """scores: [B, C, h, w]; image: [B, K, H, W] -> [B, C, H, W] float32 (see reference.pamr)."""
        from ovss_fast.kernels.triton import pamr as mod

        return mod.pamr(scores, image, iters=iters, dilations=dilations)

    def label_propagation(self, scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400,
                          gamma: float = 3.0, sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95,
                          iters: int = 10, tol: float = 1e-6) -> Tensor:
        """scores: [B, N, C]; feats: [B, N, D]; positions: [B, N, 2] -> [B, N, C] float32
        (see reference.label_propagation)."""
        from ovss_fast.kernels.triton import propagation as mod

        return mod.label_propagation(scores, feats, positions, k=k, gamma=gamma, sigma=sigma, dist_pow=dist_pow,
                                     alpha=alpha, iters=iters, tol=tol)

    def pixel_propagation(self, scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01,
                          alpha: float = 0.95, iters: int = 10, tol: float = 1e-6) -> Tensor:
        """scores: [B, C, H, W]; image: [B, 3, H, W] -> [B, C, H, W] float32 (see reference.pixel_propagation)."""
        from ovss_fast.kernels.triton import propagation as mod

        return mod.pixel_propagation(scores, image, radius=radius, tau=tau, alpha=alpha, iters=iters, tol=tol)


TRITON_BACKEND = TritonBackend()

__all__ = ["MAX_CLASSES", "MAX_PAMR_CHANNELS", "TRITON_BACKEND", "TritonBackend", "TritonOptions"]
