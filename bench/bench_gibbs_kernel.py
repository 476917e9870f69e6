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
from ovss_fast.kernels import reference as R  # noqa: E402
from ovss_fast.kernels.extension import CPU_BACKEND  # noqa: E402

NAME = "gibbs_kernel"
CASES = [{"B": 1, "N": n} for n in (784, 1024, 2304)]


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
    eb.compare_with_reference(
        name=NAME, module="bench_gibbs_kernel", cases=CASES, make_inputs=make_inputs, run=run, check=check,
        shape_of=lambda c: f"B={c['B']} N={c['N']}",
        method="float32, eps 0.1; outputs (cost, kernel) are 2 x N^2 floats in both backends.")


if __name__ == "__main__":
    main()
