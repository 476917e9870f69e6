"""One command for the peer benchmarks: tables in bench/RESULTS.md, plots in bench/plots/.

    python -m bench.run_all [--full] [--smoke] [--out DIR] [--only op mv jbu] [--without kornia ...]

Every row is one backend or peer (bench/peers.py) on one cell (B, N, C or image size),
float32, ``--threads`` torch threads (2) for everything in this one process:

1. correctness first: op/mv scores against the float64 reference (rel. error
   max|a - b| / max|b| <= 1e-4), jbu labels against the reference's (identical except
   at near-ties). A failure of our own backend stops the run; a peer that fails is
   marked and not timed; peers that compute a different iterate or filter (GeomLoss,
   kornia) are timed with their error and label agreement in the row;
2. time: median and spread of whole calls (IQR from 4 runs up, else min-max); calls of
   more than 3 s run twice (the checked call and one more), of more than 8 s once;
3. peak memory: resident-set growth of one call in a fresh process
   (bench/_ext_bench.peak_mem_mb; ``--smoke``: in this process);
4. a peer that is not installed, does not fit ``--mem-budget-gib``, or would take more
   than ``--max-call-s`` per call gets a row that says so.

Default grid (bench/RESULTS.md says how long it took): op and mv at B = 1, C = 21,
N in {196, 784, 1024, 2304, 4096}, plus C = 60 and 171 at N = 1024 and B = 8 at
N = 784, op also C = 171 at N = 4096; jbu at B = 1, C in {21, 171}, 512 and 1024 px and
C = 21 at 2048 px. ``--full``: every N x C in {21, 60, 171} x B in {1, 8} and every
C x B at 512/1024/2048 px.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import _ext_bench as eb
from bench import peers as P
from bench._results_io import BENCH_DIR, append_rows, device_name, markdown_table, now, versions, write_section
from bench.bench_discrepancy import rel_err
from ovss_fast.kernels import reference as R

TOL = 1e-4
SIZES_N = (196, 784, 1024, 2304, 4096)
SIZES_C = (21, 60, 171)
SIZES_B = (1, 8)
SIZES_PX = (512, 1024, 2048)
OUR = ("cpu", "cuda", "triton")
#: rows never skipped for time (only for memory): ours and the reference they are measured against
PINNED = (*OUR, "reference", "reference eager", "torch.compile(reference)")
SECTION = {"op": "Peers: Sinkhorn (op) on CPU", "mv": "Peers: Markov chain (mv) on CPU",
           "jbu": "Peers: jbu_argmax on CPU", "summary": "Peers: summary"}


def grid(mode: str, args: argparse.Namespace) -> list[dict]:
    """The cells of one op, smallest work first (so that time estimates come from smaller cells)."""
    if args.smoke:
        cells = ([{"B": 1, "C": 3, "H": h} for h in (32, 48)] if mode == "jbu" else
                 [{"B": 1, "N": 16, "C": 3}, {"B": 1, "N": 25, "C": 3}, {"B": 2, "N": 16, "C": 3}])
    elif mode == "jbu":
        cells = ([{"B": b, "C": c, "H": h} for b in SIZES_B for c in SIZES_C for h in SIZES_PX] if args.full else
                 [{"B": 1, "C": c, "H": h} for c in (21, 171) for h in (512, 1024)] + [{"B": 1, "C": 21, "H": 2048}])
    elif args.full:
        cells = [{"B": b, "N": n, "C": c} for b in SIZES_B for n in SIZES_N for c in SIZES_C]
    else:
        cells = ([{"B": 1, "N": n, "C": 21} for n in SIZES_N]
                 + [{"B": 1, "N": 1024, "C": 60}, {"B": 1, "N": 1024, "C": 171}, {"B": 8, "N": 784, "C": 21}]
                 + ([{"B": 1, "N": 4096, "C": 171}] if mode == "op" else []))
    for c in cells:
        c["mode"] = mode
    return sorted(cells, key=lambda c: work(c))


def work(case: dict) -> float:
    """The unit time estimates scale with: B C N^2 (op, mv) or B C H^2 (jbu)."""
    side = case["H"] if case["mode"] == "jbu" else case["N"]
    return float(case["B"] * case["C"] * side * side)


def shape_of(case: dict) -> str:
    if case["mode"] == "jbu":
        h = max(1, case["H"] // 16)
        return f"B={case['B']} C={case['C']} {h}x{h} -> {case['H']}x{case['H']}"
    return f"B={case['B']} N={case['N']} C={case['C']}"


def sample_ms(fn: Callable[[], object], first_s: float, *, min_time_s: float) -> list[float]:
    """Wall times (ms) of whole calls: after the checked one, enough runs for ``min_time_s``
    (3 to 30); a call of more than 3 s runs once more and the checked run counts; one of more
    than 8 s: the checked run alone."""
    if first_s > 8.0:
        return [first_s * 1e3]
    if first_s > 3.0:
        t0 = time.perf_counter()
        fn()
        return [first_s * 1e3, (time.perf_counter() - t0) * 1e3]
    runs = max(3, min(30, math.ceil(min_time_s / max(first_s, 1e-6))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def others_running() -> int:
    """Runnable tasks on the machine that are not threads of this process (the 4th field of
    /proc/loadavg counts every runnable thread, this process's OpenMP workers included)."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    mine = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            mine += task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return max(0, running - max(mine, 1))


def wait_quiet(max_wait_s: float) -> bool:
    """Wait (up to ``max_wait_s``) until no other task is runnable for 2 s; False if it never was.
    With 2 threads on 2 cores, one core taken by another job slows OpenMP loops far more than 2x."""
    deadline, quiet_since = time.time() + max_wait_s, None
    while True:
        now_ = time.time()
        if others_running() == 0:
            quiet_since = quiet_since or now_
            if now_ - quiet_since >= 2.0:
                return True
        else:
            quiet_since = None
        if now_ > deadline:
            return False
        time.sleep(0.25)


def spread(times: list[float]) -> tuple[float, str]:
    """(median, spread text): the interquartile range from 4 samples up, else min-max."""
    med = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        return med, f"IQR {q[0]:.3g}-{q[2]:.3g}"
    return med, f"min-max {min(times):.3g}-{max(times):.3g}"


class Check:
    """Correctness of one cell's outputs, computed once before any runner is timed."""

    def __init__(self, case: dict, x: dict) -> None:
        self.mode = case["mode"]
        if self.mode == "op":
            self.want = R.sinkhorn_scores(x["q64"], x["k64"], eps=P.EPS, iters=P.ITERS)
        elif self.mode == "mv":
            self.want = R.markov_scores(x["q64"], x["k64"], sk_iters=P.SK_ITERS, steps=P.STEPS)
        else:
            self.want = None  # jbu: the reference's own labels, set by the reference row (the checked run is timed)

    def set_jbu_reference(self, x: dict, chunk: int | None = None) -> torch.Tensor:
        """The reference's labels (the reference row's run), or, where the reference does not fit,
        the same labels from jbu_upsample over ``chunk`` classes at a time (not timed)."""
        scores, guide = x["scores"], x["guide"]
        C = scores.shape[1]
        chunk = chunk or C
        best = second = idx = None
        scale = torch.zeros(())
        for c0 in range(0, C, chunk):
            up = R.jbu_upsample(scores[:, c0:c0 + chunk], guide, **P.JBU_KW)
            scale = torch.maximum(scale, up.abs().max())
            k = min(2, up.shape[1])
            vals, ids = up.topk(k, dim=1)  # ties keep the lowest index first, as argmax does
            del up
            v2 = vals[:, 1] if k == 2 else torch.full_like(vals[:, 0], -float("inf"))
            if best is None:
                best, idx, second = vals[:, 0], ids[:, 0] + c0, v2
                continue
            new_best = vals[:, 0] > best  # strictly greater: an equal later class loses the tie
            second = torch.where(new_best, torch.maximum(best, v2), torch.maximum(second, vals[:, 0]))
            idx = torch.where(new_best, ids[:, 0] + c0, idx)
            best = torch.where(new_best, vals[:, 0], best)
        self.near_tie = (best - second).abs() <= TOL * scale
        self.want = idx
        return idx

    def __call__(self, label: str, out: torch.Tensor) -> tuple[bool, str]:
        """(passes, text for the row)."""
        if self.mode == "jbu":
            if self.want is None:
                return False, "no reference labels (the reference did not run)"
            differ = out != self.want
            agree = 1.0 - float(differ.float().mean())
            if label.startswith(P.APPROXIMATE):
                return True, f"different filter: labels agree {agree:.1%}"
            bad = int((differ & ~self.near_tie).sum())
            return bad == 0, (f"labels identical except {int(differ.sum())} near-ties" if bad == 0
                              else f"CHECK FAILED: {bad} labels differ outside near-ties")
        err = rel_err(out, self.want)
        if label.startswith(P.APPROXIMATE):
            agree = float((out.argmax(-1) == self.want.argmax(-1)).float().mean())
            return True, f"different iterate: rel. err {err:.1e}, labels agree {agree:.1%}"
        if err <= TOL:
            return True, f"ok, rel. err {err:.1e}"
        return False, f"CHECK FAILED: rel. err {err:.1e} > {TOL:g}"


def run_mode(mode: str, args: argparse.Namespace, card: str) -> list[dict]:
    """All rows of one op: one per (cell, runner)."""
    rate: dict[str, float] = {}  # label -> seconds per unit of work, from its latest run
    results = []
    for case in grid(mode, args):
        shape = shape_of(case)
        if mode == "jbu":
            x = P.jbu_inputs(case["B"], case["C"], case["H"])
        else:
            x = P.op_inputs(case["B"], case["N"], case["C"])
        check = Check(case, x)
        # the headline cell gives every peer up to a minute, so that each of POT's ways is measured there
        runners = P.runners(mode)
        if mode == "jbu":  # the reference first: its labels check the others
            runners = {"reference": runners.pop("reference"), **runners}
        for label, fn in runners.items():
            row = {"mode": mode, **{k: case.get(k, "") for k in ("B", "N", "C", "H")}, "shape": shape,
                   "backend": label, "version": P.version_of(label), "median_ms": None, "spread": "-",
                   "peak_mib": None, "check": "", "device": card}
            results.append(row)
            est_gib = P.est_bytes(mode, label, case) / 2**30
            # a minute for every peer on the headline cell, so that each of POT's ways is measured there
            long = not args.smoke and is_headline(case, args)
            max_call_s = max(args.max_call_s, 60.0) if long else args.max_call_s
            if isinstance(fn, str):
                row["check"] = fn
            elif args.smoke and label.startswith("torch.compile"):
                row["check"] = "not run in --smoke (compilation takes about 30 s)"
            elif est_gib > args.mem_budget_gib:
                row["check"] = f"not run: needs about {est_gib:.1f} GiB, over --mem-budget-gib {args.mem_budget_gib:g}"
            elif label in rate and rate[label] * work(case) > max_call_s and label not in PINNED:
                row["check"] = (f"not run: about {rate[label] * work(case):.0f} s per call (from the smaller cells), "
                                f"over --max-call-s {max_call_s:g}")
            if row["check"]:
                print(f"{mode} {shape} {label}: {row['check']}", flush=True)
                if mode == "jbu" and label == "reference":  # check the others against it, class chunk by chunk
                    per_class = P.est_bytes(mode, label, {**case, "C": 1})
                    check.set_jbu_reference(x, chunk=max(1, int(args.mem_budget_gib * 2**30 // per_class)))
                continue
            call = functools.partial(fn, x)
            if not args.smoke and not wait_quiet(args.wait_quiet_s):
                row["busy"] = True
            if label.startswith("torch.compile"):
                call()  # compile (and recompile for a new shape) before the checked call
            t0 = time.perf_counter()
            try:
                out = check.set_jbu_reference(x) if (mode == "jbu" and label == "reference") else call()
            except Exception as exc:  # a peer that refuses the cell is a row, not the end of the run
                if label in OUR:
                    raise
                row["check"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
                print(f"{mode} {shape} {label}: {row['check']}", flush=True)
                continue
            first_s = time.perf_counter() - t0
            ok, row["check"] = check(label, out)
            del out
            if not ok:
                print(f"{mode} {shape} {label}: {row['check']}", flush=True)
                if label in OUR:
                    raise SystemExit(f"FAIL {mode} {shape} {label}: {row['check']}")
                continue
            times = sample_ms(call, first_s, min_time_s=args.min_time_s)
            if others_running():
                row["busy"] = True
            rate[label] = statistics.median(times) * 1e-3 / work(case)
            row["median_ms"], row["spread"] = spread(times)
            row["runs"] = len(times)
            if args.smoke:
                row["peak_mib"] = eb.measure_peak_here(call)
            else:
                mem_case = {**case, "threads": args.threads}
                if label.startswith("torch.compile"):
                    mem_case["warm"] = label
                row["peak_mib"] = eb.peak_mem_mb("peers", mem_case, label)
            print(f"{mode} {shape} {label}: {row['median_ms']:.2f} ms ({row['spread']}, {len(times)} runs), "
                  f"{row['peak_mib']:.1f} MiB, {row['check']}", flush=True)
        del x, check
    return results


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if v < 1000 else f"{v:.0f}"


def table(rows: list[dict]) -> str:
    header = ["shape", "dtype", "backend / peer", "version", "median ms", "spread ms", "runs", "peak MiB", "check"]
    body = [[r["shape"], "float32", r["backend"], r["version"], fmt(r["median_ms"]), r["spread"], r.get("runs", "-"),
             fmt(r["peak_mib"], 1), r["check"] + ("; another job was running" if r.get("busy") else "")]
            for r in rows]
    return markdown_table(header, body)


def csv_rows(rows: list[dict], vers: str) -> list[dict]:
    op = {"op": "sinkhorn_scores", "mv": "markov_scores", "jbu": "jbu_argmax"}
    return [{"date": now(), "bench": "run_all", "device": r["device"], "versions": f"{vers}, {r['version']}",
             "op": op[r["mode"]], "shape": r["shape"], "dtype": "float32", "backend": r["backend"],
             "median_ms": "" if r["median_ms"] is None else f"{r['median_ms']:.3f}",
             "peak_mem_mb": "" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}",
             "note": f"spread {r['spread']}; {r['check']}" + ("; another job was running" if r.get("busy") else "")}
            for r in rows]


def find(rows: list[dict], **kw: object) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items()) and r["median_ms"] is not None]


def headline_cell(args: argparse.Namespace) -> tuple[int, int]:
    """(N, C) of the op cell the headline ratio against POT is read from (B = 1)."""
    return (16, 3) if args.smoke else (1024, 171)


def is_headline(case: dict, args: argparse.Namespace) -> bool:
    return case["mode"] == "op" and case["B"] == 1 and (case["N"], case["C"]) == headline_cell(args)


def headline(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The target ratios: op at B=1, N=1024, C=171 against POT; jbu against kornia."""
    lines = []
    n, c = headline_cell(args)
    cell = find(rows, mode="op", B=1, N=n, C=c)
    ours = [r for r in cell if r["backend"] in OUR]
    pots = [r for r in cell if r["backend"].startswith("POT")]
    if ours and pots:
        best, pot = min(ours, key=lambda r: r["median_ms"]), min(pots, key=lambda r: r["median_ms"])
        others = "; ".join(f"{r['backend']} {fmt(r['median_ms'])} ms" for r in pots if r is not pot)
        ratio = pot["median_ms"] / best["median_ms"]
        lines.append(f"- op, B=1 N={n} C={c}, {P.ITERS} iterations, eps {P.EPS}: our fastest backend "
                     f"(`{best['backend']}`, {fmt(best['median_ms'])} ms) is **{ratio:.1f}x** "
                     f"faster than POT's best way to solve the {c} problems (`{pot['backend']}`, "
                     f"{fmt(pot['median_ms'])} ms; {others or 'no other POT variant ran'}).")
    else:
        lines.append(f"- op, B=1 N={n} C={c}: no ratio (ours ran: {bool(ours)}, POT ran: {bool(pots)}).")
    for r in rows:
        if r["mode"] == "jbu" and r["backend"].startswith("kornia"):
            cpu = find(rows, mode="jbu", shape=r["shape"], backend="cpu")
            if r["median_ms"] is None:
                lines.append(f"- jbu_argmax {r['shape']}: `{r['backend']}` {r['check']}.")
            elif cpu:
                k, o = r, cpu[0]
                lines.append(f"- jbu_argmax {r['shape']}: fused `cpu` {fmt(o['median_ms'])} ms, "
                             f"{fmt(o['peak_mib'], 1)} MiB vs `{k['backend']}` {fmt(k['median_ms'])} ms, "
                             f"{fmt(k['peak_mib'], 1)} MiB: "
                             f"**{k['median_ms'] / o['median_ms']:.1f}x** faster, "
                             f"**{o['peak_mib'] / max(k['peak_mib'], 1e-9):.3f}x** the memory.")
    return lines


def scaling_note(rows: list[dict]) -> str:
    """Where the N x N affinity makes sliding windows necessary, from the op rows."""
    out = ["| image px (ViT/16) | N | one N x N float32 matrix MiB | op, cpu, C=21 ms | op, cpu, C=171 ms |",
           "|---|---|---|---|---|"]
    for px in (224, 448, 512, 768, 1024, 1536, 2048):
        n = (px // 16) ** 2
        cells = []
        for c in (21, 171):
            got = find(rows, mode="op", B=1, N=n, C=c, backend="cpu")
            known = find(rows, mode="op", B=1, C=c, backend="cpu")
            if got:
                cells.append(fmt(got[0]["median_ms"]))
            elif known:  # time is B C N^2 work at the rate of the largest measured N
                ref = max(known, key=lambda r: r["N"])
                cells.append(f"~{fmt(ref['median_ms'] * (n / ref['N']) ** 2, 0)} (extrapolated from N={ref['N']})")
            else:
                cells.append("-")
        out.append(f"| {px} | {n} | {4 * n * n / 2**20:.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def plot(rows: list[dict], out_dir: Path, args: argparse.Namespace) -> list[str]:
    """time and peak memory against N (op, mv) or image side (jbu): one line per backend and peer."""
    if (why := P.missing("matplotlib")) is not None:
        return [f"plots not written: matplotlib {why}"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for mode in ("op", "mv", "jbu"):
        mine = [r for r in rows if r["mode"] == mode and r["median_ms"] is not None and r["B"] == 1]
        if not mine:
            continue
        xkey = "H" if mode == "jbu" else "N"
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        cs = sorted({r["C"] for r in mine})
        styles = ["-", "--", ":"]
        for label in dict.fromkeys(r["backend"] for r in mine):
            for ci, c in enumerate(cs):
                pts = sorted((r[xkey], r["median_ms"], r["peak_mib"]) for r in mine if r["backend"] == label
                             and r["C"] == c)
                if len(pts) < (1 if mode == "jbu" else 2):
                    continue
                xs = [p[0] for p in pts]
                color = f"C{list(dict.fromkeys(r['backend'] for r in mine)).index(label) % 10}"
                axes[0].plot(xs, [p[1] for p in pts], styles[ci % 3], marker="o", ms=3, color=color,
                             label=f"{label} (C={c})")
                axes[1].plot(xs, [max(p[2], 0.05) for p in pts], styles[ci % 3], marker="o", ms=3, color=color)
        for ax, ylabel in zip(axes, ("median ms", "peak MiB (RSS growth)"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("output side (px)" if mode == "jbu" else "N patches")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=6, loc="upper left")
        fig.suptitle(f"{SECTION[mode]}, B=1, float32, {args.threads} threads", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{mode}_scaling.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every cell of the issue's grid (hours on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch.compile, in-process memory (CI)")
    p.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for RESULTS.md, results.csv, plots/")
    p.add_argument("--only", nargs="+", choices=("op", "mv", "jbu"), default=("op", "mv", "jbu"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, for every backend and peer")
    p.add_argument("--without", nargs="*", default=[], help="treat these peers as not installed (pot, kornia, ...)")
    p.add_argument("--mem-budget-gib", type=float, default=6.0, help="skip (and report) calls estimated above this")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip (and report) calls estimated above this many seconds "
                        "(default 10, 60 on the headline cell; --full 600)")
    p.add_argument("--wait-quiet-s", type=float, default=300.0,
                   help="before each row, wait up to this long for no other runnable task (rows timed anyway say so)")
    p.add_argument("--min-time-s", type=float, default=None, help="timed seconds per fast row (default 1; smoke 0.05)")
    args = p.parse_args(argv)
    if args.max_call_s is None:
        args.max_call_s = 600.0 if args.full else (5.0 if args.smoke else 10.0)
    if args.min_time_s is None:
        args.min_time_s = 0.05 if args.smoke else 1.0
    P.WITHOUT.update(args.without)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    card, vers = device_name("cpu"), versions()
    start, load0 = time.time(), eb.load_average()
    print(f"device: {card}\nversions: {vers}\nload average: {load0}", flush=True)

    rows: list[dict] = []
    for mode in args.only:
        rows += run_mode(mode, args, card)
    minutes = (time.time() - start) / 60
    cmd = "python -m bench.run_all" + (" --full" if args.full else "") + (" --smoke" if args.smoke else "")
    head = (f"`{cmd}` on **{card}**, {vers}, ovss_fast {eb.commit()}; {now()}; "
            f"{minutes:.1f} min; load average {load0} at the start, {eb.load_average()} at the end. Other sessions "
            "share this machine: each row waited for no other runnable task (/proc/loadavg) before it was timed, "
            "and a row says so where another job ran anyway.\n\n"
            f"float32, torch threads {args.threads} for every backend and peer, in one process. Time: median of "
            "whole calls after the checked one (spread: IQR from 4 runs, else min-max; calls over 3 s: the checked "
            "run and one more; over 8 s: the checked run alone). Peak: resident-set growth of one call in a fresh "
            "process "
            f"{'(--smoke: in this process)' if args.smoke else '(bench/_ext_bench.peak_mem_mb)'}. "
            f"Rows that did not run say why (not installed, over --mem-budget-gib {args.mem_budget_gib:g}, over "
            f"--max-call-s {args.max_call_s:g} estimated from the smaller cells; the limit is 60 s on the headline "
            "cell, and never applies to the reference and our backends).")
    notes = {
        "op": (f"sinkhorn_scores, {P.ITERS} iterations, eps {P.EPS}, kernel (and for POT/GeomLoss the cost "
               "-eps log K) given. Check: rel. error against the float64 reference <= 1e-4 before timing. POT starts "
               "from our first u-update (warm start u = a / K1) so its 50 (v, u) updates are exactly our iterates; "
               "its own loop also checks the marginal error every 10 iterations (an einsum over N x N x C), which "
               "is part of POT's time. GeomLoss anneals eps over its 50 iterations (symmetric updates), so it is a "
               "different iterate: timed, with its error and label agreement. bench/peers.py has each call."),
        "mv": (f"markov_scores, {P.SK_ITERS} Sinkhorn-Knopp iterations, {P.STEPS} steps, integrated readout; no "
               "library computes this chain, so the rows are ours against the reference eager and compiled."),
        "jbu": ("jbu_argmax, scores on the ViT/16 grid (px / 16), radius 2 (25 taps), sigma_s 1, sigma_r 0.1. "
                "reference = jbu_upsample then argmax (holds [B, C, H, W]); cpu = the fused kernel; kornia = bilinear "
                "upsampling to H x W, kornia.filters.joint_bilateral_blur (sigma_color 0.1, l2) guided by the image, "
                f"argmax, at {P.KORNIA_KERNEL} x {P.KORNIA_KERNEL} full-resolution taps with sigma_space 1 px (our "
                "25 taps, a window 16 times narrower than the JBU's: close to plain bilinear upsampling) and at the "
                "JBU's window (65 x 65 taps, sigma_space 16 px). A different filter either way: its label agreement "
                "with the reference is in the check column."),
    }
    results = args.out / "RESULTS.md"
    for mode in args.only:
        mine = [r for r in rows if r["mode"] == mode]
        cells = sorted({r["shape"] for r in mine}, key=lambda s: [int(t) if t.isdigit() else t for t in
                                                                   s.replace("=", " ").replace("x", " ").split()])
        body = (head + "\n\n" + notes[mode] + f"\n\nCells run ({'full grid' if args.full else 'pruned grid'}): "
                + ", ".join(cells) + ".\n\n" + table(mine))
        if mode == "op":
            body += ("\n\nWhere the N x N affinity is the limit (B = 1; every N x N tensor is 4 N^2 bytes, and "
                     "affinity, cost and kernel are three of them; the op time grows as C N^2):\n\n"
                     + scaling_note(rows))
        write_section(SECTION[mode], body, results)
    plots = plot(rows, args.out / "plots", args)
    summary = (head + "\n\n" + "\n".join(headline(rows, args)) + "\n\nPlots (time and peak memory against N or "
               "image size, one line per backend and peer): "
               + ", ".join(f"[{n}](plots/{n})" if n.endswith(".png") else n for n in plots) + ".")
    write_section(SECTION["summary"], summary, results)
    append_rows(csv_rows(rows, vers), args.out / "results.csv")
    print("\n".join(headline(rows, args)))
    print(f"wrote {results} and {args.out / 'results.csv'}; plots: {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
