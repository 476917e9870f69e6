"""Calibrate the CLIP-like scenes (issue 29) on two numbers per dataset family, then freeze them.

``python -m bench.calibrate_scenes [--seeds 16] [--fine] [--out DIR]``

The scenes of :func:`ovss_fast.synthetic.make_clip_like_scene` have a few strengths
(:class:`~ovss_fast.synthetic.ClipLikeParams`). Two are calibrated here, per family, and nothing else:
``bias`` (the image-level term and the per-class text bias) and ``noise`` (class-specific, spatially
correlated), with ``evidence`` fixed at ``EVIDENCE`` (a true-class lead of 2 logits, a cosine lead of 0.02 at
CLIP's scale of 100). The search is the grid ``BIAS`` x ``NOISE`` (then, with ``--fine``, the finer grid
``FINE`` where the coarse one steps over a target), scored ONLY on raw argmax and + KL (no
affinity, no JBU: both are read off the logits, ``ClipLikeLayout.logits``), the mean over both difficulties
and ``--seeds`` seeds of each; the point closest to the paper's levels (VOC21: raw 0.186, KL 0.442; COCO-Stuff:
raw 0.072, KL 0.121), distance in units of the issue's tolerances, wins. The chosen values are then typed into
``ovss_fast.synthetic.CLIP_LIKE`` by hand, once (this script says whether they match). The guide's boundary AUC
(``boundary_auc``) is reported beside it; it does not enter the choice.

Writes the "Scene calibration" section of ``OUT/RESULTS.md`` (default bench/).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._results_io import BENCH_DIR, device_name, markdown_table, now, versions, write_section  # noqa: E402
from ovss_fast.kernels import reference as R  # noqa: E402
from ovss_fast.synthetic import (  # noqa: E402
    CLIP_LIKE,
    CLIP_LIKE_DIFFICULTY,
    ClipLikeLayout,
    boundary_auc,
    clip_like_layout,
    make_clip_like_scene,
    miou,
)

HEADING = "Scene calibration"
#: the paper's ablation, raw logits and + KL (mIoU / 100): VOC21 and COCO-Stuff (method.md, "Ablation")
TARGETS = {"voc": (0.186, 0.442), "stuff": (0.072, 0.121)}
#: the issue's tolerances for (raw, KL): VOC-like +/- 0.05 and 0.07, Stuff-like 0.04 each
TOLERANCE = {"voc": (0.05, 0.07), "stuff": (0.04, 0.04)}
EVIDENCE = 2.0
BIAS = (1.0, 2.0, 3.0, 4.0, 6.0)
NOISE = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: the second stage (``--fine``), Stuff-like only: its coarse KL column jumps from 0.75 (noise 0.2) to 0.10
#: (noise 0.5) across the target 0.121, so the noise steps between them, on the three lowest biases
FINE = {"stuff": ((1.0, 2.0, 3.0), (0.3, 0.35, 0.4, 0.45))}
#: seed offset of the calibration scenes: none of them is a scene of the ablation (bench_ablation uses 0..999 per
#: column block), so the ablation is a check on fresh scenes
SEED0 = 50_000


def predict(lay: ClipLikeLayout, logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Labels at the image's resolution: argmax of the logits (raw) or of the KL scores of softmax(logits)
    (CLIP's scale is in the logits), nearest-upsampled from the patch grid, as bench_ablation's first rows."""
    if mode == "raw":
        scores = logits
    else:
        scores = R.kl_scores(R.normalise_columns(torch.softmax(logits, dim=-1)[None]))[0]
    lab = scores.argmax(dim=-1).reshape(1, 1, *lay.grid).float()
    return F.interpolate(lab, size=tuple(lay.labels_full.shape), mode="nearest")[0, 0].long()


def score(lays: list[ClipLikeLayout], kind: str, bias: float, noise: float) -> tuple[list[float], list[float]]:
    p = dataclasses.replace(CLIP_LIKE[kind], evidence=EVIDENCE, bias=bias, noise=noise)
    raw, kl = [], []
    for lay in lays:
        lg = lay.logits(p)
        c = lg.shape[1]
        raw.append(miou(predict(lay, lg, "raw"), lay.labels_full, c))
        kl.append(miou(predict(lay, lg, "kl"), lay.labels_full, c))
    return raw, kl


