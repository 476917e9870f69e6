"""Small helpers shared by the Triton launchers (no triton import here).

Triton decides at import time of ``triton.language`` whether kernels are compiled
for the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``); the launchers
ask :func:`interpreting` to pick one fixed configuration instead of autotuning, which
the interpreter cannot time.
"""

from __future__ import annotations

import os
import sys

import torch

#: Divisions floor their denominators here (method.md section 3); equals reference.DENOM_FLOOR.
DENOM_FLOOR = 1e-30
#: Added to the symmetrised affinity before the log (method.md section 2); equals reference.LOG_FLOOR.
LOG_FLOOR = 1e-12
#: the most classes class_distributions holds in one program (BLOCK_C = next_pow2(C) in registers)
MAX_CLASSES = 1024


def interpret_requested() -> bool:
    """True when the environment asks for the interpreter (the spellings triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_interprets() -> bool | None:
    """Whether the triton.language already imported in this process interprets kernels; None before import.

    Triton fixes this when triton.language is first imported (its own jit functions are
    decorated then), so a later change of TRITON_INTERPRET has no effect.
    """
    lang = sys.modules.get("triton.language")
    if lang is None:
        return None
    return type(getattr(lang, "argmax", None)).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """Whether kernels launched now run in the interpreter (on CPU tensors)."""
    mode = triton_interprets()
    return interpret_requested() if mode is None else mode


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


class device_guard:  # noqa: N801 - used like torch.cuda.device
    """Make ``x``'s GPU current for the launch (a no-op for CPU tensors run by the interpreter)."""

    def __init__(self, x: torch.Tensor) -> None:
        self._ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
