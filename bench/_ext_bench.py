"""Helpers for the benchmarks (bench/bench_class_distributions.py, bench/gpu_check.py,
bench/bench_gibbs_kernel.py, bench/bench_jbu_argmax.py).

- timing: ``torch.utils.benchmark`` (blocked_autorange) median, or a median of whole
  runs for calls that take seconds;
- peak memory: each (case, backend) runs once in a fresh subprocess; the peak is
  the resident set's high-water mark during the call minus the resident set just
  before it (VmHWM is reset through /proc/self/clear_refs where the kernel allows,
  else the lifetime peak is used, which can only over-count). So that memory freed
  earlier in the process (input construction) cannot hide the call's allocations,
  the subprocess runs with glibc's MALLOC_MMAP_THRESHOLD_=128 KiB (large blocks are
  mapped and unmapped, never cached in the heap) and malloc_trim(0) runs first;
- rows go to bench/results.csv and tables to bench/RESULTS.md through bench/_results_io.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        out = ""
    return out or "?"


def median_ms(fn: Callable[[], object], *, min_run_time: float = 1.0, slow_runs: int = 0) -> float:
    """Median wall time of fn() in ms. slow_runs > 0: that many whole runs (for calls of seconds)."""
    if slow_runs > 0:
        times = []
        for _ in range(slow_runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        times.sort()
        return 1e3 * times[len(times) // 2]
    from torch.utils import benchmark

    fn()  # warm-up
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return 1e3 * m.median


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(fn: Callable[[], object]) -> float:
    """Peak resident-set growth (MiB) while fn() runs, in this process."""
    import gc

    gc.collect()
    try:  # hand freed heap memory back, so reusing it cannot hide new allocations
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM")
    del out
    return max(0, peak - before) / 1024.0


def peak_mem_mb(module: str, case: dict, backend: str) -> float:
    """Peak growth (MiB) of ``bench.<module>.run(make_inputs(case), backend)`` in a fresh interpreter."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import importlib; "
        f"from bench import _ext_bench as eb; m = importlib.import_module('bench.' + {module!r}); "
        f"inputs = m.make_inputs(json.loads({json.dumps(case)!r})); "
        f"print('PEAK', eb.measure_peak_here(lambda: m.run(inputs, {backend!r})))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False, env=env)
    match = re.search(r"PEAK ([0-9.eE+-]+)", res.stdout)
    if not match:
        raise RuntimeError(f"peak-memory subprocess failed:\n{res.stdout}\n{res.stderr}")
    return float(match.group(1))


def compare_with_reference(*, name: str, module: str, cases: list[dict], make_inputs: Callable[[dict], object],
                           run: Callable[[object, str], object], check: Callable[[object], float],
                           shape_of: Callable[[dict], str], method: str) -> None:
    """Time ``run(inputs, backend)`` for the reference and the compiled CPU backend on each case.

    ``check(inputs)`` returns the float32 error against float64 (and asserts the tolerance)
    before anything is timed; each backend's peak memory is measured in a fresh process.
    Rows go to bench/results.csv and a table, under ``f"{name} on CPU"``, to bench/RESULTS.md.
    """
    from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section

    backends = ("reference", "cpu")
    rows, table = [], []
    for case in cases:
        inputs = make_inputs(case)
        err = check(inputs)
        shape = shape_of(case)
        ms = {b: min(median_ms(lambda b=b, x=inputs: run(x, b)) for _ in range(2)) for b in backends}
        peak = {b: peak_mem_mb(module, case, b) for b in backends}
        for b in backends:
            rows.append({"date": now(), "bench": name, "device": device_name("cpu"), "op": name, "dtype": "float32",
                         "versions": f"{versions()}, ovss_fast {commit()}",
                         "shape": shape, "backend": b, "median_ms": f"{ms[b]:.3f}", "peak_mem_mb": f"{peak[b]:.1f}",
                         "note": f"rel err {err:.1e}; load {load_average()}"})
        table.append([shape, f"{ms['reference']:.2f}", f"{ms['cpu']:.2f}", f"{ms['reference'] / ms['cpu']:.2f}x",
                      f"{peak['reference']:.1f}", f"{peak['cpu']:.1f}", f"{err:.1e}"])
        print(table[-1], flush=True)
    append_rows(rows)
    body = (f"{now()}; {device_name('cpu')}; {versions()}, ovss_fast {commit()}; "
            f"load average at the end {load_average()}.\n\n"
            f"{method} Median wall time (torch.utils.benchmark, best of two blocked_autorange medians); "
            "peak = resident-set growth during one call in a fresh process.\n\n"
            + markdown_table(["shape", "reference ms", "cpu ms", "speed-up", "reference peak MiB",
                              "cpu peak MiB", "cpu rel. err"], table))
    write_section(f"{name} on CPU", body)


def time_gpu(fn: Callable[[], object], rep_ms: int) -> tuple[float, float]:
    """(median ms from triton.testing.do_bench, peak allocated above the baseline in MB)."""
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
    return float(ms), peak


def time_gpu_graph(fn: Callable[[], object], rep_ms: int) -> str:
    """Median ms of CUDA-graph replays of ``fn`` (the device time without Python launch
    overhead), formatted; or why ``fn`` cannot be captured (it synchronises, say)."""
    import torch
    import triton.testing

    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception as exc:  # capture refuses host syncs and some allocator calls
        torch.cuda.synchronize()
        return f"not capturable ({type(exc).__name__})"
    return f"{ms:.3f}"
