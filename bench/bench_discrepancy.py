"""Benchmark of sinkhorn_scores (mode "op") and markov_scores (mode "mv") with the kernel given.

    python -m bench.bench_discrepancy [--quick] [--device cpu|cuda] [--no-write]

For every N in {784, 1024, 2304}, C in {21, 171}, mode in {op, mv} at the default
iterations (op: 50 Sinkhorn iterations; mv: 15 SK iterations, 50 steps, integrated),
B = 1, float32:

1. correctness first: each backend's scores against the float64 reference at that
   size (rel. error max|a - b| / max|b| <= 1e-4), a failure stops the run;
2. the median time of each backend: on the CPU the compiled "cpu" backend against the
   reference eager (whose products are torch.bmm), with the peak resident-set growth of
   one call in a fresh process (bench/_ext_bench.py); on a GPU the reference eager,
   torch.compile(reference), "cuda" and "triton" (when they can run), timed with
   triton.testing.do_bench, with torch.cuda.max_memory_allocated;
3. the BLAS floor: torch.mm at [N, N] x [N, C] (the product every iteration does)
   in GFLOP/s (the fastest of 50 calls on the CPU, do_bench's median on a GPU), and the
   fraction of that rate each backend reaches counting only the products
   (op: (2 iters + 1) 2 N^2 C flops; mv: steps 2 N^2 C + sk_iters 4 N^2).

Rows go to bench/results.csv; the table replaces this benchmark's own section of
bench/RESULTS.md ("Discrepancy scores (op, mv) on CPU").

On a GPU (``--device cuda``) it runs the regime table instead (:func:`run_regimes`, shared
with ``python -m bench.gpu_check``): the shapes the pipeline sends (:data:`WINDOW_REGIMES`,
batches of 224 px windows, N = 196, synonyms counted as columns; and B = 1 at N in
{784, 1024, 2304, 4096} x C in {21, 171}) for every variant of :func:`gpu_variants`:
reference eager, torch.compile(reference), cuda, and each Triton schedule (fused, split,
window, and the tf32x3 products) labelled, each row with its rel. error against float64, the
median ms (do_bench), the CUDA-graph replay ms, the achieved GFLOP/s of the products and the
percentage of the card's float32 FMA peak (:data:`FP32_PEAK_TFLOPS`). The rows are written to
bench/results_gpu.json (:func:`write_results_json`) and the "Discrepancy regimes on GPU"
section of bench/RESULTS.md. The kernel is given (gibbs_kernel not timed) and symmetric, as
ops.discrepancy's is; Triton gets ``symmetric=True`` as ops.discrepancy passes it.

``--smoke`` runs the same regime machinery on the CPU at tiny shapes (reference, cpu; the
GPU backends are rows saying why they did not run), writes nothing unless ``--json`` names a
file: tests/test_bench.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import UnavailableBackend, get_backend

from ._ext_bench import peak_mem_mb, time_gpu, time_gpu_graph
from ._results_io import append_rows, device_name, markdown_table, now, versions, write_section

TOL = 1e-4
SIZES_N = (784, 1024, 2304)
SIZES_C = (21, 171)
MODES = ("op", "mv")
EPS, ITERS, SK_ITERS, STEPS = 0.1, 50, 15, 50


def inputs(N: int, C: int, *, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, N, C] (each class a distribution over patches) and kernel [1, N, N], float64 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, N, 32, generator=g, dtype=torch.float64)
    text = torch.randn(C, 32, generator=g, dtype=torch.float64)
    q = R.class_distributions(feats, text, scale=20.0)
    labels = torch.randint(0, 8, (1, N), generator=g)
    aff = 0.6 * (labels[:, :, None] == labels[:, None, :]).double() + 0.4 * torch.rand(1, N, N, generator=g,
                                                                                        dtype=torch.float64)
    _, kernel = R.gibbs_kernel(aff, eps=EPS)
    return q.to(device), kernel.to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30))


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def product_flops(mode: str, N: int, C: int, iters: int = ITERS, sk_iters: int = SK_ITERS,
                  steps: int = STEPS) -> float:
    if mode == "op":
        return (2 * iters + 1) * 2.0 * N * N * C
    return steps * 2.0 * N * N * C + sk_iters * 4.0 * N * N


def best_cpu_ms(fn: Callable[[], object], runs: int = 50) -> float:
    """Fastest of ``runs`` calls in ms: the rate the BLAS reaches on this machine when undisturbed."""
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                         min_total_s: float = 2.0) -> dict[str, float]:
    """Median ms of each fn, run in turn (a, b, a, b, ...) so that load from other jobs on the
    machine falls on every column alike; at least ``repeats`` runs and ``min_total_s`` seconds each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}

    def more() -> bool:
        return any(len(t) < repeats or (sum(t) < min_total_s * 1e3 and len(t) < 200) for t in times.values())

    while more():
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def make_inputs(case: dict) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(mode, q, kernel) float32 on the CPU for bench._ext_bench.peak_mem_mb (a fresh process per cell)."""
    q64, k64 = inputs(case["N"], case["C"], seed=case["N"] * 1000 + case["C"], device="cpu")
    return case["mode"], q64.float(), k64.float()


def run(inputs: tuple[str, torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
    mode, q, k = inputs
    fn = score_fns(mode, "cpu")[backend]
    assert not isinstance(fn, str), fn
    return fn(q, k)


def score_fns(mode: str, device: str) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str]:
    """backend label -> fn(q, kernel), or the reason it cannot run here."""
    out: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str] = {}

    def ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if mode == "op":
            return R.sinkhorn_scores(q, k, eps=EPS, iters=ITERS)
        return R.markov_scores(q, k, sk_iters=SK_ITERS, steps=STEPS)

    out["reference eager"] = ref
    if device == "cuda":
        out["torch.compile(reference)"] = torch.compile(ref, dynamic=False)
    names = ("cuda", "triton") if device == "cuda" else ("cpu",)
    for name in names:
        b = get_backend(name)
        if isinstance(b, UnavailableBackend):
            out[name] = b.reason
            continue

        def run(q: torch.Tensor, k: torch.Tensor, b: object = b) -> torch.Tensor:
            if mode == "op":
                return b.sinkhorn_scores(q, k, eps=EPS, iters=ITERS)
            return b.markov_scores(q, k, sk_iters=SK_ITERS, steps=STEPS)

        out[name] = run
    return out


# --------------------------------------------------------------------------- the regime table (GPU)
#: the window batches the pipeline sends (README protocol: ViT-B/16 224 px windows, N = 196, synonyms
#: counted as columns): (dataset, B windows, N, S columns)
WINDOW_REGIMES = (("voc21", 6, 196, 46), ("coco_stuff", 15, 196, 199), ("ade", 15, 196, 223),
                  ("cityscapes", 36, 196, 29))
#: whole-image use: B = 1 at these N and C
WHOLE_N = (784, 1024, 2304, 4096)
WHOLE_C = (21, 171)
#: the issue's target shapes (ratios against eager and torch.compile are asked there)
TARGETS = (("coco_stuff", 15, 196, 199), ("whole", 1, 1024, 171))
#: float32 FMA peak (dense, no tensor cores), TFLOP/s, by a substring of torch.cuda.get_device_name;
#: datasheet leads (H200 is the H100 SXM's silicon), first match wins
FP32_PEAK_TFLOPS = (("H200", 66.9), ("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 66.9), ("GH200", 66.9),
                    ("A100", 19.5), ("L40S", 91.6), ("L4", 30.3), ("A10G", 31.2), ("RTX 4090", 82.6))
RESULTS_JSON = Path(__file__).resolve().parent / "results_gpu.json"
JSON_KEYS = ("op", "B", "N", "C", "backend", "median_ms", "rel_err", "card", "date", "commit")


def regimes(quick: bool = False) -> list[tuple[str, int, int, int]]:
    """(name, B, N, C) of the regime table; ``quick``: the target shapes, a small-C window batch and N = 4096."""
    if quick:
        return [*TARGETS, ("cityscapes", 36, 196, 29), ("whole", 1, 4096, 21)]
    return [*WINDOW_REGIMES, *[("whole", 1, n, c) for n in WHOLE_N for c in WHOLE_C]]


def fp32_peak_tflops(card: str) -> float | None:
    """The card's float32 FMA peak from :data:`FP32_PEAK_TFLOPS`, or None for a card not listed."""
    for key, peak in FP32_PEAK_TFLOPS:
        if key.lower() in card.lower():
            return peak
    return None


