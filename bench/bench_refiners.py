"""Refiners: ovss_fast.pamr (cpu backend and the reference) against NACLIP's PAMR module, on this CPU.

    python -m bench.bench_refiners [--naclip PATH] [--smoke] [--out DIR]

Correctness first (small inputs: every implementation against our float64 reference; NACLIP's module
run in float64 too), then each timing / peak-memory measurement in its own subprocess: peak RSS growth
over the inputs (VmHWM reset through /proc/self/clear_refs, read from /proc/self/status) and the median
time. Sizes: C = 21 at 375 x 500 and C = 171 at 480 x 640 (NACLIP's module where it fits in memory),
ours at C = 171 1024 x 2048 with the peers' computed requirement ([B, C, P, H, W] float32 bytes) beside
it. NACLIP's module is imported at run time from a checkout (``--naclip`` or OVSS_FAST_NACLIP; never
committed here). Writes the "Refiners: PAMR" section of bench/RESULTS.md and rows of bench/results.csv
(``--out`` elsewhere; ``--smoke``: tiny sizes, for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section  # noqa: E402

ITERS, DILATIONS = 10, (8, 16)  # NACLIP's default
SIZES = [(21, 375, 500), (171, 480, 640)]
BIG = (171, 1024, 2048)
SMOKE_SIZES = [(3, 24, 32), (5, 30, 41)]
SMOKE_BIG = (4, 40, 64)
GIB = 1 << 30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def unfold_bytes(C: int, H: int, W: int, B: int = 1, dilations=DILATIONS) -> int:
    """The peers' [B, C, P, H, W] float32 tensor (one of them; their step holds it and its product with A)."""
    return B * C * 8 * len(dilations) * H * W * 4


