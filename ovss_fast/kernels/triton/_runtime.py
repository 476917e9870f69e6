"""Small helpers shared by the Triton launchers (no triton import here).

Triton decides at import time of ``triton.language`` whether kernels are compiled
for the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``); the launchers
ask :func:`interpreting` to pick one fixed configuration instead of autotuning, which
the interpreter cannot time.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Mapping

import torch

from ovss_fast.errors import InputError

#: Divisions floor their denominators here (method.md section 3); equals reference.DENOM_FLOOR.
DENOM_FLOOR = 1e-30
#: Added to the symmetrised affinity before the log (method.md section 2); equals reference.LOG_FLOOR.
LOG_FLOOR = 1e-12
#: the most classes class_distributions holds in one program (BLOCK_C = next_pow2(C) in registers)
MAX_CLASSES = 1024


#: the schedules of sinkhorn_scores / markov_scores an option (or OVSS_FAST_TRITON_SCHEDULE) can name
SCHEDULES = ("auto", "fused", "split", "window", "persistent")
#: the products' input precisions (OVSS_FAST_TRITON_PRECISION)
PRECISIONS = ("ieee", "tf32x3")
#: how the discrepancy builds K: gibbs_kernel's K ("separate") or gibbs_kernel_only ("fused")
GIBBS_SCHEDULES = ("separate", "fused")
_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def env_switch_off(name: str) -> bool:
    """Whether the environment variable ``name`` turns a default-on feature off (0, false, off, no)."""
    return os.environ.get(name, "1").strip().lower() in _OFF


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """The Triton backend's switches, passed as keywords to its ops (``schedule=``, ``precision=``,
    ``gibbs=``, ``graphs=``) or to :func:`ovss_fast.discrepancy` as ``backend_options={...}``.

    * ``schedule``: the schedule sinkhorn_scores / markov_scores prefer: "auto" (the default), "fused",
      "split", "persistent", or "window" (taken only where N <= 512; "auto" above);
    * ``precision``: "ieee" (float32 FMAs, the default) or "tf32x3" (split-tf32 tensor-core products);
    * ``gibbs``: "separate" (the default: gibbs_kernel's K) or "fused" (gibbs_kernel_only, symmetric tiles);
    * ``graphs``: replay the iterative ops from CUDA graphs (default True).

    Defaults: :data:`DEFAULTS`, read ONCE when this module is imported from OVSS_FAST_TRITON_SCHEDULE,
    OVSS_FAST_TRITON_PRECISION, OVSS_FAST_TRITON_GIBBS and OVSS_FAST_TRITON_GRAPHS (0 / false / off / no
    turns graphs off); changing them later has no effect.
    """

    schedule: str = "auto"
    precision: str = "ieee"
    gibbs: str = "separate"
    graphs: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("gibbs", GIBBS_SCHEDULES)):
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not isinstance(self.graphs, bool):
            raise InputError(f"graphs must be True or False, got {self.graphs!r}")

    def with_(self, overrides: Mapping[str, object] | None = None, *, argument: str = "backend_options",
              **kw: object) -> TritonOptions:
        """These options with ``overrides`` (and keywords) applied; None values keep the default. An
        unknown name raises ValueError naming ``argument``."""
        merged = {**(overrides or {}), **kw}
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(merged) - fields)
        if unknown:
            raise InputError(f"{argument}: unknown Triton option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(fields))}")
        given = {k: v for k, v in merged.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


def _env_defaults() -> tuple[TritonOptions, str | None]:
    """TritonOptions from the environment (read once, at import) and the error, if a value is invalid."""
    names = {"schedule": "OVSS_FAST_TRITON_SCHEDULE", "precision": "OVSS_FAST_TRITON_PRECISION",
             "gibbs": "OVSS_FAST_TRITON_GIBBS"}
    values: dict[str, object] = {}
    for field, var in names.items():
        text = os.environ.get(var, "").strip().lower()
        if text:
            values[field] = text
    values["graphs"] = not env_switch_off("OVSS_FAST_TRITON_GRAPHS")
    try:
        return TritonOptions(**values), None  # type: ignore[arg-type]
    except ValueError as err:
        return TritonOptions(), f"environment override ({', '.join(names.values())}): {err}"


_DEFAULTS, _ENV_ERROR = _env_defaults()
#: OVSS_FAST_TRITON_AUTOTUNE_REP_MS (read at import): the autotuner's repeat time per config, ms (Triton's 100 if unset)
_REP_TEXT = os.environ.get("OVSS_FAST_TRITON_AUTOTUNE_REP_MS", "").strip()
AUTOTUNE_REP_MS = int(_REP_TEXT) if _REP_TEXT.isdigit() and int(_REP_TEXT) > 0 else 100
#: OVSS_FAST_TRITON_AUTOTUNE_CACHE=0 (read at import) keeps the autotuner's choices off the disk
AUTOTUNE_DISK_CACHE = not env_switch_off("OVSS_FAST_TRITON_AUTOTUNE_CACHE")


def defaults() -> TritonOptions:
    """The default :class:`TritonOptions` (from the environment at import); ValueError naming the variable
    when one held an invalid value."""
    if _ENV_ERROR is not None:
        raise InputError(_ENV_ERROR)
    return _DEFAULTS


def resolve(options: TritonOptions | None = None, **kw: object) -> TritonOptions:
    """``options`` (or :func:`defaults`) with the keywords that are not None applied."""
    return (options if options is not None else defaults()).with_(argument="options", **kw)


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


def size_bucket(n: int) -> int:
    """The autotuning bucket of a size: the smallest power of two >= n (>= 1).

    Whole-image evaluation varies N (patches), C (classes), H x W (pixels) from image to image; an
    autotuner keyed on exact sizes would time its configs again on nearly every image. Keyed on
    buckets, one timing serves every size in (2^(k-1), 2^k]. Correct for every size in a bucket
    because the kernels mask or loop over any size, and every size-dependent choice the launchers
    make (BLOCK_C = next_pow2(C), window_block_n(N) = next_pow2(N), the window schedule's N <= 512,
    persistent_block_n's N <= 256) changes only at a power of two, which is a bucket boundary.
    """
    return next_pow2(n)


#: the size keys bucketed by :func:`bucket_sizes` (others, e.g. D, R, MODE, PRECISION, stay exact)
SIZE_KEYS = ("B", "N", "C")


def bucket_sizes(named: dict) -> dict:
    """The default bucketing of an autotuner's named key values: B, N, C by :func:`size_bucket`."""
    return {k: size_bucket(v) if k in SIZE_KEYS else v for k, v in named.items()}


class _BucketKey(tuple):
    """A key already bucketed (so bucketing it again is the identity)."""

    __slots__ = ()


class BucketedCache(dict):
    """The autotuner's config cache keyed on buckets: ``triton.runtime.Autotuner.run`` looks its key
    (the values of ``names`` in order, then the tensor arguments' dtypes) up with ``in``, ``[]`` and
    stores with ``[]=``; this dict maps every such key through ``bucket`` (named values -> named values)
    first, so sizes in one bucket share one tuning. ``len()`` is the number of tunings so far."""

    def __init__(self, names: list[str], bucket: Callable[[dict], dict] = bucket_sizes) -> None:
        super().__init__()
        self.names = tuple(names)
        self.bucket = bucket

    def bucket_key(self, key: tuple) -> tuple:
        if isinstance(key, _BucketKey):
            return key
        n = len(self.names)
        named = self.bucket(dict(zip(self.names, key[:n], strict=True)))
        return _BucketKey((*sorted(named.items()), *key[n:]))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self.bucket_key(key))  # type: ignore[arg-type]

    def __getitem__(self, key: tuple) -> object:
        return super().__getitem__(self.bucket_key(key))

    def __setitem__(self, key: tuple, value: object) -> None:
        super().__setitem__(self.bucket_key(key), value)

    def get(self, key: tuple, default: object = None) -> object:
        return super().get(self.bucket_key(key), default)


def graph_key(name: str, params: tuple, device_index: int | None, stream: int, inputs: tuple) -> tuple:
    """The CUDA-graph cache key of one call: op, its baked-in parameters (options included), device,
    the CURRENT STREAM (each stream gets its own static buffers, so two callers on two streams never
    overwrite each other's inputs between copy and replay) and the exact input shapes and dtypes (a
    graph bakes in grid sizes and N: it cannot serve another shape)."""
    return (name, params, device_index, stream, tuple((tuple(t.shape), t.dtype) for t in inputs))


class GraphPolicy:
    """Which calls capture (pure Python, no CUDA: unit-tested on the CPU).

    Graphs are kept per exact shape (a graph bakes in N and grid sizes), so whole-image evaluation
    meets many keys: a key is captured only on its ``capture_after``-th call (the calls before run
    eagerly: a capture costs an eager warm-up, a device synchronize, a gc.collect and the capture itself,
    which a shape seen once never pays back), and at most ``capacity`` graphs are kept (least
    recently used out). :meth:`plan` says "eager", "capture" or "replay" and records the call.
    """

    def __init__(self, capacity: int = 32, capture_after: int = 2) -> None:
        self.capacity = capacity
        self.capture_after = capture_after
        self.captured: dict[tuple, object] = {}
        self._seen: dict[tuple, int] = {}
        self.captures = 0

    def plan(self, key: tuple) -> str:
        if key in self.captured:
            self.captured[key] = self.captured.pop(key)  # most recently used last
            return "replay"
        count = self._seen.pop(key, 0) + 1
        if count < self.capture_after:
            self._seen[key] = count
            if len(self._seen) > 4 * self.capacity:
                self._seen.pop(next(iter(self._seen)))
            return "eager"
        return "capture"

    def store(self, key: tuple, entry: object) -> None:
        """Keep a captured ``entry`` (evicting the least recently used past ``capacity``)."""
        if len(self.captured) >= self.capacity:
            self.captured.pop(next(iter(self.captured)))
        self.captured[key] = entry
        self.captures += 1

    def clear(self) -> None:
        self.captured.clear()
        self._seen.clear()


class GraphCache:
    """Replay multi-launch schedules from CUDA graphs, one graph per call signature and stream.

    sinkhorn_scores and markov_scores launch a kernel per iteration (up to 2 * iters + 2, or
    2 * sk_iters + steps + 2): at N = 1024 the Python launch cost of those launches exceeds
    the GPU time. A signature (:func:`graph_key`: op, parameters, exact input shapes and dtypes,
    device, current stream) seen for the ``capture_after``-th time runs eagerly on static copies of
    the inputs (which also autotunes), then is captured in a CUDA graph; every later call on that
    stream copies its inputs into the static buffers, replays the graph and returns a clone of the
    output, all on the caller's current stream (so in order with its own work). The numbers are those
    of the eager call: the graph holds the same launches. :class:`GraphPolicy` bounds the captures.

    Eager instead: when ``graphs=False`` is passed to :meth:`run` (the Triton backend's option,
    default from OVSS_FAST_TRITON_GRAPHS read at import), in the interpreter, off CUDA, and while the
    caller is itself capturing a graph. Each kept graph holds its static inputs, scratch and output.
    """

    def __init__(self, capacity: int = 32, capture_after: int = 2) -> None:
        self.policy = GraphPolicy(capacity, capture_after)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    @staticmethod
    def enabled(*tensors: torch.Tensor) -> bool:
        if interpreting() or any(t.device.type != "cuda" for t in tensors):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def clear(self) -> None:
        """Drop every cached graph and its buffers."""
        with self._lock:
            self.policy.clear()

    def __len__(self) -> int:
        return len(self.policy.captured)

    def run(self, fn: Callable[..., torch.Tensor], name: str, params: tuple, *inputs: torch.Tensor,
            graphs: bool = True) -> torch.Tensor:
        """``fn(*inputs)``, replayed from a graph when ``graphs`` and :meth:`enabled`; ``params`` must hold
        every argument of ``fn`` besides the tensors (they are baked into the graph)."""
        if not graphs or not self.enabled(*inputs):
            return fn(*inputs)
        dev = inputs[0].device
        key = graph_key(name, params, dev.index, torch.cuda.current_stream(dev).stream_id, inputs)
        with self._lock:
            action = self.policy.plan(key)
        if action == "eager":  # a shape's first call: no capture (it may never come back)
            return fn(*inputs)
        with self._lock, torch.cuda.device(dev):
            # another thread may have evicted this graph, or captured it, between plan and here
            action = "replay" if key in self.policy.captured else "capture"
            if action == "capture":
                static = tuple(torch.empty(t.shape, dtype=t.dtype, device=dev) for t in inputs)
                for s, t in zip(static, inputs, strict=True):
                    s.copy_(t)
                fn(*static)  # compile and autotune outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = fn(*static)
                entry = (graph, static, out)
                self.policy.store(key, entry)
            else:
                entry = self.policy.captured[key]
                for s, t in zip(entry[1], inputs, strict=True):
                    s.copy_(t)
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
    (25 ms warm-up, 100 ms of repeats), or OVSS_FAST_TRITON_AUTOTUNE_REP_MS (read at import) of repeats
    (a quarter of that warm-up) when set: the GPU check sets it low, since a fresh machine autotunes."""
    import triton.testing

    rep = AUTOTUNE_REP_MS
    return triton.testing.do_bench(kernel_call, warmup=max(1, rep // 4), rep=rep, quantiles=quantiles)


#: every autotuner made by :func:`autotune`, in creation order (:func:`tunings` counts their tunings)
TUNERS: list = []


def tunings() -> dict[str, int]:
    """Tunings so far per autotuned kernel (its function name; a kernel tuned by two autotuners, e.g. an
    ieee and a tf32x3 config table, sums them): the distinct bucketed keys its cache holds."""
    out: dict[str, int] = {}
    for tuner in TUNERS:
        name = tuner.base_fn.__name__ if hasattr(tuner, "base_fn") else tuner.fn.__name__
        out[name] = out.get(name, 0) + len(tuner.cache)
    return out


def autotune(configs: list, key: list[str], bucket: Callable[[dict], dict] = bucket_sizes,
             **kwargs: object) -> Callable:
    """``triton.autotune`` keyed on size buckets (:class:`BucketedCache`: ``bucket`` maps the named key
    values, by default B, N, C to :func:`size_bucket`), keeping its choices on disk where this Triton can
    (``cache_results``, in Triton's cache folder, under the bucketed key), so a new process skips the
    timing runs for buckets seen before; OVSS_FAST_TRITON_AUTOTUNE_CACHE=0 (read at import) turns that
    off; timed by :func:`autotune_bench`. Called by the kernel modules, which have imported triton."""
    import inspect

    import triton

    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params and AUTOTUNE_DISK_CACHE:
        kwargs["cache_results"] = True
    if "do_bench" in params:
        kwargs.setdefault("do_bench", autotune_bench)
    decorate = triton.autotune(configs=configs, key=key, **kwargs)

    def wrap(fn: Callable) -> object:
        tuner = decorate(fn)
        missing = [k for k in key if k not in tuner.arg_names]
        if missing:
            raise ValueError(f"autotune key names {missing} are not arguments of {tuner.arg_names}")
        cache = BucketedCache(list(key), bucket)
        tuner.cache = cache
        if hasattr(tuner, "check_disk_cache"):
            disk = tuner.check_disk_cache
            tuner.check_disk_cache = lambda key, *rest: disk(cache.bucket_key(key), *rest)
        TUNERS.append(tuner)
        return tuner

    return wrap
