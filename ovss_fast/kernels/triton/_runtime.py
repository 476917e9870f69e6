"""Small helpers shared by the Triton launchers (no triton import here).

Triton decides at import time of ``triton.language`` whether kernels are compiled
for the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``); the launchers
ask :func:`interpreting` to pick one fixed configuration instead of autotuning, which
the interpreter cannot time.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch

#: Divisions floor their denominators here (method.md section 3); equals reference.DENOM_FLOOR.
DENOM_FLOOR = 1e-30
#: Added to the symmetrised affinity before the log (method.md section 2); equals reference.LOG_FLOOR.
LOG_FLOOR = 1e-12
#: the most classes class_distributions holds in one program (BLOCK_C = next_pow2(C) in registers)
MAX_CLASSES = 1024


def env_switch_off(name: str) -> bool:
    """Whether the environment variable ``name`` turns a default-on feature off (0, false, off, no)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


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


class GraphCache:
    """Replay multi-launch schedules from CUDA graphs, one graph per call signature.

    sinkhorn_scores and markov_scores launch a kernel per iteration (up to 2 * iters + 2, or
    2 * sk_iters + steps + 2): at N = 1024 the Python launch cost of those launches exceeds
    the GPU time. The first call with a new signature (op, parameters, input shapes and
    dtypes, device) runs eagerly on static copies of the inputs (which also autotunes),
    then captures the same call in a CUDA graph; every later call copies its inputs into
    the static buffers, replays the graph and returns a clone of the output. The numbers
    are those of the eager call: the graph holds the same launches.

    Eager instead: when OVSS_FAST_TRITON_GRAPHS=0, in the interpreter, off CUDA, and while
    the caller is itself capturing a graph. At most ``capacity`` graphs are kept (least
    recently used first out); each holds its static inputs, scratch and output.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    @staticmethod
    def enabled(*tensors: torch.Tensor) -> bool:
        if env_switch_off("OVSS_FAST_TRITON_GRAPHS"):
            return False
        if interpreting() or any(t.device.type != "cuda" for t in tensors):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def clear(self) -> None:
        """Drop every cached graph and its buffers."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, fn: Callable[..., torch.Tensor], name: str, params: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        """``fn(*inputs)``, replayed from a graph when :meth:`enabled`; ``params`` must hold every
        argument of ``fn`` besides the tensors (they are baked into the graph)."""
        if not self.enabled(*inputs):
            return fn(*inputs)
        dev = inputs[0].device
        key = (name, params, os.environ.get("OVSS_FAST_TRITON_SCHEDULE", ""),
               os.environ.get("OVSS_FAST_TRITON_PRECISION", ""), dev.index,
               tuple((tuple(t.shape), t.dtype) for t in inputs))
        with self._lock, torch.cuda.device(dev):
            entry = self._entries.pop(key, None)
            if entry is None:
                static = tuple(torch.empty(t.shape, dtype=t.dtype, device=dev) for t in inputs)
                for s, t in zip(static, inputs, strict=True):
                    s.copy_(t)
                fn(*static)  # compile and autotune outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = fn(*static)
                entry = (graph, static, out)
                if len(self._entries) >= self.capacity:
                    self._entries.pop(next(iter(self._entries)))
            else:
                for s, t in zip(entry[1], inputs, strict=True):
                    s.copy_(t)
            self._entries[key] = entry  # most recently used last
            entry[0].replay()
            return entry[2].clone()


#: the graphs of the Triton backend's iterative ops
GRAPHS = GraphCache()


def configs(keys: str, rows: list[tuple], num_stages: int | None = None) -> list:
    """triton.Config tables, one row a config: the block sizes named by ``keys`` (space separated) in
    order, then num_warps, then (optionally) that row's num_stages, else ``num_stages`` (Triton's
    default when None)."""
    import triton

    names = keys.split()
    out = []
    for row in rows:
        stages = row[len(names) + 1] if len(row) > len(names) + 1 else num_stages
        extra = {} if stages is None else {"num_stages": stages}
        out.append(triton.Config(dict(zip(names, row[:len(names)], strict=True)), num_warps=row[len(names)], **extra))
    return out


def autotune_bench(kernel_call: Callable[[], object], quantiles: object = None) -> object:
    """The autotuner's timing of one config: triton.testing.do_bench with Triton's own defaults
    (25 ms warm-up, 100 ms of repeats), or OVSS_FAST_TRITON_AUTOTUNE_REP_MS of repeats (a quarter of
    that warm-up) when set: the GPU check sets it low, since a fresh machine autotunes every shape."""
    import triton.testing

    text = os.environ.get("OVSS_FAST_TRITON_AUTOTUNE_REP_MS", "").strip()
    rep = int(text) if text.isdigit() and int(text) > 0 else 100
    return triton.testing.do_bench(kernel_call, warmup=max(1, rep // 4), rep=rep, quantiles=quantiles)


def autotune(configs: list, key: list[str], **kwargs: object) -> Callable:
    """``triton.autotune`` that keeps its choices on disk where this Triton can (``cache_results``,
    in Triton's cache folder), so a new process skips the timing runs for shapes seen before;
    OVSS_FAST_TRITON_AUTOTUNE_CACHE=0 turns that off; timed by :func:`autotune_bench`. Called by
    the kernel modules, which have imported triton already."""
    import inspect

    import triton

    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params and not env_switch_off("OVSS_FAST_TRITON_AUTOTUNE_CACHE"):
        kwargs["cache_results"] = True
    if "do_bench" in params:
        kwargs.setdefault("do_bench", autotune_bench)
    return triton.autotune(configs=configs, key=key, **kwargs)