def inputs(C: int, H: int, W: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-size logits (NACLIP resizes them to the image before PAMR) and a normalised-looking image."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, C, H, W, generator=g)
    image = torch.randn(1, 3, H, W, generator=g)
    return scores, image


def _naclip_module(path: str):
    sys.path.insert(0, path)
    try:
        from pamr import PAMR
    finally:
        sys.path.remove(path)
    return PAMR


def runner(impl: str, naclip: str | None):
    import ovss_fast

    if impl == "naclip":
        module = _naclip_module(naclip)(ITERS, list(DILATIONS))
        return lambda s, im: module(im, s)
    return lambda s, im: ovss_fast.pamr(s, im, iters=ITERS, dilations=DILATIONS, backend=impl)


# --------------------------------------------------------------------------- one measurement per process
def worker(impl: str, size: str, reps: int, naclip: str | None, save: str | None) -> None:
    C, H, W = (int(v) for v in size.split(","))
    run = runner(impl, naclip)
    with torch.no_grad():
        run(*inputs(2, 20, 24, seed=1))  # libraries loaded, pools warm
        scores, image = inputs(C, H, W)
        base = _status("VmRSS")
        exact = _reset_peak()
        t0 = time.perf_counter()
        out = run(scores, image)
        times = [time.perf_counter() - t0]
        peak = _status("VmHWM") - base
        for _ in range(reps - 1):
            del out
            t0 = time.perf_counter()
            out = run(scores, image)
            times.append(time.perf_counter() - t0)
    if save:
        torch.save(out, save)
    times.sort()
    print(json.dumps({"median_s": times[len(times) // 2], "times_s": times, "peak_bytes": peak,
                      "peak_exact": exact, "out_bytes": out.numel() * out.element_size()}))


def measure(impl: str, size: tuple[int, int, int], reps: int, naclip: str | None, save: str | None,
            timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_refiners", "--worker", impl, "--size", ",".join(map(str, size)),
           "--reps", str(reps)]
    if naclip:
        cmd += ["--naclip", naclip]
    if save:
        cmd += ["--save", save]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {timeout:.0f} s (stopped)"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- correctness
def correctness(naclip: str | None) -> list[list[object]]:
    import ovss_fast
    from ovss_fast.kernels import reference as R

    rows = []
    cases = [((2, 5, 9, 12), (2, 3, 37, 45), 10, (8, 16)), ((1, 3, 8, 10), (1, 1, 33, 41), 50, (1, 2, 4, 8, 12, 24)),
             ((1, 4, 3, 4), (1, 3, 7, 12), 10, (8, 16))]
    for ss, ish, iters, dil in cases:
        g = torch.Generator().manual_seed(7)
        s64 = torch.randn(ss, generator=g, dtype=torch.float64)
        im64 = torch.randn(ish, generator=g, dtype=torch.float64)
        ref = R.pamr(s64, im64, iters=iters, dilations=dil)
        scale = ref.abs().max()
        got = {}
        for backend in ("cpu", "reference"):
            for dt in (torch.float32, torch.float64):
                out = ovss_fast.pamr(s64.to(dt), im64.to(dt), iters=iters, dilations=dil, backend=backend)
                got[f"{backend} {str(dt)[6:]}"] = float((out.double() - ref).abs().max() / scale)
        if naclip:
            PAMR = _naclip_module(naclip)
            got["NACLIP float32"] = float((PAMR(iters, list(dil))(im64.float(), s64.float()).double() - ref)
                                          .abs().max() / scale)
            before = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)  # their affinity buffer takes the default dtype
            try:
                got["NACLIP float64"] = float((PAMR(iters, list(dil))(im64, s64) - ref).abs().max() / scale)
            finally:
                torch.set_default_dtype(before)
        shape = f"scores {list(ss)}, image {list(ish)}, iters {iters}, dilations {list(dil)}"
        rows.append([shape, "; ".join(f"{k} {v:.1e}" for k, v in got.items())])
        for key, err in got.items():
            limit = 1e-12 if key.endswith("float64") else (2e-5 if key.startswith(("reference", "NACLIP")) else 1e-5)
            if err > limit:
                raise SystemExit(f"correctness check failed: {key} rel. err {err:.2e} > {limit:.0e} on {shape}")
    return rows


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--naclip", default=os.environ.get("OVSS_FAST_NACLIP"), help="a NACLIP checkout (its pamr.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md and results.csv go (default bench/)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds one measurement of the reference or NACLIP's module may take")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.reps, args.naclip, args.save)
        return
    out_dir = args.out or Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes, big = (SMOKE_SIZES, SMOKE_BIG) if args.smoke else (SIZES, BIG)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    check_rows = correctness(args.naclip)
    print("correctness passed", flush=True)

    table, csv_rows = [], []
    dev, ver, date = device_name("cpu"), versions(), now()
    with tempfile.TemporaryDirectory() as tmp:
        for C, H, W in sizes:
            need = unfold_bytes(C, H, W)
            results, saved = {}, {}
            impls = ["cpu", "reference"] + (["naclip"] if args.naclip else [])
            for impl in impls:
                reps = 1 if impl != "cpu" else args.reps
                if impl == "naclip" and 3 * need > mem_available():
                    results[impl] = {"error": f"not run: needs about 3 x {_gib(need)}, MemAvailable "
                                              f"{_gib(mem_available())}"}
                    continue
                saved[impl] = os.path.join(tmp, f"{impl}.pt")
                results[impl] = measure(impl, (C, H, W), reps, args.naclip, saved[impl],
                                        None if impl == "cpu" else args.timeout)
                print(impl, (C, H, W), results[impl], flush=True)
            ours = torch.load(saved["cpu"]) if "error" not in results["cpu"] else None
            for impl in impls:
                r = results[impl]
                shape = f"B=1 C={C} {H}x{W}"
                label = {"cpu": "ovss_fast cpu", "reference": "ovss_fast reference",
                         "naclip": "NACLIP PAMR module"}[impl]
                if "error" in r:
                    table.append([shape, label, "-", "-", "-", r["error"]])
                    csv_rows.append({"shape": shape, "backend": impl, "note": r["error"]})
                    continue
                diff = "-"
                if impl != "cpu" and ours is not None:
                    other = torch.load(saved[impl])
                    diff = f"{float((other.double() - ours.double()).abs().max() / ours.abs().max()):.1e}"
                speed = ""
                if impl != "cpu" and "error" not in results["cpu"]:
                    speed = f"ours {r['median_s'] / results['cpu']['median_s']:.0f}x faster"
                    if results["cpu"]["peak_bytes"] >= 1 << 20:
                        speed += f", {r['peak_bytes'] / results['cpu']['peak_bytes']:.1f}x less memory"
                note = f"unfold [B, C, P, H, W] {_gib(need)}" if impl == "naclip" else ""
                runs = len(r["times_s"])
                table.append([shape, label, f"{r['median_s']:.3f} s ({runs} run{'s' if runs > 1 else ''})",
                              _gib(r["peak_bytes"]), diff, "; ".join(x for x in (speed, note) if x)])
                csv_rows.append({"shape": shape, "backend": impl, "median_ms": f"{1e3 * r['median_s']:.1f}",
                                 "peak_mem_mb": f"{r['peak_bytes'] / (1 << 20):.1f}",
                                 "note": f"max rel diff to cpu {diff}; {note}; load {load}"})
        C, H, W = big
        r = measure("cpu", big, 1, None, None)
        shape = f"B=1 C={C} {H}x{W}"
        need = unfold_bytes(C, H, W)
        if "error" in r:
            table.append([shape, "ovss_fast cpu", "-", "-", "-", r["error"]])
        else:
            bound = 3 * r["out_bytes"]
            table.append([shape, "ovss_fast cpu", f"{r['median_s']:.3f} s (1 run)", _gib(r["peak_bytes"]), "-",
                          f"output {_gib(r['out_bytes'])}, 3x output {_gib(bound)}; the peers' unfold alone: "
                          f"{_gib(need)} (computed, not run)"])
            csv_rows.append({"shape": shape, "backend": "cpu", "median_ms": f"{1e3 * r['median_s']:.1f}",
                             "peak_mem_mb": f"{r['peak_bytes'] / (1 << 20):.1f}",
                             "note": f"peers' unfold {_gib(need)} computed; load {load}"})

    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cannot = []
    for name, (C, H, W) in [("VOC21 (C=21) 375x500", (21, 375, 500)), ("ADE20K (C=150) 512x683", (150, 512, 683)),
                            ("COCO-Stuff (C=171) 480x640", (171, 480, 640)),
                            ("Cityscapes (C=19) 1024x2048", (19, 1024, 2048)),
                            ("C=171 1024x2048", (171, 1024, 2048))]:
        need = unfold_bytes(C, H, W)
        verdict = "cannot run here" if 2 * need > mem_total else "fits"
        cannot.append([name, _gib(need), _gib(2 * need), verdict])

    body = "\n".join([
        f"{date}; {dev}; {ver}; load average at start {load} (other processes were running).",
        f"PAMR with NACLIP's default: {ITERS} iterations, dilations {list(DILATIONS)}; full-size float32 scores "
        "(NACLIP resizes its logits to the image first) and a 3-channel image. Each measurement in its own "
        "process: peak RSS growth over the inputs (VmHWM), median time (ours: of "
        f"{args.reps} runs; the others: 1 run). Max diff: max |theirs - ours| / max |ours|.",
        "",
        "Correctness first (rel. error against our float64 reference):",
        "",
        markdown_table(["case", "max |x - ref| / max |ref|"], check_rows),
        "",
        markdown_table(["shape", "implementation", "time", "peak memory growth", "max diff to ours", "note"], table),
        "",
        "The peers' module holds the [B, C, P, H, W] float32 unfold of the mask and its product with the "
        f"affinities at once (computed below; this machine has {_gib(mem_total)} of memory):",
        "",
        markdown_table(["size", "unfold [B, C, P, H, W]", "unfold + product", "on this machine"], cannot),
    ])
    write_section("Refiners: PAMR", body, out_dir / "RESULTS.md")
    for row in csv_rows:
        row.update({"date": date, "bench": "bench_refiners", "device": dev, "versions": ver, "op": "pamr",
                    "dtype": "float32"})
    append_rows(csv_rows, out_dir / "results.csv")
    print((out_dir / "RESULTS.md").read_text().split("## Refiners: PAMR", 1)[1])


if __name__ == "__main__":
    main()