def batch_flops(mode: str, B: int, N: int, C: int) -> float:
    """Floating-point operations of the products (what the FMA peak is about): B windows of
    op: (2 iters + 1) products [N, N] x [N, C]; mv: steps such products and sk_iters 2 matrix-vector pairs."""
    return B * product_flops(mode, N, C)


def git_commit() -> str:
    """HEAD of the checkout, else $OVSS_FAST_COMMIT (the device machine's copy has no .git), else 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or os.environ.get("OVSS_FAST_COMMIT", "").strip() or "unknown"


@dataclass
class Variant:
    """One row label of the regime table: a backend, the environment it runs under, its keyword args."""

    label: str
    backend: str  # "reference", "compile", or a backend name
    env: dict[str, str | None] = field(default_factory=dict)
    kwargs: dict[str, object] = field(default_factory=dict)
    #: which shapes it runs at (B, N, C) -> bool
    applies: Callable[[int, int, int], bool] = lambda B, N, C: True
    #: float32 contract (1e-4) or the tf32x3 check (reported, judged against 1e-4 as well)
    tol: float = TOL


@contextlib.contextmanager
def environment(env: dict[str, str | None]) -> Iterator[None]:
    """Set ``env`` for the block, None unsetting a variable (the Triton / CUDA schedule switches are
    read at call time)."""
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _window_n(B: int, N: int, C: int) -> bool:
    from ovss_fast.kernels.triton.sinkhorn_scores import WINDOW_MAX_N

    return N <= WINDOW_MAX_N


def gpu_variants(quick: bool) -> list[Variant]:
    """The rows of every shape on a GPU. torch.compile only at the target shapes under ``quick``
    (it compiles for ~30 s per shape and mode)."""
    targets = {(b, n, c) for _, b, n, c in TARGETS}
    sym = {"symmetric": True}  # the Triton rows pass the backend's options (schedule, precision) as keywords

    def tri(schedule: str, precision: str = "ieee") -> dict:
        return {**sym, "schedule": schedule, "precision": precision}

    return [
        Variant("reference eager", "reference"),
        Variant("torch.compile(reference)", "compile",
                applies=(lambda B, N, C: (B, N, C) in targets) if quick else (lambda B, N, C: True)),
        Variant("cuda", "cuda", env={"OVSS_FAST_CUDA_DISCREPANCY": None}),
        Variant("triton[fused]", "triton", kwargs=tri("fused")),
        Variant("triton[split]", "triton", kwargs=tri("split")),
        Variant("triton[window]", "triton", kwargs=tri("window"), applies=_window_n),
        Variant("triton[window,tf32x3]", "triton", kwargs=tri("window", "tf32x3"),
                applies=_window_n),
        Variant("triton[fused,tf32x3]", "triton", kwargs=tri("fused", "tf32x3"),
                applies=lambda B, N, C: N > 512),
        Variant("triton[split,tf32x3]", "triton", kwargs=tri("split", "tf32x3"),
                applies=lambda B, N, C: N > 512),
        Variant("triton[persistent]", "triton", kwargs=tri("persistent")),
        Variant("triton[persistent,tf32x3]", "triton", kwargs=tri("persistent", "tf32x3")),
    ]


def cpu_smoke_variants() -> list[Variant]:
    """The --smoke rows: the CPU backends, and the GPU ones (which say why they cannot run here)."""
    return [Variant("reference eager", "reference"), Variant("cpu", "cpu"), Variant("cuda", "cuda"),
            Variant("triton[window]", "triton", kwargs={"symmetric": True, "schedule": "window"})]


def regime_inputs(B: int, N: int, C: int, *, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, C] (each class a distribution over patches; one dead class when C > 2) and a symmetric
    Gibbs kernel [B, N, N] (from reference.gibbs_kernel, as ops.discrepancy builds it), float64."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, N, 32, generator=g, dtype=torch.float64)
    text = torch.randn(C, 32, generator=g, dtype=torch.float64)
    q = R.class_distributions(feats, text, scale=20.0)
    if C > 2:
        q[:, :, C - 1] = 0  # a dead class (NMS can empty one): its scores must be -inf
    labels = torch.randint(0, 8, (B, N), generator=g)
    aff = 0.6 * (labels[:, :, None] == labels[:, None, :]).double() + 0.4 * torch.rand(B, N, N, generator=g,
                                                                                        dtype=torch.float64)
    _, kernel = R.gibbs_kernel(aff, eps=EPS)
    return q.to(device), kernel.to(device)


def _call(mode: str, variant: Variant, params: dict[str, int]) -> Callable[[torch.Tensor, torch.Tensor], object] | str:
    """fn(q, kernel) for the variant, or the reason it cannot run."""
    def ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if mode == "op":
            return R.sinkhorn_scores(q, k, eps=EPS, iters=params["iters"])
        return R.markov_scores(q, k, sk_iters=params["sk_iters"], steps=params["steps"])

    if variant.backend == "reference":
        return ref
    if variant.backend == "compile":
        return torch.compile(ref, dynamic=False)
    b = get_backend(variant.backend)
    if isinstance(b, UnavailableBackend):
        return b.reason

    def run(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        with environment(variant.env):
            if mode == "op":
                return b.sinkhorn_scores(q, k, eps=EPS, iters=params["iters"], **variant.kwargs)
            return b.markov_scores(q, k, sk_iters=params["sk_iters"], steps=params["steps"], **variant.kwargs)

    return run


def run_regimes(device: str, *, quick: bool = False, smoke: bool = False, rep_ms: int = 200,
                budget_s: float | None = None, log: Callable[[str], None] = print,
                shapes: list[tuple[str, int, int, int]] | None = None,
                variants: list[Variant] | None = None) -> list[dict]:
    """The regime table: one record per (mode, shape, variant) with JSON_KEYS and more
    (mode, regime, graph_ms, gflops, pct_fp32_peak, passed, note). A variant that cannot run, or that
    would start after ``budget_s`` seconds, is a record with median_ms None and the reason in its note.
    ``shapes`` / ``variants`` replace the defaults ((name, B, N, C) and :class:`Variant` lists)."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):  # one compiled reference per shape and mode
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    t0 = time.perf_counter()
    card = device_name(device)
    peak = fp32_peak_tflops(card) if device == "cuda" else None
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()
    if smoke:
        shapes = shapes or [("window", 3, 37, 5), ("whole", 1, 64, 3)]
        params = {"iters": 5, "sk_iters": 3, "steps": 5}
        variants = variants or cpu_smoke_variants()
    else:
        shapes = shapes or regimes(quick)
        params = {"iters": ITERS, "sk_iters": SK_ITERS, "steps": STEPS}
        variants = variants or gpu_variants(quick)
    records: list[dict] = []
    for name, B, N, C in shapes:
        q64, k64 = regime_inputs(B, N, C, seed=B * 1_000_000 + N * 1000 + C, device=device)
        q, k = q64.float(), k64.float()
        for mode in MODES:
            op = "sinkhorn_scores" if mode == "op" else "markov_scores"
            ref64 = _call(mode, Variant("reference", "reference"), params)(q64, k64)  # type: ignore[operator]
            flops = B * product_flops(mode, N, C, **params)
            for variant in variants:
                if not variant.applies(B, N, C):
                    continue
                rec = {"op": op, "mode": mode, "regime": name, "B": B, "N": N, "C": C, "backend": variant.label,
                       "median_ms": None, "graph_ms": None, "rel_err": None, "gflops": None, "pct_fp32_peak": None,
                       "passed": None, "card": card, "date": date, "commit": commit, "note": ""}
                records.append(rec)
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    rec["note"] = f"skipped: past the time budget of {budget_s:.0f} s"
                    continue
                _measure(rec, mode, variant, params, q, k, ref64, device, rep_ms, flops, peak)
                if device == "cuda" and variant.label in ("triton[fused]", "triton[split]"):
                    from ovss_fast.kernels.triton.sinkhorn_scores import choose_schedule

                    if variant.label == f"triton[{choose_schedule(B, N, C, q.device)}]":
                        rec["note"] += "; auto's choice today"
                log("  " + " | ".join(regime_row(rec)))
                if device == "cuda":
                    torch.cuda.empty_cache()
    return records


