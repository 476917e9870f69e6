"""CPU benchmark: gibbs_kernel, compiled CPU backend vs the PyTorch reference (eager).

Shapes: B = 1, N in {784, 1024, 2304}; affinity = rand^3 (non-negative, not symmetric);
eps 0.1. Correctness (float32 vs the float64 reference, rel. error <= 1e-4 on cost and
kernel) is checked before timing. Run: ``python -m bench.bench_gibbs_kernel``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import torch  # noqa: E402

from bench import _ext_bench as eb  # noqa: E402
from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section  # noqa: E402
from ovss_fast import reference as R  # noqa: E402
from ovss_fast._ext_backend import CPU_BACKEND  # noqa: E402

NAME = "gibbs_kernel"
CASES = [{"B": 1, "N": n} for n in (784, 1024, 2304)]
BACKENDS = ("reference", "cpu")


def make_inputs(case: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(case["B"], case["N"], case["N"], generator=g) ** 3


def run(affinity, backend: str):
    impl = R if backend == "reference" else CPU_BACKEND
    return impl.gibbs_kernel(affinity, eps=0.1)


def check(affinity) -> float:
    rc, rk = R.gibbs_kernel(affinity.double(), eps=0.1)
    cost, kern = run(affinity, "cpu")
    err = max(float((cost.double() - rc).abs().max() / rc.abs().max()),
              float((kern.double() - rk).abs().max() / rk.abs().max()))
    assert err <= 1e-4, f"rel. error {err:.2e} > 1e-4"
    return err


def main() -> None:
    rows, table = [], []
    for case in CASES:
        affinity = make_inputs(case)
        err = check(affinity)
        shape = f"B={case['B']} N={case['N']}"
        ms = {b: min(eb.median_ms(lambda b=b, x=affinity: run(x, b)) for _ in range(2)) for b in BACKENDS}
        peak = {b: eb.peak_mem_mb("bench_gibbs_kernel", case, b) for b in BACKENDS}
        for b in BACKENDS:
            rows.append({"date": now(), "bench": NAME, "device": device_name("cpu"), "op": NAME, "dtype": "float32",
                         "versions": f"{versions()}, ovss_fast {eb.commit()}",
                         "shape": shape, "backend": b, "median_ms": f"{ms[b]:.3f}", "peak_mem_mb": f"{peak[b]:.1f}",
                         "note": f"rel err {err:.1e}; load {eb.load_average()}"})
        table.append([shape, f"{ms['reference']:.2f}", f"{ms['cpu']:.2f}", f"{ms['reference'] / ms['cpu']:.2f}x",
                      f"{peak['reference']:.1f}", f"{peak['cpu']:.1f}", f"{err:.1e}"])
        print(table[-1], flush=True)
    append_rows(rows)
    body = (f"{now()}; {device_name('cpu')}; {versions()}, ovss_fast {eb.commit()}; "
            f"load average at the end {eb.load_average()}.\n\n"
            "float32, eps 0.1; outputs (cost, kernel) are 2 x N^2 floats in both backends. Median wall time "
            "(torch.utils.benchmark, best of two blocked_autorange medians); peak = resident-set growth during "
            "one call in a fresh process.\n\n"
            + markdown_table(["shape", "reference ms", "cpu ms", "speed-up", "reference peak MiB",
                                 "cpu peak MiB", "cpu rel. err"], table))
    write_section("gibbs_kernel on CPU", body)


if __name__ == "__main__":
    main()
