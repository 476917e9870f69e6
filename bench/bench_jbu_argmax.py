"""CPU benchmarks of jbu_argmax / jbu_upsample (method.md section 4).

Default (issue 21): the kernels before and after the class-last matrix-product rewrite
(csrc/cpu/jbu_cpu.h), at the protocol image sizes, in ONE run: the old build is a copy of
an earlier ``ovss_fast/kernels/_C*.so`` (``--old-so``, default /tmp/jbu_old/_C.abi3.so), loaded with
torch.ops.load_library in its own worker process; the new one is this checkout's build in a
second worker; requests alternate old / new (A B A B), medians over ``--reps`` rounds.
Beside them, kornia.filters.joint_bilateral_blur (a same-resolution filter, see KORNIA_NOTE).
Results are checked: new vs the float64 reference (upsample rel. error, labels except
near-ties) and new vs old labels. Run: ``python -m bench.bench_jbu_argmax`` (a few minutes).

``--vs-reference``: the older table, the fused kernel vs the PyTorch reference
(jbu_upsample to [B, C, H, W], then argmax).

Shapes: B = 1, scores 32 x 32 with C in {21, 171}, guide 512 x 512 and 1024 x 1024;
sigma_s 1, sigma_r 0.1, radius 2. Correctness before timing: at 512 x 512 the fused
labels are compared with the float32 reference's upsampled scores (identical labels
except at near-ties); at 1024 x 1024 with the reference's labels from the timed run.
The reference takes seconds to minutes here, so it is timed over whole runs.
Run: ``python -m bench.bench_jbu_argmax --vs-reference`` (about 10 minutes on 2 cores, 5 GiB free memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import time  # noqa: E402

import torch  # noqa: E402

from bench import _ext_bench as eb  # noqa: E402
from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section  # noqa: E402

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
    from ovss_fast.kernels import reference as R
    from ovss_fast.kernels.extension import CPU_BACKEND

    scores, guide = inputs
    impl = R if backend == "reference" else CPU_BACKEND
    return impl.jbu_argmax(scores, guide, **KW)


def check_near_ties(inputs, labels: torch.Tensor, tol: float = 1e-4) -> int:
    """Labels that differ from the float32 reference outside its near-ties (must be 0); returns all differences."""
    from ovss_fast.kernels import reference as R

    up = R.jbu_upsample(*inputs, **KW)
    ref = up.argmax(dim=1)
    differ = labels != ref
    if bool(differ.any()):
        top2 = up.topk(2, dim=1).values
        close = (top2[:, 0] - top2[:, 1]).abs() <= tol * up.abs().max()
        assert bool(close[differ].all()), "labels differ outside near-ties"
    return int(differ.sum())


def main_vs_reference() -> None:
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


# --------------------------------------------------------------------------- issue 21: before / after
# the benchmarks' image sizes: VOC (C = 21, 21 x 28 tokens -> 375 x 500), COCO-Stuff-like
# (C = 171, 28 x 37 -> 480 x 640), Cityscapes (C = 19, 35 x 70 -> 1024 x 2048)
PROTOCOL = [{"B": 1, "C": 21, "h": 21, "w": 28, "H": 375, "W": 500},
            {"B": 1, "C": 171, "h": 28, "w": 37, "H": 480, "W": 640},
            {"B": 1, "C": 19, "h": 35, "w": 70, "H": 1024, "W": 2048}]
OLD_SO = "/tmp/jbu_old/_C.abi3.so"
# the same old source built with -fopenmp (setup.py has it since; before, at::parallel_for ran on one thread)
OLD_OMP_SO = "/tmp/jbu_old_omp/_C.abi3.so"
KORNIA_NOTE = ("kornia = kornia.filters.joint_bilateral_blur(up, guide, kernel_size=5, sigma_color=0.1, "
               "sigma_space=(1, 1), color_distance_type='l2') on up = the scores bilinearly resized to H x W "
               "beforehand (not timed): a same-resolution 5 x 5 filter at full resolution, i.e. a different "
               "(smaller-footprint) operation than JBU's 5 x 5 low-res taps, with no argmax; shown for scale only")


def _shape(case: dict) -> str:
    return f"B={case['B']} C={case['C']} {case['h']}x{case['w']} -> {case['H']}x{case['W']}"


def worker(variant: str, old_so: str) -> None:
    """Serve timing requests on stdin (one JSON line each): an old build (load_library) or this checkout's."""
    if variant != "new":
        torch.ops.load_library(old_so)  # registers the ops; ovss_fast is not imported here
    else:
        import ovss_fast.kernels._C  # noqa: F401
    ops = torch.ops.ovss_fast
    inputs: dict[int, tuple] = {}
    print(json.dumps({"ready": variant, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        i = req["case"]
        if i not in inputs:
            inputs[i] = make_inputs(PROTOCOL[i])
        scores, guide = inputs[i]
        a = (KW["sigma_spatial"], KW["sigma_range"], KW["radius"])
        if req["op"] == "kornia":
            import kornia

            up = torch.nn.functional.interpolate(scores, size=guide.shape[-2:], mode="bilinear", align_corners=False)
            fn, args = kornia.filters.joint_bilateral_blur, (up, guide, 5, 0.1, (1.0, 1.0))
            kwargs = {"color_distance_type": "l2"}
        else:
            fn, args, kwargs = getattr(ops, req["op"]), (scores, guide, *a), {}
        times = []
        out = None
        for _ in range(req["runs"]):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times.append(1e3 * (time.perf_counter() - t0))
        if req.get("save"):
            torch.save(out, req["save"])
        print(json.dumps({"ms": times}), flush=True)


class _Worker:
    def __init__(self, variant: str, old_so: str):
        self.p = subprocess.Popen([sys.executable, "-m", "bench.bench_jbu_argmax", "--worker", variant,
                                   "--old-so", old_so], cwd=str(Path(__file__).resolve().parents[1]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())

    def ask(self, **req) -> list[float]:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.info} died on {req}")
        return json.loads(line)["ms"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _checks(i: int, tmp: str) -> str:
    """New vs the float64 reference (upsample rel. error, labels off near-ties) and new vs old labels."""
    from ovss_fast.kernels import reference as R

    scores, guide = make_inputs(PROTOCOL[i])
    ref = R.jbu_upsample(scores.double(), guide.double(), **KW)
    up = torch.load(os.path.join(tmp, f"new_jbu_upsample_{i}.pt"))
    fin = torch.isfinite(ref)
    rel = float((up.double() - ref)[fin].abs().max() / ref[fin].abs().max())
    assert rel <= 1e-4, f"jbu_upsample rel. error {rel:.2e} > 1e-4"
    labels = torch.load(os.path.join(tmp, f"new_jbu_argmax_{i}.pt"))
    old_labels = torch.load(os.path.join(tmp, f"old_jbu_argmax_{i}.pt"))
    ref_labels = ref.argmax(dim=1)
    differ = labels != ref_labels
    if bool(differ.any()):
        top2 = ref.topk(2, dim=1).values
        close = (top2[:, 0] - top2[:, 1]).abs() <= 1e-4 * ref[fin].abs().max()
        assert bool(close[differ].all()), "labels differ from the reference outside near-ties"
    del ref
    return (f"rel {rel:.1e}; {int(differ.sum())} labels differ from the reference (near-ties); "
            f"{int((labels != old_labels).sum())} from old")


def main_before_after(old_so: str, reps: int, with_kornia: bool, check: bool, old_omp_so: str = "") -> None:
    if not Path(old_so).exists():
        raise SystemExit(f"--old-so {old_so} does not exist: copy the earlier build's ovss_fast/kernels/_C*.so there")
    workers = {"old": _Worker("old", old_so)}
    if old_omp_so and Path(old_omp_so).exists():
        workers["oldomp"] = _Worker("oldomp", old_omp_so)
    workers["new"] = _Worker("new", old_so)
    variants = list(workers)
    # kornia in a process of its own: its multi-GB temporaries would otherwise shape the new
    # build's memory (page and huge-page availability) between its timed calls
    side = _Worker("new", old_so) if with_kornia else None
    tmp = tempfile.mkdtemp(prefix="bench_jbu_")
    ops = ("jbu_argmax", "jbu_upsample")
    table, rows = [], []
    load_start = eb.load_average()
    try:
        for i, case in enumerate(PROTOCOL):
            ms = {(v, op): [] for v in variants for op in ops}
            ms[("kornia", "kornia")] = []
            for v, w in workers.items():  # warm-up (and inputs), results saved for the checks
                for op in ops:
                    w.ask(case=i, op=op, runs=1, save=os.path.join(tmp, f"{v}_{op}_{i}.pt"))
            for r in range(reps):
                order = variants if r % 2 == 0 else variants[::-1]  # A B C C B A ...
                for op in ops:
                    for v in order:
                        ms[(v, op)] += workers[v].ask(case=i, op=op, runs=1)
                if with_kornia and r < max(1, reps // 2):
                    ms[("kornia", "kornia")] += side.ask(case=i, op="kornia", runs=1)
            note = _checks(i, tmp) if check else "not checked"
            med = {k: _median(t) for k, t in ms.items() if t}
            kornia_ms = f"{med[('kornia', 'kornia')]:.0f}" if ("kornia", "kornia") in med else "-"
            for op in ops:
                o, n = med[("old", op)], med[("new", op)]
                mid = ([f"{med[('oldomp', op)]:.0f}", f"{med[('oldomp', op)] / n:.1f}x"]
                       if "oldomp" in workers else [])
                table.append([_shape(case), op, f"{o:.0f}", *mid, f"{n:.1f}", f"{o / n:.1f}x", kornia_ms, note])
                for v in variants:
                    rows.append({"date": now(), "bench": NAME + " before/after", "device": device_name("cpu"),
                                 "op": op, "dtype": "float32", "versions": f"{versions()}, ovss_fast {eb.commit()}",
                                 "shape": _shape(case), "backend": f"cpu {v}", "median_ms": f"{med[(v, op)]:.1f}",
                                 "peak_mem_mb": "", "note": f"{len(ms[(v, op)])} runs; load {eb.load_average()}"})
                print(table[-1], flush=True)
    finally:
        for w in [*workers.values(), *([side] if side else [])]:
            w.close()
    append_rows(rows)
    mid_head = ["old+OpenMP ms", "new vs old+OpenMP"] if "oldomp" in workers else []
    mid_text = ("old+OpenMP = the same old source built with -fopenmp (`--old-omp-so`): before, the extension was "
                "built without it and at::parallel_for ran every CPU kernel on one thread; this column separates "
                "the kernel rewrite from the threads. " if "oldomp" in workers else "")
    body = (f"{now()}; {device_name('cpu')}; {versions()}, ovss_fast "
            f"{eb.commit()}; load average (1, 5, 15 min) at the start {load_start}, at the end "
            f"{eb.load_average()}.\n\n"
            "float32, B = 1, radius 2 (25 taps), sigma_s 1, sigma_r 0.1; scores smooth random, guide a smooth "
            "random image (bench/bench_jbu_argmax.py make_inputs). old = the per-pixel kernel before issue 21 "
            f"as it was built then (a copy of an earlier build, `--old-so`); {mid_text}new = this checkout's. "
            f"Median of {reps} calls each, the builds alternated call by call in their own worker processes. "
            f"{KORNIA_NOTE}. Checks: new jbu_upsample vs the float64 reference (max rel. error), new labels vs "
            "the reference's argmax (differences must be near-ties), new vs old labels.\n\n"
            "Run: `python -m bench.bench_jbu_argmax` (`--old-so PATH`, `--old-omp-so PATH`, `--reps N`).\n\n"
            + markdown_table(["shape", "op", "old ms", *mid_head, "new ms", "speed-up", "kornia ms", "checks"],
                             table))
    write_section("jbu_argmax / jbu_upsample on CPU: before / after the class-last rewrite (issue 21)", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vs-reference", action="store_true", help="the older fused-vs-reference table")
    ap.add_argument("--old-so", default=OLD_SO, help="the earlier build of ovss_fast/kernels/_C*.so")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-kornia", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--old-omp-so", default=OLD_OMP_SO,
                    help="the old source built with -fopenmp (a third column when the file exists)")
    ap.add_argument("--worker", choices=("old", "oldomp", "new"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.old_so)
    elif args.vs_reference:
        main_vs_reference()
    else:
        main_before_after(args.old_so, args.reps, not args.no_kornia, not args.no_check, args.old_omp_so)


if __name__ == "__main__":
    main()
