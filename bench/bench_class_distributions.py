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
from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section  # noqa: E402
from ovss_fast import reference as R  # noqa: E402
from ovss_fast._ext_backend import CPU_BACKEND  # noqa: E402

NAME = "class_distributions"
CASES = [{"B": 1, "N": n, "C": c, "D": 512} for n in (784, 1024, 2304) for c in (21, 171)]
BACKENDS = ("reference", "cpu")


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
    rows, table = [], []
    for case in CASES:
        inputs = make_inputs(case)
        err = check(inputs)
        shape = f"B={case['B']} N={case['N']} C={case['C']} D={case['D']}"
        ms = {b: min(eb.median_ms(lambda b=b, x=inputs: run(x, b)) for _ in range(2)) for b in BACKENDS}
        peak = {b: eb.peak_mem_mb("bench_class_distributions", case, b) for b in BACKENDS}
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
            "float32, scale 100, no NMS. Median wall time (torch.utils.benchmark, best of two blocked_autorange "
            "medians); peak = resident-set growth during one call in a fresh process.\n\n"
            + markdown_table(["shape", "reference ms", "cpu ms", "speed-up", "reference peak MiB",
                                 "cpu peak MiB", "cpu rel. err"], table))
    write_section("class_distributions on CPU", body)


if __name__ == "__main__":
    main()
