"""The one-command GPU check: ``python -m bench.gpu_check [--quick]`` on a machine with a GPU.

Needs only torch, triton and numpy (no open_clip, no package index); install the
package there with ``pip install --no-build-isolation --no-deps -e .``. It

1. checks every op of the "cuda" backend (all 7; sinkhorn_scores and markov_scores in both
   CUDA schedules, "cuda[tile]" being OVSS_FAST_CUDA_DISCREPANCY=tile) and of the "triton" backend against
   the float64 reference on fresh random inputs at several sizes (N up to 4096, C up
   to 171, B in {1, 2}, awkward N), and prints a pass/fail table: scores rel. error
   max|a - b| / max|b| <= 1e-4 (-inf entries must coincide); labels identical except
   where the reference's top two scores are within that tolerance; velocity lstar may
   differ only where the float64 chain's change is within 1e-4 of tau. A backend that
   fails to load, or declines a case, is a failure, not a skip;
2. runs compute-sanitizer (memcheck, racecheck) on a small script that calls each
   CUDA op (``--sanitizer-payload``), and says so when compute-sanitizer is absent;
3. times discrepancy (mv, op) at N=1024, C=171, B=1 (gibbs_kernel + scores):
   reference eager, torch.compile(reference), cuda, triton, triton[gibbs fused]; gibbs_kernel alone
   (B=1 N=1024, N=4096; B=15 N=196): reference, triton, triton[gibbs fused]; and jbu_argmax at
   2048 x 2048, C=171 (scores 64 x 64): reference, cuda, triton, with peak memory
   (torch.cuda.max_memory_allocated), timed with triton.testing.do_bench;
3a. checks and times LPOSS / LPOSS+ (label_propagation, pixel_propagation; issue 28) on cuda and triton:
   correctness cases in part 1 (float64 reference; the protocol sizes N = 2940, k = 400, D = 768 and
   448 x 597 at C = 21, and C = 171 outside ``--quick``), timings at both C = 21 and 171 before part 3b;
3b. times the dslo protocol's head (class_distributions + discrepancy mv + jbu_argmax) on the Triton
   backend over 50 whole-image sizes drawn like VOC's and ADE20K's (bench/_sizes.py): total and
   first-call time, autotuner tunings (size buckets) and CUDA-graph captures (issue 26); with
   ``--device cpu`` a 2-image smoke run of it in the Triton interpreter (when TRITON_INTERPRET=1);
4. runs the regime table of bench/bench_discrepancy.py (``run_regimes``: the pipeline's window
   batches and B = 1 at N = 784..4096, every backend and every Triton schedule labelled, with
   GFLOP/s and % of the card's float32 FMA peak), within ``--budget-s`` when given;
5. writes the tables into bench/RESULTS.md under "GPU check" and "Discrepancy regimes on GPU"
   (naming the card and the versions), the timings into bench/results.csv and the regime
   records into bench/results_gpu.json (keys op, B, N, C, backend, median_ms, rel_err, card,
   date, commit, and more).
6. runs the end-to-end pipeline benchmark (bench/bench_pipeline.py) on CUDA when open_clip is
   installed (``--skip-pipeline`` skips it): its own "Pipeline (cuda)" section and rows.

The correctness part also runs the Triton schedules that auto does not pick (labels
``triton[split]``, ``triton[window]`` with ``symmetric=True`` as ops.discrepancy passes it,
``triton[window,general]`` without, and the tf32x3 products ``triton[window,tf32x3]``,
``triton[fused,tf32x3]``, ``triton[split,tf32x3]``, and the persistent schedule (one launch, grid
barriers) ``triton[persistent]``, ``triton[persistent,general]`` (N <= 1024),
``triton[persistent,tf32x3]``), the window ones at N <= 512 only, and always (``--quick`` too) the
N = 4096, 50-iteration cases that decide whether tf32x3 holds 1e-4; and ``triton[gibbs fused]``:
the kernel K of every gibbs_kernel case by gibbs_kernel_only
(the option gibbs="fused", symmetric tiles, no cost), N = 4096 included in ``--quick``, which
part 3 also times beside the two-pass triton gibbs_kernel and inside discrepancy.

Exit status: 0 when every correctness case and every sanitizer run that could run passed.

``--device cpu`` is the dry run this machine can do without a GPU: part 1 only, against
the "cpu" backend at small sizes, nothing written (tests/test_ext_discrepancy.py runs it).
The full run takes a few minutes on an H100; ``--quick`` skips the N=4096 cases, uses
shorter timings and skips torch.compile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import OPS, UnavailableBackend, get_backend

from ._ext_bench import time_gpu, time_gpu_graph
from ._results_io import append_rows, device_name, markdown_table, now, versions, write_section

TOL = 1e-4
#: issue 27: every PAMR backend within 1e-5 of the float64 result
PAMR_TOL = 1e-5


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One call of ``op``: float64 inputs (the backends get float32 copies) and keyword params;
    ``only``: the backend labels it is for (None: every one)."""

    op: str
    label: str
    inputs: tuple[torch.Tensor, ...]
    params: dict[str, Any] = field(default_factory=dict)
    only: tuple[str, ...] | None = None


#: the timing table's columns; "graph ms" is the median of CUDA-graph replays (no Python launch cost)
TIME_COLUMNS = ["what", "shape", "backend", "median ms", "graph ms", "peak MB", "note"]


def _gen(*key: object) -> torch.Generator:
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _q(B: int, N: int, C: int, g: torch.Generator, dead: tuple[int, ...] = ()) -> torch.Tensor:
    q = torch.rand(B, N, C, generator=g, dtype=torch.float64) ** 4
    for c in dead:
        q[:, :, c] = 0
    s = q.sum(dim=1, keepdim=True)
    return torch.where(s > 0, q / s.clamp_min(1e-300), torch.zeros_like(q))


def _affinity(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, 6, (B, N), generator=g)
    same = (labels[:, :, None] == labels[:, None, :]).double()
    return (0.6 * same + 0.4 * torch.rand(B, N, N, generator=g, dtype=torch.float64)) ** 2


