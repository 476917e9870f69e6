"""Backends and how ``backend="auto"`` chooses one.

A backend implements every op in :data:`OPS` with the signature of the function of
the same name in :mod:`ovss_fast.kernels.reference`, and says through
:meth:`Backend.unsupported_reasons` which calls it cannot serve. ``auto`` takes the
first backend in :func:`auto_order` (:data:`AUTO_ORDER`, except where :data:`AUTO_ORDER_BY_OP`
says otherwise) whose reasons are empty (the reference serves
everything, so ``auto`` always finds one); a forced backend that cannot serve a
call raises with its reasons.

Backends are imported lazily: the reference never needs the compiled extension or
Triton.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError
from ovss_fast.kernels import reference
from ovss_fast.kernels.common import EPS

OPS = (
    "class_distributions",
    "gibbs_kernel",
    "kl_scores",
    "sinkhorn_scores",
    "markov_scores",
    "jbu_upsample",
    "jbu_argmax",
    "pamr",
    "label_propagation",
    "pixel_propagation",
)
BACKENDS = ("reference", "cpu", "cuda", "triton")
#: the order ``backend="auto"`` tries; the first that can serve the call wins
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
#: ops whose auto order differs. sinkhorn_scores / markov_scores never go to "cuda" under auto: on an
#: H100 (bench/RESULTS.md, "GPU check", N = 1024, C = 171) the CUDA extension's op / mv ran 8.6 / 4.8 ms,
#: slower than the PyTorch reference itself (5.7 / 3.8 ms) and than Triton (3.4 / 2.3 ms). Without
#: Triton, CUDA tensors take the reference; backend="cuda" still runs the extension. Put "cuda" back
#: only in a commit that records a GPU check where it beats the reference at every shape of the
#: regime table (bench/gpu_check.py).
#: The refiners' CUDA and Triton paths (pamr's kernels, label_propagation's and pixel_propagation's) compile and pass
#: the interpreter / CPU tests but have never run on a GPU: until a GPU check (bench/gpu_check.py) shows them
#: correct, auto gives CUDA tensors to the reference (forced backend="cuda" / "triton" still runs them).
AUTO_ORDER_BY_OP = {
    "sinkhorn_scores": ("triton", "cpu", "reference"),
    "markov_scores": ("triton", "cpu", "reference"),
    "pamr": ("cpu", "reference"),
    "label_propagation": ("cpu", "reference"),
    "pixel_propagation": ("cpu", "reference"),
}


def auto_order(op: str) -> tuple[str, ...]:
    """The backends ``backend="auto"`` tries for ``op``, in order."""
    return AUTO_ORDER_BY_OP.get(op, AUTO_ORDER)


class Backend:
    """Base class: one implementation of :data:`OPS`."""

    name = "?"

    def unsupported_reasons(self, op: str, tensors: Sequence[Tensor], params: Mapping[str, Any]) -> list[str]:
        """Why this backend cannot run ``op`` on these (validated) inputs; empty when it can."""
        return []

    def gibbs_kernel_only(self, affinity: Tensor, *, eps: float = EPS) -> Tensor:
        """affinity: [B, N, N] -> the kernel K of ``gibbs_kernel`` (what ops.discrepancy needs); a backend
        that can skip the cost overrides this. Not an op of :data:`OPS`: it calls this backend's gibbs_kernel."""
        return self.gibbs_kernel(affinity, eps=eps)[1]

    def markov_transition(self, affinity: Tensor, *, transition: str = "attention", eps: float = EPS,
                          **options: Any) -> Tensor:
        """affinity: [B, N, N] -> the matrix mode "mv" makes doubly stochastic (method.md section 3): this
        backend's Gibbs kernel ("gibbs") or W = Sym / M ("attention"), the latter one elementwise PyTorch pass
        on the affinity's device (reference.attention_transition) for every backend. Both are symmetric.
        ``options``: passed to this backend's gibbs_kernel_only (the Triton backend's ``gibbs``)."""
        if transition == "attention":
            return reference.attention_transition(affinity)
        return self.gibbs_kernel_only(affinity, eps=eps, **options)


class ReferenceBackend(Backend):
    """The pure-PyTorch specification: any device, any supported dtype."""

    name = "reference"
    takes_nms_axis = True

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op in OPS:
            return getattr(reference, op)
        raise AttributeError(op)


class UnavailableBackend(Backend):
    """Stands in for a backend whose module failed to import (e.g. extension not built)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def unsupported_reasons(self, op: str, tensors: Sequence[Tensor], params: Mapping[str, Any]) -> list[str]:
        return [self.reason]


#: backend name -> (module, attribute) of the Backend instance, imported on first use
_LOCATIONS: dict[str, tuple[str, str]] = {
    "cpu": ("ovss_fast.kernels.extension", "CPU_BACKEND"),
    "cuda": ("ovss_fast.kernels.extension", "CUDA_BACKEND"),
    "triton": ("ovss_fast.kernels.triton", "TRITON_BACKEND"),
}
_CACHE: dict[str, Backend] = {"reference": ReferenceBackend()}
_WARNED: set[str] = set()


def get_backend(name: str) -> Backend:
    """The backend called ``name``; one that cannot load says why in its reasons."""
    if name not in BACKENDS:
        raise InputError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name not in _CACHE:
        module, attr = _LOCATIONS[name]
        try:
            _CACHE[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _CACHE[name] = UnavailableBackend(name, f"{name} backend unavailable: {exc}")
    return _CACHE[name]


def available_backends() -> dict[str, str]:
    """{name: "ok" or the reason it cannot load}; a quick report for users and bug reports."""
    out = {}
    for name in BACKENDS:
        b = get_backend(name)
        out[name] = b.reason if isinstance(b, UnavailableBackend) else "ok"
    return out


def select(op: str, backend: str, tensors: Sequence[Tensor], params: Mapping[str, Any]) -> Backend:
    """The backend that runs ``op``: the forced one, or the first of :func:`auto_order` that can."""
    if not isinstance(backend, str):
        raise InputTypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.unsupported_reasons(op, tensors, params)
        if reasons:
            raise InputError(f"backend={backend!r} cannot run {op}: " + "; ".join(reasons))
        return chosen
    every: dict[str, list[str]] = {}
    for name in auto_order(op):
        candidate = get_backend(name)
        reasons = candidate.unsupported_reasons(op, tensors, params)
        if not reasons:
            if name == "reference":
                _warn_fallback(op, tensors, every)
            return candidate
        every[name] = reasons
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in every.items())
    raise InputError(f"no backend can run {op}: {detail}")


def _warn_fallback(op: str, tensors: Sequence[Tensor], every: Mapping[str, list[str]]) -> None:
    """Say once per device type when the compiled backends could not be used."""
    device = tensors[0].device.type if tensors else "cpu"
    native = "cuda" if device == "cuda" else "cpu"
    reasons = every.get(native, [])
    missing = [r for r in reasons if "unavailable" in r]
    if missing and device not in _WARNED:
        _WARNED.add(device)
        warnings.warn(
            f"ovss_fast: using the PyTorch reference for {op} on {device} ({missing[0]}). "
            "Build the extension with `pip install --no-build-isolation -e .` for the fast path.",
            RuntimeWarning,
            stacklevel=4,
        )