def _measure(rec: dict, mode: str, variant: Variant, params: dict[str, int], q: torch.Tensor, k: torch.Tensor,
             ref64: torch.Tensor, device: str, rep_ms: int, flops: float, peak: float | None) -> None:
    """Fill one record: correctness against ``ref64`` first, then the timings (or why it did not run)."""
    fn = _call(mode, variant, params)
    if isinstance(fn, str):
        rec["note"] = f"not run: {fn.splitlines()[0][:160]}"
        return
    if variant.backend not in ("reference", "compile"):
        reasons = get_backend(variant.backend).unsupported_reasons(rec["op"], (q, k), {})
        if reasons:
            rec["note"] = "not run: " + "; ".join(reasons)[:200]
            return
    try:
        with torch.no_grad():
            t1 = time.perf_counter()
            out = fn(q, k)
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t1
            err = rel_err(out, ref64)
            rec["rel_err"] = err
            rec["passed"] = bool(err <= variant.tol)
            if device == "cuda":
                ms, _ = time_gpu(lambda: fn(q, k), rep_ms)
                rec["graph_ms"] = _float_or_none(time_gpu_graph(lambda: fn(q, k), rep_ms))
            else:
                ms = statistics.median(_wall_ms(lambda: fn(q, k)) for _ in range(3))
        rec["median_ms"] = ms
        best = min(ms, rec["graph_ms"] or ms)
        rec["gflops"] = flops / (best * 1e-3) / 1e9
        if peak:
            rec["pct_fp32_peak"] = 100.0 * rec["gflops"] / (peak * 1e3)
        rec["note"] = f"first call {first:.1f} s" + ("" if rec["passed"] else f"; FAILS the {variant.tol:g} contract")
    except Exception as exc:  # a crash is a row saying so, not the end of the table
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        rec["note"] = f"failed: {type(exc).__name__}: {first_line}"
        rec["passed"] = False