def distance(kind: str, raw: float, kl: float) -> float:
    (tr, tk), (sr, sk) = TARGETS[kind], TOLERANCE[kind]
    return ((raw - tr) / sr) ** 2 + ((kl - tk) / sk) ** 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="calibrate the CLIP-like scenes on raw and + KL")
    p.add_argument("--seeds", type=int, default=16, help="scenes per (family, difficulty) (default 16)")
    p.add_argument("--out", type=Path, default=None, help="folder of RESULTS.md (default bench/)")
    p.add_argument("--fine", action="store_true", help="the second stage: FINE's grid, its own section")
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    body: list[str] = []
    chosen: dict[str, tuple[float, float]] = {}
    grids: dict[str, list[list[str]]] = {}
    grid = FINE if args.fine else {kind: (BIAS, NOISE) for kind in TARGETS}
    for kind, (biases, noises) in grid.items():
        lays = [clip_like_layout(SEED0 + s, kind, d) for d in CLIP_LIKE_DIFFICULTY for s in range(args.seeds)]
        results = {}
        for bias, noise in itertools.product(biases, noises):
            raw, kl = score(lays, kind, bias, noise)
            results[bias, noise] = (mean(raw), mean(kl), distance(kind, mean(raw), mean(kl)))
        best = min(results, key=lambda k: results[k][2])
        chosen[kind] = best
        grids[kind] = [[f"{b:g}"] + [f"{results[b, n][0]:.3f} / {results[b, n][1]:.3f}" for n in noises]
                       for b in biases]
        print(f"{kind}: bias {best[0]:g}, noise {best[1]:g}: raw {results[best][0]:.3f}, KL {results[best][1]:.3f}",
              flush=True)
    # per column at the chosen point, and the guide's boundary AUC on full scenes (first 4 seeds)
    col_rows = []
    for kind in grid:
        bias, noise = chosen[kind]
        params = dataclasses.replace(CLIP_LIKE[kind], evidence=EVIDENCE, bias=bias, noise=noise)
        for d in CLIP_LIKE_DIFFICULTY:
            lays = [clip_like_layout(SEED0 + s, kind, d) for s in range(args.seeds)]
            raw, kl = score(lays, kind, bias, noise)
            aucs = [boundary_auc(sc.guide[0], sc.labels_full[0]) for sc in
                    (make_clip_like_scene(SEED0 + s, kind, d, params=params) for s in range(min(4, args.seeds)))]
            col_rows.append([f"{kind} {d}", f"{mean(raw):.3f} ± {pstdev(raw):.3f}",
                             f"{mean(kl):.3f} ± {pstdev(kl):.3f}", f"{mean(aucs):.3f}"])
    frozen = {k: (CLIP_LIKE[k].evidence, CLIP_LIKE[k].bias, CLIP_LIKE[k].noise) for k in grid}
    match = all(frozen[k] == (EVIDENCE, *chosen[k]) for k in grid)
    wall = time.perf_counter() - t0
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    body += [
        f"{now()}; {device_name('cpu')}; {versions()}; load average at the end {load}. "
        f"`python -m bench.calibrate_scenes --seeds {args.seeds}{' --fine' if args.fine else ''}`: wall time "
        f"{wall:.0f} s.",
        "",
        f"`make_clip_like_scene`'s strengths, per family: evidence fixed at {EVIDENCE:g} logits; bias and noise "
        f"chosen on the grid below ONLY by raw argmax and + KL (patch grid, nearest upsampling), the mean over "
        f"easy and hard, {args.seeds} seeds each (seeds {SEED0}.., none of them an ablation scene). Target: the "
        f"paper's VOC21 raw {TARGETS['voc'][0]} / KL {TARGETS['voc'][1]} and COCO-Stuff raw {TARGETS['stuff'][0]} "
        f"/ KL {TARGETS['stuff'][1]}; distance in units of the issue's tolerances (VOC ±0.05 / ±0.07, Stuff "
        "±0.04). Every other knob (noise correlation, texture, parts, camouflage, the affinity) was set before "
        "and is not searched.",
        "",
        ("Second stage, on the grid of `FINE` only (the coarse stage is the section above). " if args.fine else "")
        + "Chosen: " + "; ".join(f"{k}: bias {chosen[k][0]:g}, noise {chosen[k][1]:g}" for k in grid)
        + (". `ovss_fast.synthetic.CLIP_LIKE` holds these values (frozen)." if match else
           f". NOTE: `ovss_fast.synthetic.CLIP_LIKE` differs ({frozen}): type the chosen values in."),
        "",
        markdown_table(["column", "raw", "+ KL", "guide boundary AUC (4 scenes)"], col_rows),
        "",
    ]
    for kind, (_, noises) in grid.items():
        body += [f"Grid, {kind}: raw / + KL (rows bias, columns noise):", "",
                 markdown_table(["bias"] + [f"{n:g}" for n in noises], grids[kind]), ""]
    out = args.out or BENCH_DIR
    heading = HEADING + (", second stage" if args.fine else "")
    write_section(heading, "\n".join(body).rstrip(), out / "RESULTS.md")
    print(f"wrote the '{heading}' section of {out / 'RESULTS.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
