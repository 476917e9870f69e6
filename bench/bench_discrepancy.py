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
bench/RESULTS.md ("Discrepancy scores (op, mv) on CPU" or "... on GPU").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ovss_fast import reference as R
from ovss_fast._backends import UnavailableBackend, get_backend

from ._ext_bench import peak_mem_mb, time_gpu
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


def product_flops(mode: str, N: int, C: int) -> float:
    if mode == "op":
        return (2 * ITERS + 1) * 2.0 * N * N * C
    return STEPS * 2.0 * N * N * C + SK_ITERS * 4.0 * N * N


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="N=784 only, fewer repeats")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell on the CPU (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU run (1 gives steadier numbers on a shared machine)")
    p.add_argument("--no-write", action="store_true", help="print only; leave results.csv / RESULTS.md alone")
    args = p.parse_args(argv)
    dev = args.device
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


if __name__ == "__main__":
    sys.exit(main())