def _wall_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


REGIME_COLUMNS = ["mode", "regime", "B", "N", "C", "backend", "rel. err", "median ms", "graph ms", "GFLOP/s",
                  "% fp32 peak", "x eager", "x compile", "note"]


def regime_row(rec: dict, eager_ms: float | None = None, compile_ms: float | None = None) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    def ratio(base: float | None) -> str:
        return "-" if base is None or rec["median_ms"] is None else f"{base / rec['median_ms']:.2f}"

    err = num(rec["rel_err"], ".1e") + ("" if rec["passed"] in (None, True) else " FAIL")
    return [rec["mode"], rec["regime"], str(rec["B"]), str(rec["N"]), str(rec["C"]), rec["backend"], err,
            num(rec["median_ms"], ".3f"), num(rec["graph_ms"], ".3f"), num(rec["gflops"], ".0f"),
            num(rec["pct_fp32_peak"], ".1f"), ratio(eager_ms), ratio(compile_ms), rec["note"]]


def regime_table(records: list[dict]) -> str:
    """Markdown table of the records; "x eager" / "x compile": the reference eager / torch.compile median
    of the row's shape and mode over the row's median (what a caller waits; GFLOP/s takes the better of
    the median and the graph replay, the kernels' own rate)."""
    def base(label: str) -> dict:
        return {(r["mode"], r["B"], r["N"], r["C"]): r["median_ms"] for r in records if r["backend"] == label}

    eager, compiled = base("reference eager"), base("torch.compile(reference)")
    rows = []
    for r in records:
        key = (r["mode"], r["B"], r["N"], r["C"])
        rows.append(regime_row(r, eager.get(key), compiled.get(key)))
    return markdown_table(REGIME_COLUMNS, rows)


