"""CPU benchmark: class_distributions, compiled CPU backend vs the PyTorch reference (eager).

Shapes: B = 1, D = 512, N in {784, 1024, 2304} (28^2, 32^2, 48^2 patches), C in {21, 171};
scale 100, no NMS. Correctness (float32 vs the float64 reference, rel. error <= 1e-4) is
checked before timing. Run: ``python -m bench.bench_class_distributions``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import torch  # noqa: E402

from bench import _ext_bench as eb  # noqa: E402
from ovss_fast.kernels import reference as R  # noqa: E402
from ovss_fast.kernels.extension import CPU_BACKEND  # noqa: E402

NAME = "class_distributions"
CASES = [{"B": 1, "N": n, "C": c, "D": 512} for n in (784, 1024, 2304) for c in (21, 171)]


def make_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(case["B"], case["N"], case["D"], generator=g)
    text = torch.randn(case["C"], case["D"], generator=g)
    return feats, text


def run(inputs, backend: str) -> torch.Tensor:
    feats, text = inputs
    impl = R if backend == "reference" else CPU_BACKEND
    return impl.class_distributions(feats, text, scale=100.0, nms=0.0)


def check(inputs) -> float:
    feats, text = inputs
    ref = R.class_distributions(feats.double(), text.double(), scale=100.0, nms=0.0)
    err = float((run(inputs, "cpu").double() - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4, f"rel. error {err:.2e} > 1e-4"
    return err


def main() -> None:
    eb.compare_with_reference(
        name=NAME, module="bench_class_distributions", cases=CASES, make_inputs=make_inputs, run=run, check=check,
        shape_of=lambda c: f"B={c['B']} N={c['N']} C={c['C']} D={c['D']}", method="float32, scale 100, no NMS.")


if __name__ == "__main__":
    main()