def _kernel(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    return R.gibbs_kernel(_affinity(B, N, g), eps=0.1)[1]


def _scores_guide(B: int, C: int, h: int, w: int, H: int, W: int, g: torch.Generator,
                  dead: bool) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    if dead and C > 2:
        s[:, 1] = float("-inf")
    guide = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    return s, guide


def build_cases(device: str, quick: bool) -> list[Case]:
    """The correctness cases; small ones for the CPU dry run."""
    cpu = device == "cpu"
    cases: list[Case] = []
    # (B, N, D, C, nms)
    cd = [(2, 37, 64, 5, 0.5), (1, 50, 16, 1, 0.0)] + ([] if cpu else [(1, 1024, 512, 171, 0.0),
                                                                      (2, 784, 768, 60, 0.3)])
    if not cpu and not quick:
        cd.append((1, 4096, 512, 21, 0.3))
    for B, N, D, C, nms in cd:
        g = _gen("cd", B, N, D, C, nms)
        text = torch.randn(C, D, generator=g, dtype=torch.float64)
        feats = text[torch.randint(0, C, (B, N), generator=g)] + 0.5 * torch.randn(B, N, D, generator=g,
                                                                                   dtype=torch.float64)
        cases.append(Case("class_distributions", f"B={B} N={N} D={D} C={C} nms={nms}", (feats, text),
                          {"scale": 100.0, "nms": nms}))
    sizes = [(2, 37, 5), (1, 50, 1)] + ([(1, 64, 9)] if cpu else [(2, 257, 21), (1, 1024, 171), (2, 784, 21),
                                                                   (15, 196, 199), (36, 196, 29)])
    big = [] if cpu or quick else [(1, 4096, 21)]
    for B, N in {(b, n) for b, n, _ in sizes + big}:
        g = _gen("gibbs", B, N)
        cases.append(Case("gibbs_kernel", f"B={B} N={N}", (_affinity(B, N, g),), {"eps": 0.1}))
    if not cpu and quick:  # the fused gibbs kernel at the largest N, also in --quick
        g = _gen("gibbs", 1, 4096)
        cases.append(Case("gibbs_kernel", "B=1 N=4096", (_affinity(1, 4096, g),), {"eps": 0.1},
                          ("triton", GIBBS_FUSED)))
    for B, N, C in sizes + big:
        g = _gen("scores", B, N, C)
        dead = (0,) if C > 2 else ()
        q, k = _q(B, N, C, g, dead), _kernel(B, N, g)
        label = f"B={B} N={N} C={C}"
        cases.append(Case("kl_scores", label, (q,)))
        # the simple CUDA kernels reread K for every class tile: keep N = 4096 to a few iterations
        it, sk, st = (10, 5, 10) if N >= 4096 else (50, 15, 50)
        cases.append(Case("sinkhorn_scores", f"{label} iters={it}", (q, k), {"eps": 0.1, "iters": it}))
        for readout in ("integrated", "velocity"):
            cases.append(Case("markov_scores", f"{label} {readout} sk={sk} steps={st}", (q, k),
                              {"sk_iters": sk, "steps": st, "readout": readout, "tau": 0.3}))
    if not cpu:
        # the precision question: 50 iterations at N = 4096 (tf32x3 must hold 1e-4 there), also in --quick
        g = _gen("precision", 4096)
        q, k = _q(1, 4096, 21, g, (0,)), _kernel(1, 4096, g)
        tf32 = ("triton", "triton[fused,tf32x3]", "triton[split,tf32x3]", "triton[persistent]",
                "triton[persistent,tf32x3]")
        cases.append(Case("sinkhorn_scores", "B=1 N=4096 C=21 iters=50", (q, k), {"eps": 0.1, "iters": 50}, tf32))
        cases.append(Case("markov_scores", "B=1 N=4096 C=21 integrated sk=15 steps=50", (q, k),
                          {"sk_iters": 15, "steps": 50, "readout": "integrated", "tau": 0.3}, tf32))
    # (B, C, h, w, H, W, dead)
    jbu = [(2, 5, 7, 9, 50, 61, True), (1, 3, 4, 4, 17, 23, False)]
    if not cpu:
        jbu += [(1, 21, 32, 32, 512, 512, True), (2, 171, 24, 24, 300, 301, False)]
        if not quick:
            jbu.append((1, 171, 64, 64, 1024, 1024, True))
        # issue 21: the protocol image sizes (bench/bench_jbu_argmax.py PROTOCOL)
        jbu += [(1, 21, 21, 28, 375, 500, False), (1, 19, 35, 70, 1024, 2048, False)]
    for B, C, h, w, H, W, dead in jbu:
        g = _gen("jbu", B, C, h, w, H, W)
        s, guide = _scores_guide(B, C, h, w, H, W, g, dead)
        for op in ("jbu_upsample", "jbu_argmax"):
            cases.append(Case(op, f"B={B} C={C} {h}x{w}->{H}x{W}{' dead' if dead else ''}", (s, guide),
                              {"sigma_spatial": 1.0, "sigma_range": 0.1, "radius": 2}))
    # issue 21: float32 weights from exponents in double (jbu_wide_exponent): sigma_r = 1e-3 makes them ~1e6
    g = _gen("jbu-sigma-r", 1, 6, 9, 11, 70, 83)
    s, guide = _scores_guide(1, 6, 9, 11, 70, 83, g, False)
    for op in ("jbu_upsample", "jbu_argmax"):
        cases.append(Case(op, "B=1 C=6 9x11->70x83 sigma_r=1e-3", (s, guide),
                          {"sigma_spatial": 1.0, "sigma_range": 1e-3, "radius": 2}))
    # issue 27, PAMR: (B, C, K, h, w, H, W, iters, dilations): H, W below the largest dilation, K = C = 1,
    # NACLIP's extended setting, then the protocol sizes
    pamr = [(1, 3, 3, 5, 6, 12, 10, 10, (8, 16)), (1, 1, 1, 6, 5, 21, 19, 10, (8, 16)),
            (2, 4, 3, 8, 10, 33, 41, 50, (1, 2, 4, 8, 12, 24))]
    if not cpu:
        pamr += [(2, 21, 3, 47, 63, 375, 500, 10, (8, 16)), (1, 19, 3, 64, 128, 512, 1024, 10, (8, 16))]
        if not quick:
            pamr.append((1, 171, 3, 60, 80, 480, 640, 10, (8, 16)))
    for B, C, K, h, w, H, W, iters, dil in pamr:
        g = _gen("pamr", B, C, K, h, w, H, W)
        s = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
        image = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
        cases.append(Case("pamr", f"B={B} C={C} K={K} {h}x{w}->{H}x{W} iters={iters} d={list(dil)}", (s, image),
                          {"iters": iters, "dilations": dil}, _pamr_backends()))
    cases += lposs_cases(cpu, quick)
    return cases


#: issue 28, LPOSS / LPOSS+: the backends with both propagation ops
LPOSS_BACKENDS = ("cuda", "triton", "cpu", "reference")


def lposs_patch_inputs(windows: int, C: int, D: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """LPOSS's patch stage inputs for one image of ``windows`` 224-pixel windows at stride 112 (14 x 14 patches of
    16 pixels each): scores [1, N, C] (cosine-like), clustered features [1, N, D], patch centres [1, N, 2]."""
    n = windows * 196
    centres = torch.randn(8, D, generator=g, dtype=torch.float64)
    feats = centres[torch.randint(0, 8, (n,), generator=g)] + 0.7 * torch.randn(n, D, generator=g,
                                                                                dtype=torch.float64)
    iy, ix = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    pos = torch.cat([torch.stack([8 + 16 * iy.reshape(-1) + 112 * (w // 3), 8 + 16 * ix.reshape(-1) + 112 * (w % 3)],
                                 1) for w in range(windows)]).double()
    return 0.1 * torch.randn(1, n, C, generator=g, dtype=torch.float64), feats[None], pos[None]


def lposs_pixel_inputs(B: int, C: int, H: int, W: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LPOSS+'s pixel stage inputs: scores [B, C, H, W] and an image in [0, 1] with a flat half and a noisy one."""
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    image[:, :, : H // 2] = 0.6 + 0.1 * image[:, :, : H // 2]
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64), image


def lposs_cases(cpu: bool, quick: bool) -> list[Case]:
    """Issue 28: label_propagation (LPOSS) and pixel_propagation (LPOSS+) against float64, awkward sizes then
    LPOSS's protocol sizes (N = 15 windows x 196 patches, k = 400, D = 768; a VOC image at short side 448)."""
    cases = []
    # (windows, C, D, k): N < k, C = 1; the protocol's
    patch = [(2, 3, 16, 30), (1, 1, 8, 400)] + ([] if cpu else [(15, 21, 768, 400), (15, 171, 768, 400)])
    for windows, C, D, k in patch:
        inputs = lposs_patch_inputs(windows, C, D, _gen("lposs", windows, C, D, k))
        cases.append(Case("label_propagation", f"N={windows * 196} C={C} D={D} k={k}", inputs, {"k": k},
                          LPOSS_BACKENDS))
    # (B, C, H, W, radius): H, W odd, B = 2, C = 1, radius 1; the protocol's (C = 171 outside --quick)
    pixel = [(1, 3, 17, 23, 3), (2, 1, 9, 14, 6), (1, 4, 30, 7, 1)]
    if not cpu:
        pixel += [(1, 21, 448, 597, 6)] + ([] if quick else [(1, 171, 448, 597, 6)])
    for B, C, H, W, r in pixel:
        inputs = lposs_pixel_inputs(B, C, H, W, _gen("lposs+", B, C, H, W, r))
        cases.append(Case("pixel_propagation", f"B={B} C={C} {H}x{W} r={r}", inputs, {"radius": r}, LPOSS_BACKENDS))
    return cases


def _pamr_backends() -> tuple[str, ...]:
    """The backends with a PAMR (the Triton one once ovss_fast/kernels/triton has it)."""
    names = ("cuda", "cpu", "reference")
    triton = get_backend("triton")
    return names + ("triton",) if callable(getattr(type(triton), "pamr", None)) else names


# --------------------------------------------------------------------------- comparisons
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| over finite entries; inf when the -inf entries differ."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return float("inf")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        return float("inf")
    fin = ~inf_e
    if not bool(fin.any()):
        return 0.0
    if bool(torch.isnan(a[fin]).any()):
        return float("inf")
    return float((a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp_min(1e-30))


def compare(case: Case, out: Any, inputs32: tuple[torch.Tensor, ...]) -> tuple[bool, str]:
    """(passed, detail) for one backend output against the float64 reference on the same float32 values."""
    ref_in = tuple(t.double() for t in inputs32)
    ref = getattr(R, case.op)(*ref_in, **case.params)
    if case.op == "gibbs_kernel" and isinstance(out, torch.Tensor):  # gibbs_kernel_only: K alone, symmetric
        err = rel_err(out, ref[1])
        sym = torch.equal(out, out.transpose(1, 2))
        return err <= TOL and sym and out.dtype == torch.float32, \
            f"rel {err:.1e} (kernel only{'' if sym else ', NOT symmetric'})"
    if case.op == "gibbs_kernel":
        errs = [rel_err(o, r) for o, r in zip(out, ref, strict=True)]
        err = max(errs)
        return err <= TOL, f"rel {err:.1e} (cost {errs[0]:.1e}, kernel {errs[1]:.1e})"
    if case.op == "jbu_argmax":
        up = R.jbu_upsample(*ref_in, **case.params)
        fin = torch.where(torch.isfinite(up), up, torch.zeros_like(up))
        top2 = torch.topk(torch.where(torch.isfinite(up), up, torch.full_like(up, -1e300)), 2, dim=1).values \
            if up.shape[1] > 1 else None
        labels_ok = out.cpu() == ref.cpu()
        if top2 is not None:
            tie = (top2[:, 0] - top2[:, 1]) <= TOL * fin.abs().amax().clamp_min(1e-30)
            labels_ok |= tie.cpu()
        bad = int((~labels_ok).sum())
        same = int((out.cpu() == ref.cpu()).sum())
        return bad == 0 and out.dtype == torch.int64, f"{bad} labels differ off ties ({same}/{ref.numel()} equal)"
    if out.dtype != torch.float32:
        return False, f"output dtype {out.dtype}, expected float32"
    if case.op == "markov_scores" and case.params["readout"] == "velocity":
        # the tests' helpers (run from the repository root, as python -m bench.gpu_check)
        from tests.conftest import velocity_borderline, velocity_lstar

        near = velocity_borderline(ref_in[0], ref_in[1], sk_iters=case.params["sk_iters"],
                                   steps=case.params["steps"], tau=case.params["tau"]).to(ref.device)
        lstar_o = velocity_lstar(out.double(), ref_in[0])
        lstar_r = velocity_lstar(ref, ref_in[0])
        bad = torch.isfinite(ref) & (lstar_o != lstar_r) & ~near
        if bool(bad.any()):
            return False, f"{int(bad.sum())} lstar differ away from tau"
        out = torch.where(near, ref.to(out.dtype), out)
        err = rel_err(out, ref)
        return err <= TOL, f"rel {err:.1e} ({int(near.sum())} borderline lstar)"
    err = rel_err(out, ref)
    tol = PAMR_TOL if case.op == "pamr" else TOL
    return err <= tol, f"rel {err:.1e}"


#: "cuda[tile]": the cuda backend with OVSS_FAST_CUDA_DISCREPANCY=tile (the fallback schedule of
#: sinkhorn_scores / markov_scores); "cuda" runs the default (cooperative) schedule
SCHEDULE_ENV = "OVSS_FAST_CUDA_DISCREPANCY"
TILE_OPS = ("sinkhorn_scores", "markov_scores")
#: the label of Triton's gibbs_kernel_only (symmetric tiles, K only), in the correctness and timing parts
GIBBS_FUSED = "triton[gibbs fused]"
#: the largest N of the Triton window schedule (ovss_fast.kernels.triton.sinkhorn_scores.WINDOW_MAX_N; not imported
#: here, so that the check runs where triton is missing)
WINDOW_MAX_N = 512


@dataclass
class Variant:
    """A backend label of the correctness part: the backend, the environment its calls run under,
    extra keyword arguments, and the largest / smallest N it is for (sinkhorn / markov cases only)."""

    backend: str
    env: dict[str, str] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_n: int | None = None
    min_n: int | None = None
    #: only these (B, N, C) (None: every size in range); fewer shapes, fewer compiles and autotunings
    shapes: frozenset[tuple[int, int, int]] | None = None
    #: the ops it runs, and the backend method that runs them (None: the op's own name)
    ops: tuple[str, ...] = TILE_OPS
    method: str | None = None

    def takes(self, case: Case) -> bool:
        if case.op not in self.ops:
            return False
        B, n, C = case.inputs[0].shape
        if self.shapes is not None and (B, n, C) not in self.shapes:
            return False
        return (self.max_n is None or n <= self.max_n) and (self.min_n is None or n >= self.min_n)


# the Triton variants pass the backend's keyword options (TritonOptions: schedule, precision, gibbs)
_W = {"schedule": "window"}
_P = {"schedule": "persistent"}
_SYM = {"symmetric": True}
_TF = {"precision": "tf32x3"}
#: the window batches of the pipeline (coco_stuff, cityscapes) and one awkward small case
_WINDOW_SHAPES = frozenset({(2, 37, 5), (15, 196, 199), (36, 196, 29)})
VARIANTS: dict[str, Variant] = {
    "cuda[tile]": Variant("cuda", {SCHEDULE_ENV: "tile"}),
    "triton[split]": Variant("triton", {}, {"schedule": "split"}),
    "triton[window]": Variant("triton", {}, {**_W, **_SYM}, max_n=WINDOW_MAX_N),
    "triton[window,general]": Variant("triton", {}, _W, max_n=WINDOW_MAX_N, shapes=_WINDOW_SHAPES),
    "triton[window,tf32x3]": Variant("triton", {}, {**_W, **_TF, **_SYM}, max_n=WINDOW_MAX_N, shapes=_WINDOW_SHAPES),
    "triton[fused,tf32x3]": Variant("triton", {}, {"schedule": "fused", **_TF}, min_n=700),
    "triton[split,tf32x3]": Variant("triton", {}, {"schedule": "split", **_TF}, min_n=700),
    "triton[persistent]": Variant("triton", {}, {**_P, **_SYM}),
    "triton[persistent,general]": Variant("triton", {}, _P, max_n=1024),
    "triton[persistent,tf32x3]": Variant("triton", {}, {**_P, **_TF, **_SYM}, min_n=700),
    GIBBS_FUSED: Variant("triton", {}, {"gibbs": "fused"}, ops=("gibbs_kernel",), method="gibbs_kernel_only"),
}
#: the backends of the correctness part on a GPU, in order
GPU_BACKENDS = ["cuda", "cuda[tile]", "triton", *[k for k in VARIANTS if k.startswith("triton[")]]


class _Env:
    """Sets environment variables (None: unsets one) for the duration of a call; earlier values restored after."""

    def __init__(self, env: dict[str, str | None]) -> None:
        self.env = env

    def __enter__(self) -> None:
        self.old = {k: os.environ.get(k) for k in self.env}
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _Schedule(value: str | None) -> _Env:  # noqa: N802 - the CUDA schedule switch, used like a class
    """OVSS_FAST_CUDA_DISCREPANCY=value for the duration of a call (None: unset, the default schedule)."""
    return _Env({SCHEDULE_ENV: value})


def run_correctness(device: str, backends: list[str], quick: bool) -> tuple[list[list[str]], bool]:
    rows: list[list[str]] = []
    ok_all = True
    cases = build_cases(device, quick)
    for name in backends:
        variant = VARIANTS.get(name)
        backend = get_backend(variant.backend if variant else name)
        if isinstance(backend, UnavailableBackend):
            for op in OPS:
                rows.append([name, op, "-", "FAIL", f"backend unavailable: {backend.reason}"])
            ok_all = False
            continue
        for case in cases:
            if variant and not variant.takes(case):
                continue
            if case.only is not None and name not in case.only:
                continue
            inputs32 = tuple(t.to(device=device, dtype=torch.float32) for t in case.inputs)
            reasons = backend.unsupported_reasons(case.op, inputs32, case.params)
            if reasons:
                rows.append([name, case.op, case.label, "FAIL", "declined: " + "; ".join(reasons)])
                ok_all = False
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad(), _Env(variant.env if variant else {}):
                    method = (variant.method if variant else None) or case.op
                    out = getattr(backend, method)(*inputs32, **case.params, **(variant.kwargs if variant else {}))
                    if device == "cuda":
                        torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                passed, detail = compare(case, out, inputs32)
                detail += f", {dt * 1e3:.0f} ms"
            except Exception as exc:  # a crash is a failure, reported with its message
                passed, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ok_all &= passed
            rows.append([name, case.op, case.label, "PASS" if passed else "FAIL", detail])
            print(f"  {name:>22} {case.op:<20} {case.label:<42} {'PASS' if passed else 'FAIL'}  {detail}", flush=True)
    return rows, ok_all


# --------------------------------------------------------------------------- compute-sanitizer
def sanitizer_payload() -> int:
    """Call every CUDA op once on small awkward inputs (run under compute-sanitizer)."""
    import ovss_fast.kernels.extension as ext

    b = ext.CUDA_BACKEND
    dev = "cuda"
    g = _gen("sanitizer")
    q, k = _q(2, 37, 5, g, dead=(1,)).float().to(dev), _kernel(2, 37, g).float().to(dev)
    feats = torch.randn(2, 37, 16, generator=g).to(dev)
    text = torch.randn(5, 16, generator=g).to(dev)
    with torch.no_grad():
        b.class_distributions(feats, text, scale=100.0, nms=0.5)
        b.gibbs_kernel(_affinity(2, 37, g).float().to(dev), eps=0.1)
        b.kl_scores(q)
        for schedule in ("coop", "tile"):
            with _Schedule(schedule):
                b.sinkhorn_scores(q, k, eps=0.1, iters=3)
                b.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=2)
                for readout in ("integrated", "velocity"):
                    b.markov_scores(q, k, sk_iters=2, steps=3, readout=readout, tau=0.3)
                b.markov_scores(q.double(), k.double(), sk_iters=0, steps=2, readout="integrated", tau=0.3)
                torch.cuda.synchronize()
        s, guide = _scores_guide(2, 5, 7, 9, 30, 41, g, True)
        b.jbu_upsample(s.float().to(dev), guide.float().to(dev))
        b.jbu_argmax(s.float().to(dev), guide.float().to(dev))
        image, low = torch.randn(2, 3, 13, 11, generator=g).to(dev), torch.randn(2, 5, 7, 9, generator=g).to(dev)
        b.pamr(low, image, iters=3, dilations=(1, 8, 16))
        b.pamr(low.double(), image.double(), iters=2, dilations=(2,))
        b.pamr(torch.randn(2, 4, 13, 11, generator=g).to(dev), image, iters=1, dilations=(3,))
        sc, im = lposs_pixel_inputs(2, 3, 13, 11, g)
        b.pixel_propagation(sc.float().to(dev), im.float().to(dev), radius=6, iters=4)
        b.pixel_propagation(sc.to(dev)[:1, :1], im.to(dev)[:1], radius=1, iters=3)
        sc, feats, pos = lposs_patch_inputs(3, 9, 16, g)
        b.label_propagation(sc.float().to(dev), feats.float().to(dev), pos.float().to(dev), k=50, iters=4)
        b.label_propagation(sc.to(dev), feats.to(dev), pos.to(dev), k=400, iters=2)
    torch.cuda.synchronize()
    print("sanitizer payload done")
    return 0


def find_sanitizer() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            path = os.path.join(root, "bin", "compute-sanitizer")
            if os.path.exists(path):
                return path
    return shutil.which("compute-sanitizer")


def run_sanitizer(quick: bool) -> tuple[list[list[str]], bool]:
    exe = find_sanitizer()
    if exe is None:
        print("  compute-sanitizer not found under $CUDA_HOME/bin or on PATH: not run")
        return [["-", "ABSENT", "compute-sanitizer not found under $CUDA_HOME/bin or on PATH"]], True
    rows, ok_all = [], True
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for tool in ("memcheck", "racecheck"):
        cmd = [exe, "--tool", tool, "--error-exitcode", "99", sys.executable, "-m", "bench.gpu_check",
               "--sanitizer-payload"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240 if quick else 420)
            log = proc.stdout + proc.stderr
            summary = [ln.strip() for ln in log.splitlines() if "SUMMARY" in ln]
            errors = re.search(r"ERROR SUMMARY: ([1-9]\d*) error", log) or re.search(r"\(([1-9]\d*) errors?", log)
            passed = proc.returncode == 0 and errors is None and "sanitizer payload done" in log
            detail = (summary[-1] if summary else f"exit {proc.returncode}") + f", {time.perf_counter() - t0:.0f} s"
            if not passed:
                detail += " | " + " / ".join(ln for ln in log.splitlines()[-6:] if ln.strip())[:400]
        except subprocess.TimeoutExpired:
            passed, detail = False, "timed out"
        ok_all &= passed
        rows.append([tool, "PASS" if passed else "FAIL", detail])
        print(f"  {tool}: {'PASS' if passed else 'FAIL'} {detail}", flush=True)
    return rows, ok_all


# --------------------------------------------------------------------------- timing
def _timed_row(what: str, shape: str, label: str, fn: Callable[[], object] | str, rep: int,
               first_call: bool) -> list[str]:
    """One row of TIME_COLUMNS for ``fn`` (or the reason it cannot run); ``first_call`` notes the
    first call's wall time (compilation, autotuning, graph capture)."""
    if isinstance(fn, str):
        return [what, shape, label, "-", "-", "-", fn]
    try:
        with torch.no_grad():
            note = ""
            if first_call:
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                note = f"first call {time.perf_counter() - t0:.1f} s"
            ms, mem = time_gpu(fn, rep)
            graph = time_gpu_graph(fn, rep)
        return [what, shape, label, f"{ms:.3f}", graph, f"{mem:.1f}", note]
    except Exception as exc:
        return [what, shape, label, "-", "-", "-", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]


def _gibbs_fn(label: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """How the timing part builds K: gibbs_kernel_only with the option gibbs="fused" for
    ``GIBBS_FUSED``, the K of gibbs_kernel (which also writes the cost) for every other label."""
    if label == GIBBS_FUSED:
        def fused(b: Any, aff: torch.Tensor) -> torch.Tensor:
            return b.gibbs_kernel_only(aff, eps=0.1, gibbs="fused")
        return fused
    return lambda b, aff: b.gibbs_kernel(aff, eps=0.1)[1]


def run_timing(quick: bool) -> list[list[str]]:
    rows: list[list[str]] = []
    rep = 100 if quick else 400
    g = _gen("timing")
    N, C = 1024, 171
    q = _q(1, N, C, g).float().cuda()
    aff = _affinity(1, N, g).float().cuda()

    def ref_fn(mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(q: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
            _, k = R.gibbs_kernel(aff, eps=0.1)
            if mode == "op":
                return R.sinkhorn_scores(q, k, eps=0.1, iters=50)
            return R.markov_scores(q, k, sk_iters=15, steps=50)
        return f

    def backend_fn(name: str, mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str:
        schedule = "tile" if name == "cuda[tile]" else None
        gibbs = _gibbs_fn(name)
        b = get_backend("cuda" if schedule else "triton" if name == GIBBS_FUSED else name)
        if isinstance(b, UnavailableBackend):
            return b.reason
        reasons = b.unsupported_reasons("sinkhorn_scores" if mode == "op" else "markov_scores", (q, aff), {})
        if reasons:
            return "; ".join(reasons)

        def f(q: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
            k = gibbs(b, aff)
            with _Schedule(schedule):
                if mode == "op":
                    return b.sinkhorn_scores(q, k, eps=0.1, iters=50)
                return b.markov_scores(q, k, sk_iters=15, steps=50)
        return f

    for mode in ("mv", "op"):
        cands: dict[str, Any] = {"reference eager": ref_fn(mode)}
        cands["torch.compile(reference)"] = "skipped (--quick)" if quick else torch.compile(ref_fn(mode),
                                                                                           dynamic=False)
        cands["cuda"] = backend_fn("cuda", mode)
        cands["cuda[tile]"] = backend_fn("cuda[tile]", mode)
        cands["triton"] = backend_fn("triton", mode)
        cands[GIBBS_FUSED] = backend_fn(GIBBS_FUSED, mode)
        shape = f"B=1 N={N} C={C}"
        for label, fn in cands.items():
            call = fn if isinstance(fn, str) else (lambda fn=fn: fn(q, aff))
            rows.append(_timed_row(f"discrepancy {mode}", shape, label, call, rep, first_call=True))
            print("  " + " | ".join(rows[-1]), flush=True)

    # gibbs_kernel alone: the two-pass kernel (cost and K) against symmetric tiles (K only)
    b = get_backend("triton")
    for B, n in ((1, N), (1, 4096), (15, 196)):
        a = _affinity(B, n, g).float().cuda()
        cands = {"reference eager": lambda a=a: R.gibbs_kernel(a, eps=0.1)}
        for label in ("triton", GIBBS_FUSED):
            reasons = [b.reason] if isinstance(b, UnavailableBackend) else b.unsupported_reasons(
                "gibbs_kernel", (a,), {})
            gibbs = _gibbs_fn(label)
            cands[label] = "; ".join(reasons) if reasons else (lambda a=a, gibbs=gibbs: gibbs(b, a))
        for label, fn in cands.items():
            rows.append(_timed_row("gibbs_kernel", f"B={B} N={n}", label, fn, rep, first_call=True))
            print("  " + " | ".join(rows[-1]), flush=True)

    s, guide = _scores_guide(1, 171, 64, 64, 2048, 2048, g, False)
    s, guide = s.float().cuda(), guide.float().cuda()
    shape = "B=1 C=171 64x64->2048x2048"
    cands = {"reference eager": lambda: R.jbu_argmax(s, guide)}
    for name in ("cuda", "triton"):
        b = get_backend(name)
        reasons = [b.reason] if isinstance(b, UnavailableBackend) else b.unsupported_reasons(
            "jbu_argmax", (s, guide), {})
        cands[name] = "; ".join(reasons) if reasons else (lambda b=b: b.jbu_argmax(s, guide))
    for label, fn in cands.items():
        rows.append(_timed_row("jbu_argmax", shape, label, fn, rep, first_call=False))
        print("  " + " | ".join(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    # issue 21: the CUDA kernels at the protocol image sizes (bench/bench_jbu_argmax.py PROTOCOL)
    for B, C, h, w, H, W in ((1, 21, 21, 28, 375, 500), (1, 171, 28, 37, 480, 640), (1, 19, 35, 70, 1024, 2048)):
        s, guide = _scores_guide(B, C, h, w, H, W, g, False)
        s, guide = s.float().cuda(), guide.float().cuda()
        b = get_backend("cuda")
        for op in ("jbu_argmax", "jbu_upsample"):
            fn = b.reason if isinstance(b, UnavailableBackend) else (lambda b=b, op=op, s=s, guide=guide:
                                                                     getattr(b, op)(s, guide))
            rows.append(_timed_row(op, f"B={B} C={C} {h}x{w}->{H}x{W}", "cuda", fn, rep, first_call=False))
            print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def run_lposs_timing(quick: bool) -> list[list[str]]:
    """Issue 28: both LPOSS stages at the protocol's sizes (VOC-like: 375 x 500 -> 448 x 597, 15 windows of
    196 patches, k = 400, D = 768), C = 21 and 171: the PyTorch reference in float32 on the GPU, cuda, triton."""
    rows: list[list[str]] = []
    rep = 50 if quick else 200
    for C in (21, 171):
        g = _gen("lposs timing", C)
        patch = tuple(t.float().cuda() for t in lposs_patch_inputs(15, C, 768, g))
        pixel = tuple(t.float().cuda() for t in lposs_pixel_inputs(1, C, 448, 597, g))
        for op, inputs, shape in (("label_propagation", patch, f"N=2940 C={C} D=768 k=400"),
                                  ("pixel_propagation", pixel, f"B=1 C={C} 448x597 r=6")):
            cands: dict[str, Any] = {"reference eager": lambda op=op, inputs=inputs: getattr(R, op)(*inputs)}
            for name in ("cuda", "triton"):
                b = get_backend(name)
                reasons = [b.reason] if isinstance(b, UnavailableBackend) else b.unsupported_reasons(op, inputs, {})
                cands[name] = "; ".join(reasons) if reasons else (lambda b=b, op=op, inputs=inputs:
                                                                   getattr(b, op)(*inputs))
            for label, fn in cands.items():
                rows.append(_timed_row(op, shape, label, fn, rep, first_call=True))
                print("  " + " | ".join(rows[-1]), flush=True)
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- whole images (issue 26)
WHOLE_IMAGES = 50


def whole_image_inputs(smoke: bool, n: int = WHOLE_IMAGES) -> list:
    """The whole-image sizes of the dslo row: half VOC-like (C = 21), half ADE20K-like (C = 150, short side 336
    or 448), seeded (bench/_sizes.py); ``smoke``: 2 of them shrunk 8x (patches; guides of a few pixels) and
    to C <= 5, for the Triton interpreter."""
    from dataclasses import replace

    from ._sizes import whole_image_sizes

    sizes = whole_image_sizes("voc", n // 2, seed=1) + whole_image_sizes("ade", n - n // 2, seed=1)
    if smoke:
        sizes = [replace(x, h=max(2, x.h // 8), w=max(2, x.w // 8), H=max(3, x.h // 4), W=max(3, x.w // 4) + 1,
                         C=min(x.C, 5)) for x in sizes[:1] + sizes[-1:]]
    return sizes


def run_whole_images(device: str, smoke: bool = False, n: int = WHOLE_IMAGES,
                     budget_s: float | None = 180.0) -> list[str]:
    """One TIME_COLUMNS row: the dslo protocol's head (segment_features: class_distributions, discrepancy mv,
    jbu_argmax to the annotation size) on the Triton backend over ``n`` whole images of varied sizes
    (:func:`whole_image_inputs`), random CLIP-like inputs (D = 512); the total and first-call times, the
    autotuner's tunings (distinct size buckets, not shapes) and the CUDA graphs captured during the row.
    ``smoke``: 2 tiny images and 2 Sinkhorn-Knopp / chain steps, for the interpreter on the CPU (no tunings
    there: it runs fixed configs). No image starts after ``budget_s`` seconds (the note says how many ran)."""
    from ovss_fast.kernels.triton import _runtime
    from ovss_fast.ops.api import segment_features

    sizes = whole_image_inputs(smoke, n)
    what = f"dslo head, {len(sizes)} whole images"
    shape = (f"N={min(x.N for x in sizes)}..{max(x.N for x in sizes)} ({len({x.N for x in sizes})} distinct) "
             f"HxW up to {max(x.H * x.W for x in sizes)} px, C {' / '.join(map(str, sorted({x.C for x in sizes})))}")
    b = get_backend("triton")
    reasons = [b.reason] if isinstance(b, UnavailableBackend) else b.unsupported_reasons(
        "kl_scores", (torch.zeros(1, 1, 1, device=device),), {})
    if reasons:
        return [what, shape, "triton", "-", "-", "-", "; ".join(reasons)]
    D = 16 if smoke else 512
    head = {"sk_iters": 2, "steps": 2} if smoke else {}  # the interpreter runs every launch in Python
    g = _gen("whole images")
    tuned0 = sum(_runtime.tunings().values())
    captures0 = _runtime.GRAPHS.policy.captures
    times: list[float] = []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for x in sizes:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    break
                feats = torch.randn(1, x.N, D, generator=g).to(device)
                text = torch.randn(x.C, D, generator=g).to(device)
                aff = torch.rand(1, x.N, x.N, generator=g).to(device)
                guide = torch.rand(1, 3, x.H, x.W, generator=g).to(device)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                labels = segment_features(feats, text, aff, grid=(x.h, x.w), guide=guide, mode="mv", backend="triton",
                                           **head)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if tuple(labels.shape) != (1, x.H, x.W):
                    raise RuntimeError(f"labels {tuple(labels.shape)} for a {x.H} x {x.W} guide")
    except Exception as exc:
        return [what, shape, "triton", "-", "-", "-", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]
    tunings = sum(_runtime.tunings().values()) - tuned0
    captures = _runtime.GRAPHS.policy.captures - captures0
    rest = sorted(times[1:]) or times
    note = (f"total {sum(times):.2f} s, first call {times[0]:.2f} s, median after it "
            f"{1e3 * rest[len(rest) // 2]:.1f} ms, {tunings} tunings (all ops), {captures} graph captures")
    if len(times) < len(sizes):
        note += f"; stopped after {len(times)} images (past {budget_s:.0f} s)"
    return [what, shape, "triton", f"{1e3 * sum(times) / len(times):.1f} (mean)", "-", "-", note]


# --------------------------------------------------------------------------- pipeline
def run_pipeline(quick: bool, results_dir: str | None, write: bool) -> bool:
    """bench/bench_pipeline.py on CUDA (ViT-B-16 random weights; needs open_clip): True when its checks pass."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("  pipeline: not run (open_clip not installed: pip install open_clip_torch)")
        return True
    from pathlib import Path

    from .bench_pipeline import run

    try:
        # few images: the whole GPU check, build included, must stay well under the session's device time
        ok, _ = run("cuda", images=2 if quick else 3, loader_images=2 if quick else 4,
                    out_dir=Path(results_dir) if results_dir else None, write=write)
    except Exception:
        traceback.print_exc()
        print("  pipeline: FAILED (see the log)")
        return False
    return ok


# --------------------------------------------------------------------------- main
def _rows_or_failure(what: str, run: Callable[[], list[list[str]]]) -> list[list[str]]:
    """run()'s TIME_COLUMNS rows, or one row saying it failed (the traceback printed to the log)."""
    try:
        return run()
    except Exception:
        traceback.print_exc()
        return [[what, "-", "-", "-", "-", "-", "failed: see the log"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ovss_fast GPU check: correctness, compute-sanitizer, timings")
    p.add_argument("--quick", action="store_true", help="no N=4096 cases, short timings, no torch.compile")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: dry run of the correctness part against the cpu backend (no GPU needed)")
    p.add_argument("--skip-sanitizer", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-pipeline", action="store_true", help="skip the end-to-end pipeline benchmark")
    p.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md and results.csv alone")
    p.add_argument("--results-dir", default=None, help="write RESULTS.md / results.csv here instead of bench/")
    p.add_argument("--skip-regimes", action="store_true", help="no regime table (bench_discrepancy.run_regimes)")
    p.add_argument("--skip-whole-images", action="store_true",
                   help=f"no dslo-head row over {WHOLE_IMAGES} whole-image sizes (Triton; tunings and graph captures)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated correctness backends (default on a GPU: {','.join(GPU_BACKENDS)})")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no regime-table row after this many seconds since the check began")
    p.add_argument("--sanitizer-payload", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sanitizer_payload:
        return sanitizer_payload()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("FAIL: torch.cuda.is_available() is False (use --device cpu for the dry run)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    card, vers = device_name(device), versions()
    print(f"ovss_fast GPU check on {card}\n{vers}\n")
    backends = GPU_BACKENDS if device == "cuda" else ["cpu"]
    if args.backends is not None:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in (*GPU_BACKENDS, "cpu", "reference")]
        if unknown:
            p.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(GPU_BACKENDS)}, cpu")
    print(f"== correctness ({', '.join(backends)} vs float64 reference)")
    corr_rows, corr_ok = run_correctness(device, backends, args.quick)
    if device == "cpu":
        print("  triton: not run (--device cpu: Triton needs CUDA)")
    lposs_rows: list[list[str]] = []
    if device == "cuda" and not args.skip_timing:
        print("== LPOSS / LPOSS+ timing (protocol sizes)")
        lposs_rows = _rows_or_failure("lposs timing", lambda: run_lposs_timing(args.quick))
    whole_rows: list[list[str]] = []
    if not args.skip_whole_images:
        # on a GPU before the regime table (inside the budget); on the CPU the interpreter's smoke run
        print(f"== dslo head over whole-image sizes (triton{'' if device == 'cuda' else ', interpreter smoke'})")
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
        whole_rows = [run_whole_images(device, smoke=device != "cuda",
                                       budget_s=180.0 if left is None else max(30.0, min(180.0, left / 2)))]
        print("  " + " | ".join(whole_rows[-1]), flush=True)
    san_rows: list[list[str]] = []
    san_ok = True
    if device == "cuda" and not args.skip_sanitizer:
        print("== compute-sanitizer")
        san_rows, san_ok = run_sanitizer(args.quick)
    # the regime table before the older N = 1024 / jbu timing table: it is what a short session is for
    regime_records: list[dict] = []
    if device == "cuda" and not args.skip_regimes:
        from . import bench_discrepancy as bd

        print("== regime table (bench/bench_discrepancy.py run_regimes)")
        try:
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
            regime_records = bd.run_regimes("cuda", quick=args.quick, rep_ms=50 if args.quick else 200,
                                            budget_s=left)
        except Exception:
            traceback.print_exc()
    time_rows: list[list[str]] = []
    past_budget = args.budget_s is not None and time.perf_counter() - t_start > args.budget_s
    if device == "cuda" and not args.skip_timing and past_budget:
        print(f"== timing: skipped (past --budget-s {args.budget_s:.0f})")
    elif device == "cuda" and not args.skip_timing:
        print("== timing (triton.testing.do_bench, median)")
        time_rows = _rows_or_failure("timing", lambda: run_timing(args.quick))

    time_rows = lposs_rows + whole_rows + time_rows
    n_fail = sum(r[3] == "FAIL" for r in corr_rows)
    corr_table = markdown_table(["backend", "op", "case", "result", "detail"], corr_rows)
    print("\n== summary")
    print(corr_table)
    if san_rows:
        print(markdown_table(["tool", "result", "detail"], san_rows))
    if time_rows:
        print(markdown_table(TIME_COLUMNS, time_rows))
    if regime_records:
        from . import bench_discrepancy as bd

        print(bd.regime_table(regime_records))
    ok = corr_ok and san_ok
    elapsed = time.perf_counter() - t_start
    print(f"\n{'ALL PASSED' if ok else 'FAILURES'}: {len(corr_rows) - n_fail}/{len(corr_rows)} correctness cases "
          f"passed; sanitizer {'ok' if san_ok else 'FAILED'}; {elapsed:.0f} s")

    if device == "cuda" and not args.no_write:
        from pathlib import Path

        out_dir = Path(args.results_dir) if args.results_dir else None
        body = [f"`python -m bench.gpu_check{' --quick' if args.quick else ''}` on **{card}**; {vers}; {now()}; "
                f"{elapsed:.0f} s. Result: **{'all passed' if ok else 'FAILURES'}** "
                f"({len(corr_rows) - n_fail}/{len(corr_rows)} correctness cases).", "",
                "### Correctness (float32 inputs vs the float64 reference, rel. error <= 1e-4)", "", corr_table]
        if san_rows:
            body += ["", "### compute-sanitizer", "", markdown_table(["tool", "result", "detail"], san_rows)]
        if time_rows:
            body += ["", "### Timing (triton.testing.do_bench median; peak = torch.cuda.max_memory_allocated "
                     "above the baseline)", "",
                     markdown_table(TIME_COLUMNS, time_rows)]
        write_section("GPU check", "\n".join(body), None if out_dir is None else out_dir / "RESULTS.md")
        csv_rows = [{"date": now(), "bench": "gpu_check", "device": card, "versions": vers, "op": r[0],
                     "shape": r[1], "dtype": "float32", "backend": r[2], "median_ms": r[3], "peak_mem_mb": r[5],
                     "note": f"graph replay {r[4]} ms; {r[6]}"} for r in time_rows if r[3] != "-"]
        if csv_rows:
            append_rows(csv_rows, None if out_dir is None else out_dir / "results.csv")
        if regime_records:
            from . import bench_discrepancy as bd

            bd.write_results_json(regime_records, None if out_dir is None else out_dir / "results_gpu.json")
            write_section("Discrepancy regimes on GPU", bd.regime_section(regime_records, card, vers, args.quick),
                          None if out_dir is None else out_dir / "RESULTS.md")
    if device == "cuda" and not args.skip_pipeline:
        print("== pipeline (bench/bench_pipeline.py)")
        ok &= run_pipeline(args.quick, args.results_dir, write=not args.no_write)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