def write_results_json(records: list[dict], path: Path | None = None) -> Path:
    """Append the records to bench/results_gpu.json (a JSON list; earlier runs' records are kept)."""
    path = path or RESULTS_JSON
    old: list = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = []
    path.write_text(json.dumps([*old, *records], indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="N=784 only, fewer repeats")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell on the CPU (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU run (1 gives steadier numbers on a shared machine)")
    p.add_argument("--no-write", action="store_true", help="print only; leave results.csv / RESULTS.md alone")
    p.add_argument("--smoke", action="store_true",
                   help="the regime table's machinery on the CPU at tiny shapes; writes only --json")
    p.add_argument("--json", default=None, help="write the regime records here (default on a GPU: "
                   "bench/results_gpu.json, appended)")
    p.add_argument("--budget-s", type=float, default=None, help="GPU: start no row after this many seconds")
    args = p.parse_args(argv)
    dev = args.device
    if args.smoke or dev == "cuda":
        return main_regimes(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes_n = SIZES_N[:1] if args.quick else SIZES_N
    repeats = 1 if args.quick else args.repeats
    card, vers = device_name(dev), versions()
    load = _load()
    print(f"device: {card}\nversions: {vers}")

    rows, table = [], []
    for N in sizes_n:
        for C in SIZES_C:
            q64, k64 = inputs(N, C, seed=N * 1000 + C, device=dev)
            q, k = q64.float(), k64.float()
            a, b = torch.randn(N, N, device=dev), torch.randn(N, C, device=dev)
            if dev == "cuda":
                mm_ms, _ = time_gpu(lambda a=a, b=b: torch.mm(a, b), 200)
            else:
                mm_ms = best_cpu_ms(lambda a=a, b=b: torch.mm(a, b))
            mm_rate = 2.0 * N * N * C / (mm_ms * 1e-3) / 1e9
            for mode in MODES:
                want = score_fns(mode, dev)
                ref64 = want["reference eager"](q64, k64)  # type: ignore[operator]
                flops = product_flops(mode, N, C)
                runnable = {}
                errs = {}
                for label, fn in want.items():
                    if isinstance(fn, str):
                        print(f"{mode} B=1 N={N} C={C} {label}: not run ({fn})")
                        table.append([mode, N, C, label, "-", "-", "-", "-", f"not run: {fn}"])
                        continue
                    err = rel_err(fn(q, k), ref64)
                    if not err <= TOL:
                        if label in ("cpu", "cuda", "triton"):
                            print(f"FAIL {mode} N={N} C={C} {label}: rel. error {err:.3g} > {TOL:g}", file=sys.stderr)
                            return 1
                        # the float32 reference is the baseline, not under test: its error is reported
                        print(f"note: {label} in float32 is itself {err:.3g} from the float64 reference")
                    runnable[label] = fn
                    errs[label] = err
                if dev == "cpu":
                    medians = time_cpu_interleaved({lb: (lambda fn=fn, q=q, k=k: fn(q, k))
                                                    for lb, fn in runnable.items()}, repeats)
                for label, fn in runnable.items():
                    shape = f"B=1 N={N} C={C}"
                    err = errs[label]
                    if dev == "cuda":
                        ms, mem = time_gpu(lambda fn=fn, q=q, k=k: fn(q, k), 500 if not args.quick else 100)
                    else:
                        ms = medians[label]
                        mem = peak_mem_mb("bench_discrepancy", {"N": N, "C": C, "mode": mode}, label)
                    rate = flops / (ms * 1e-3) / 1e9
                    frac = rate / mm_rate
                    print(f"{mode} {shape} {label:>26}: {ms:10.2f} ms  {mem:8.1f} MB  err {err:.1e}  "
                          f"{rate:6.1f} GFLOP/s = {frac:.0%} of torch.mm ({mm_rate:.1f} GFLOP/s)")
                    table.append([mode, N, C, label, f"{ms:.2f}", f"{mem:.1f}", f"{err:.1e}", f"{rate:.1f}",
                                  f"{frac:.0%} of {mm_rate:.1f}"])
                    rows.append({"date": now(), "bench": "bench_discrepancy", "device": card, "versions": vers,
                                 "op": "sinkhorn_scores" if mode == "op" else "markov_scores", "shape": shape,
                                 "dtype": "float32", "backend": label, "median_ms": f"{ms:.3f}",
                                 "peak_mem_mb": f"{mem:.1f}",
                                 "note": f"rel err {err:.1e}; {rate:.1f} GFLOP/s, {frac:.0%} of torch.mm "
                                         f"{mm_rate:.1f} GFLOP/s; load {_load()}"})
    header = ["mode", "N", "C", "backend", "median ms", "peak MB", "rel. err vs f64", "GFLOP/s (products)",
              "fraction of torch.mm GFLOP/s"]
    md = markdown_table(header, table)
    print(md)
    if not args.no_write:
        mem_note = ("resident-set growth during one call in a fresh process (bench/_ext_bench.py)" if dev == "cpu"
                    else "torch.cuda.max_memory_allocated above the baseline")
        end_load = _load()
        body = (f"`python -m bench.bench_discrepancy{' --quick' if args.quick else ''}` on **{card}**, {vers}; "
                f"{now()}; load average at the start {load}, at the end {end_load} (other jobs share the "
                "machine: on the CPU a busy core slows both columns alike).\n\n"
                f"B = 1, float32, kernel given; op: {ITERS} Sinkhorn iterations, eps {EPS}; mv: "
                f"{SK_ITERS} SK iterations, {STEPS} steps, integrated readout. Median of "
                f"{f'at least {repeats} runs and 2 s' if dev == 'cpu' else 'do_bench'}; "
                f"memory: {mem_note}. "
                f"Correctness checked first against the float64 reference (rel. error <= {TOL:g}; the "
                "reference eager rows show the float32 reference's own error, for comparison). "
                "The last column compares the rate of the products alone with torch.mm at [N, N] x [N, C] "
                "on the same machine (its fastest of 50 calls on the CPU).\n\n" + md)
        where = f"CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}" if dev == "cpu" \
            else "GPU"
        write_section(f"Discrepancy scores (op, mv) on {where}", body)
        append_rows(rows)
    return 0


def main_regimes(args: argparse.Namespace) -> int:
    """--smoke (CPU, tiny) or --device cuda: the regime table, its JSON records and RESULTS.md section."""
    dev = "cpu" if args.smoke else args.device
    card, vers = device_name(dev), versions()
    print(f"device: {card}\nversions: {vers}\ncommit: {git_commit()}")
    records = run_regimes(dev, quick=args.quick, smoke=args.smoke, rep_ms=50 if args.quick else 200,
                          budget_s=args.budget_s)
    md = regime_table(records)
    print(md)
    if args.json:
        write_results_json(records, Path(args.json))
    if not args.smoke and not args.no_write:
        if not args.json:
            write_results_json(records)
        write_section("Discrepancy regimes on GPU", regime_section(records, card, vers, args.quick))
    failed = [r for r in records if r["passed"] is False and "tf32x3" not in r["backend"]
              and r["backend"] not in ("reference eager", "torch.compile(reference)")]
    return 1 if failed else 0


def regime_section(records: list[dict], card: str, vers: str, quick: bool) -> str:
    peak = fp32_peak_tflops(card)
    return (f"`python -m bench.bench_discrepancy{' --quick' if quick else ''}` (or `bench.gpu_check`) on **{card}**, "
            f"{vers}; {now()}; commit {git_commit()}. float32, kernel given (symmetric, from gibbs_kernel; "
            f"Triton told so); op: {ITERS} Sinkhorn iterations; mv: {SK_ITERS} SK iterations, {STEPS} steps. "
            "median ms: triton.testing.do_bench; graph ms: CUDA-graph replay; GFLOP/s counts the products only, "
            "at the better of the two times; % fp32 peak against "
            f"{f'{peak:g} TFLOP/s (datasheet FMA rate)' if peak else 'no listed peak for this card'}. "
            "rel. err against float64 (contract 1e-4; tf32x3 rows are judged against it too).\n\n"
            + regime_table(records))


if __name__ == "__main__":
    sys.exit(main())
