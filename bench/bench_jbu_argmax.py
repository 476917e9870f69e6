"""CPU benchmark: jbu_argmax, the fused compiled CPU kernel vs the PyTorch reference
(jbu_upsample to [B, C, H, W], then argmax).

Shapes: B = 1, scores 32 x 32 with C in {21, 171}, guide 512 x 512 and 1024 x 1024;
sigma_s 1, sigma_r 0.1, radius 2. Correctness before timing: at 512 x 512 the fused
labels are compared with the float32 reference's upsampled scores (identical labels
except at near-ties); at 1024 x 1024 with the reference's labels from the timed run.
The reference takes seconds to minutes here, so it is timed over whole runs.
Run: ``python -m bench.bench_jbu_argmax`` (about 10 minutes on 2 cores, 5 GiB free memory).
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

NAME = "jbu_argmax"
CASES = [{"B": 1, "C": c, "h": 32, "w": 32, "H": s, "W": s} for s in (512, 1024) for c in (21, 171)]
BACKENDS = ("reference", "cpu")
KW = {"sigma_spatial": 1.0, "sigma_range": 0.1, "radius": 2}


def make_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # smooth-ish scores and a guide with regions, like an upsampled segmentation problem
    scores = torch.nn.functional.avg_pool2d(torch.randn(case["B"], case["C"], case["h"] + 2, case["w"] + 2,
                                                        generator=g), 3, stride=1)
    guide = torch.nn.functional.interpolate(torch.rand(case["B"], 3, 16, 16, generator=g),
                                            size=(case["H"], case["W"]), mode="bilinear", align_corners=False)
    guide = (guide + 0.02 * torch.rand(guide.shape, generator=g)).clamp(0, 1)
    return scores, guide


def run(inputs, backend: str) -> torch.Tensor:
    scores, guide = inputs
    impl = R if backend == "reference" else CPU_BACKEND
    return impl.jbu_argmax(scores, guide, **KW)


def check_near_ties(inputs, labels: torch.Tensor, tol: float = 1e-4) -> int:
    """Labels that differ from the float32 reference outside its near-ties (must be 0); returns all differences."""
    up = R.jbu_upsample(*inputs, **KW)
    ref = up.argmax(dim=1)
    differ = labels != ref
    if bool(differ.any()):
        top2 = up.topk(2, dim=1).values
        close = (top2[:, 0] - top2[:, 1]).abs() <= tol * up.abs().max()
        assert bool(close[differ].all()), "labels differ outside near-ties"
    return int(differ.sum())


def main() -> None:
    rows, table = [], []
    for case in CASES:
        inputs = make_inputs(case)
        shape = f"B={case['B']} C={case['C']} {case['h']}x{case['w']} -> {case['H']}x{case['W']}"
        labels = run(inputs, "cpu")
        if case["H"] <= 512:
            mismatches = check_near_ties(inputs, labels)
        ms = {"cpu": eb.median_ms(lambda x=inputs: run(x, "cpu"), slow_runs=3)}
        ref_labels: list[torch.Tensor] = []
        ms["reference"] = eb.median_ms(lambda x=inputs, out=ref_labels: out.append(run(x, "reference")), slow_runs=1)
        if case["H"] > 512:
            mismatches = int((ref_labels[0] != labels).sum())
            assert mismatches <= 1e-4 * labels.numel(), f"{mismatches} labels differ from the reference"
        peak = {b: eb.peak_mem_mb("bench_jbu_argmax", case, b) for b in BACKENDS}
        for b in BACKENDS:
            rows.append({"date": now(), "bench": NAME, "device": device_name("cpu"), "op": NAME, "dtype": "float32",
                         "versions": f"{versions()}, ovss_fast {eb.commit()}",
                         "shape": shape, "backend": b, "median_ms": f"{ms[b]:.1f}", "peak_mem_mb": f"{peak[b]:.1f}",
                         "note": f"{mismatches} labels differ from the reference; "
                                 f"load {eb.load_average()}"})
        table.append([shape, f"{ms['reference']:.0f}", f"{ms['cpu']:.0f}", f"{ms['reference'] / ms['cpu']:.1f}x",
                      f"{peak['reference']:.0f}", f"{peak['cpu']:.1f}",
                      f"{peak['cpu'] / max(peak['reference'], 1e-9):.4f}", str(mismatches)])
        print(table[-1], flush=True)
    append_rows(rows)
    body = (f"{now()}; {device_name('cpu')}; {versions()}, ovss_fast {eb.commit()}; "
            f"load average at the end {eb.load_average()}.\n\n"
            "float32, radius 2 (25 taps), sigma_s 1, sigma_r 0.1. Reference = jbu_upsample then argmax "
            "(holds [B, C, H, W] and its temporaries); cpu = the fused kernel (running best class per pixel). "
            "Time: median of 3 runs (cpu), 1 run (reference). Peak = resident-set growth during one call "
            "in a fresh process (inputs excluded).\n\n"
            + markdown_table(["shape", "reference ms", "cpu ms", "speed-up", "reference peak MiB",
                                 "cpu peak MiB", "peak ratio cpu/ref", "labels differing"], table))
    write_section("jbu_argmax on CPU", body)


if __name__ == "__main__":
    main()
