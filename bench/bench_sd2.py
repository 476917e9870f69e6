"""Stable Diffusion 2's affinity at its real size: time and peak memory of one ``SD2Affinity`` call.

``python -m bench.bench_sd2 [--device cpu|cuda|all] [--repeats R] [--run-to-end] [--no-write] [--results-dir DIR]``

Needs diffusers and transformers (``pip install -e ".[sd]"``; nothing is downloaded).

The published architecture (ovss_fast.models.sd2_config: stabilityai/stable-diffusion-2-1-base's UNet,
VAE and text encoder) built offline with RANDOM weights (``SD2Affinity.from_config``; the time
and memory do not depend on the weights), run at the voc21 whole-image size: a 375x500 image at
short side 336 snapped to whole 16-px patches, [1, 3, 336, 448], CLIP grid 21x28 (N = 588). The
affinity resizes the crop to 704x896 pixels (latent 88x112) and the UNet stops after the two
captured up-blocks (``--run-to-end``: the whole UNet, as before the early stop).

Each device runs in a fresh subprocess (float32 on the CPU, float16 on CUDA): build, one warm-up
call on CUDA (none on the CPU: one call is minutes on 2 cores), then ``--repeats`` timed calls
(median). Peak memory of the calls: on the CPU the process's peak resident set (VmHWM, reset
after the build through /proc/self/clear_refs so the build's transient text encoder is not
counted; it includes the weights), on CUDA ``torch.cuda.max_memory_allocated`` (weights included).
CPU seconds (user + system of the process) are printed beside the wall time: on a shared machine
they say more than the wall clock. Appends rows to bench/results.csv and writes the "SD2 affinity
at its real size" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import torch  # noqa: E402

from bench._results_io import append_rows, device_name, markdown_table, now, versions, write_section  # noqa: E402

IMAGE = (1, 3, 336, 448)
GRID = (21, 28)
SECTION = "SD2 affinity at its real size"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(device: str, repeats: int, run_to_end: bool) -> dict:
    """One device, in this process: build, time the calls, peak memory."""
    import resource

    from ovss_fast.models.affinity import SD2Affinity

    t0 = time.perf_counter()
    sd = SD2Affinity.from_config(seed=0, device=device)
    build_s = time.perf_counter() - t0
    sd.stop_early = not run_to_end
    x = torch.rand(*IMAGE, generator=torch.Generator().manual_seed(0))
    cuda = device.startswith("cuda")
    if cuda:
        sd(x, GRID)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _status_kib("VmRSS")
    reset = False if cuda else _reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        a = sd(x, GRID)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ok = (tuple(a.shape) == (1, GRID[0] * GRID[1], GRID[0] * GRID[1]) and bool(torch.isfinite(a).all())
          and bool((a >= 0).all()) and [n for n, _ in sd.last_captured] == sd.hooked)
    if cuda:
        peak_mb, how = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    elif reset:
        peak_mb, how = _status_kib("VmHWM") / 1024, "peak RSS (VmHWM) of the calls"
    else:  # the build's peak may hide the calls'
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, maxrss_before) / 1024
        how = "peak RSS of the process (build included)"
    times.sort()
    return {
        "device": device, "dtype": str(sd.dtype).removeprefix("torch."), "build_s": build_s,
        "median_s": times[len(times) // 2], "cpu_s": sorted(cpu)[len(cpu) // 2], "repeats": repeats,
        "peak_mb": peak_mb, "peak_how": how, "rss_before_mb": (rss_before or 0) / 1024,
        "estimate_mb": sd.memory_per_crop(GRID) / 2**20,
        "params": sum(p.numel() for p in sd.unet.parameters()), "hooked": sd.hooked_blocks,
        "captured": sd.last_captured, "ok": ok, "run_to_end": run_to_end, "device_name": device_name(device),
        "threads": torch.get_num_threads(), "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }


def run_child(device: str, repeats: int, run_to_end: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_sd2", "--child", device, "--repeats", str(repeats)]
    if run_to_end:
        cmd.append("--run-to-end")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench_sd2 on {device} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="all", help="cpu, cuda or all (cpu, and cuda when available)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 1 on cpu, 5 on cuda)")
    p.add_argument("--run-to-end", action="store_true", help="run the whole UNet (no early stop)")
    p.add_argument("--no-write", action="store_true", help="print only; no results.csv row, no RESULTS.md section")
    p.add_argument("--results-dir", default=None,
                   help="write RESULTS.md and results.csv in this folder (e.g. gpu_session.sh's $OUT, holding "
                        "copies of bench/'s) instead of bench/")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.repeats or 1, args.run_to_end)))
        return 0
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if not d.startswith("cuda") or torch.cuda.is_available()]
    results = []
    for d in devices:
        r = run_child(d, args.repeats or (5 if d.startswith("cuda") else 1), args.run_to_end)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.no_write:
        return 0 if all(r["ok"] for r in results) else 1
    shape = f"image {'x'.join(map(str, IMAGE))}, grid {GRID[0]}x{GRID[1]} (N=588), latent 88x112"
    stop = "whole UNet" if args.run_to_end else "UNet stopped after up_blocks.2"
    rows, table = [], []
    for r in results:
        note = (f"random weights (stable-diffusion-2-1-base config); {stop}; build {r['build_s']:.0f} s; "
                f"CPU time {r['cpu_s']:.0f} s; peak = {r['peak_how']}; load {r['load']}")
        rows.append({"date": now(), "bench": "sd2_affinity", "device": r["device_name"], "versions": versions(),
                     "op": "SD2Affinity", "shape": shape, "dtype": r["dtype"], "backend": r["device"],
                     "median_ms": f"{r['median_s'] * 1e3:.0f}", "peak_mem_mb": f"{r['peak_mb']:.0f}", "note": note})
        table.append([r["device_name"], r["dtype"], stop, f"{r['build_s']:.0f}", f"{r['median_s']:.1f}",
                      f"{r['cpu_s']:.0f}", r["repeats"], f"{r['rss_before_mb']:.0f}", f"{r['peak_mb']:.0f}",
                      r["peak_how"], f"{r['estimate_mb']:.0f}", r["load"], "ok" if r["ok"] else "FAILED"])
    out = Path(args.results_dir) if args.results_dir else None
    append_rows(rows, out / "results.csv" if out else None)
    body = (
        f"`python -m bench.bench_sd2` ({now()}; {versions()}). `SD2Affinity.from_config(seed=0)`: Stable "
        "Diffusion 2's published architecture (stabilityai/stable-diffusion-2-1-base: UNet 865,910,724 "
        "parameters, VAE, text encoder; `ovss_fast/models/sd2_config.py`) with RANDOM weights, at the voc21 "
        "whole-image "
        f"size: {shape}. Captured: {', '.join(results[0]['hooked']) if results else '-'} (3 self-attention "
        "maps each, on 22x28 and 44x56 tokens). Time: median of the timed calls (after one warm-up on CUDA); "
        "CPU s = user + system seconds of the call (a shared machine inflates the wall clock, not this). "
        "Memory: weights resident before the calls, and the calls' peak (CPU: peak RSS after resetting it past "
        "the build; CUDA: max_memory_allocated, weights included); memory_per_crop = the estimate the "
        "Segmenter sizes its chunks with (activations only: compare it with peak minus resident). Run on CUDA "
        "(float16) with "
        "`python -m bench.bench_sd2 --device cuda`.\n\n"
        + markdown_table(["device", "dtype", "UNet", "build s", "call s", "CPU s", "calls", "resident before MiB",
                          "peak MiB", "peak is", "memory_per_crop MiB", "load avg", "check"], table)
    )
    write_section(SECTION, body, out / "RESULTS.md" if out else None)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
