"""The paper's ablation replayed on synthetic scenes (method.md section 6), and the head defaults it decides.

``python -m bench.bench_ablation [--smoke] [--seeds 16] [--out DIR] [--threads T]``

Scenes: ``ovss_fast.synthetic.make_clip_like_scene`` (issue 29: CLIP-like failures, strengths calibrated on raw
and + KL only by bench/calibrate_scenes.py), one fresh image per (column, seed): VOC-like (21 classes, 2-6
present, 21 x 28 patches) and Stuff-like (171 classes, 8-20 present, 24 x 24 patches), easy and hard. mIoU
per image at the guide's resolution (the classes in the prediction or the ground truth), then mean and spread
over the seeds (default 16).

Main table, each row adding one part to the row above with every other setting at the code's defaults
(``HeadOptions()``): raw logits (argmax of the patch-text cosine); + KL; + JBU; + OP; + MV, each readout
(integrated, velocity) and transition (gibbs, attention), in place of OP, and the paper's MV (velocity,
attention, tau 0.3); OP and MV fused (the mean of the two score maps after per-image standardisation), for our
MV and the paper's. Rows before "+ JBU" are nearest-upsampled from the patch grid. NMS is a side table: KL by
axis and ratio (``NMS_RATIOS``), and the MV heads with each axis at its best KL ratio. Everything runs in the
float32 reference (``ovss_fast.kernels.reference``) except JBU, which is ``ops.jbu_argmax`` (the fused CPU
kernel where the extension is built; it matches the reference).

Then the defaults (the rule of issue 19): where the paper is explicit (mode mv, transition attention,
readout velocity, eps 0.1, iters 50, sk_iters 15, tau 0.3), its choice unless the ablation shows it worse
by more than ``MARGIN`` mIoU on average over the four columns; where it is silent (NMS ratio and axis,
steps, the JBU parameters), the ablation's best (for radius and steps, the cheapest within ``TIE`` of the
best). The parameter sweeps run on the head the earlier decisions
chose and are scored without JBU (nearest upsampling), except the JBU sweep.

Heads and refiners side table: the default head (mode mv, ``HeadOptions()``'s values) by bilinear, JBU, PAMR
(NACLIP's 10 iterations, dilations (8, 16), on the guide normalised with CLIP's mean / std) and LPOSS+ (the
pixel stage, ``ops.pixel_propagation``); OP with JBU; LPOSS's patch stage (``ops.label_propagation`` at LPOSS's
published settings, y0 the raw cosines, the kNN graph on the scene's ``dino_feats``, sigma scaled to 8 px patches)
by bilinear, JBU and LPOSS+; and LPOSS's propagation from the default head's input N Q. mIoU and Boundary IoU per
image. It decides nothing.

Writes the "Synthetic ablation" section of ``OUT/RESULTS.md``, ``OUT/plots/ablation.png`` (matplotlib) and
(not with --smoke) the defaults table between the markers of docs/defaults.md, which the README's table copies;
``--smoke`` (seconds): two seeds of small scenes (10 x 12 patches), short sweeps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._results_io import BENCH_DIR, device_name, markdown_table, now, versions, write_section  # noqa: E402
from ovss_fast.eval.metrics import boundary_intersection_union, scores_from_boundary  # noqa: E402
from ovss_fast.kernels import reference as R  # noqa: E402
from ovss_fast.models.clip_features import normalise  # noqa: E402
from ovss_fast.models.loading import _OPENAI_MEAN, _OPENAI_STD  # noqa: E402
from ovss_fast.ops import api as ops  # noqa: E402
from ovss_fast.ops.options import HeadOptions  # noqa: E402
from ovss_fast.synthetic import DATASETS, Scene, make_clip_like_scene, miou  # noqa: E402

HEADING = "Synthetic ablation"
COLUMNS = (("voc", "easy"), ("voc", "hard"), ("stuff", "easy"), ("stuff", "hard"))
KIND_LABEL = {"voc": "VOC-like", "stuff": "Stuff-like"}
NMS_RATIOS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
NMS_AXES = ("classes", "patches")
#: a paper-explicit default stays unless the ablation shows it worse by more than this (mIoU, mean of the columns)
MARGIN = 0.02
#: where the paper is silent, candidates within TIE mIoU of the best count as tied (a difference far below the
#: seeds' spread) and the cheapest of them wins, for the parameters with a cost order (COST); else the best
TIE = 0.005
#: what a larger value costs: JBU taps grow as (2 radius + 1)^2, the chain's work with its steps
COST = {"radius": lambda v: v, "steps": lambda v: v}
#: the head's parameters as the paper states them (method.md, "What the full paper reports")
PAPER = {"mode": "mv", "transition": "attention", "readout": "velocity", "eps": 0.1, "iters": 50, "sk_iters": 15,
         "tau": 0.3}
#: the paper's ablation (CLIP ViT-B/16, mIoU %): VOC21, COCO-Stuff, and the mean of its four benchmarks
#: (VOC21, Stuff, City, ADE). Typed once from method.md's "Ablation" table; nothing else here is typed by hand.
PAPER_ROWS = {
    "raw": (18.6, 7.2, 8.9),
    "kl": (44.2, 12.1, 17.8),
    "nms": (45.9, 13.0, 19.1),
    "jbu": (46.3, 13.3, 19.6),
    "op": (66.9, 28.6, 40.0),
    "mv": (67.8, 28.9, 40.8),
    "fused": (64.9, 26.8, 38.4),
}
#: the backend of the OP and MV heads: "reference" (the float32 spec, default) or an ops backend ("cpu": the
#: compiled kernels, about twice as fast here, labels equal to the reference's); set by --backend
BACKEND = "reference"
MV_VARIANTS = tuple((r, t) for r in ("integrated", "velocity") for t in ("gibbs", "attention"))
#: the refiners of the heads side table: the step from a head's patch scores to the guide's pixels; the default
#: head takes each of them
REFINERS = ("bilinear", "jbu", "pamr", "lposs+")
REFINER_LABEL = {"bilinear": "bilinear", "jbu": "JBU", "pamr": "PAMR", "lposs+": "LPOSS+"}
#: the heads side table's other rows, (head, refiner): OP, and LPOSS's patch stage (from the raw cosines, as
#: published, and from MV's start N Q, the same input as the default head)
OTHER_HEADS = (("op", "jbu"), ("lposs", "bilinear"), ("lposs", "jbu"), ("lposs", "lposs+"), ("lposs_nq", "bilinear"))
HEAD_LABEL = {"mv": "MV (default head)", "op": "OP", "lposs": "LPOSS", "lposs_nq": "LPOSS from N·Q"}
#: LPOSS's published settings (configs/lposs.yaml, lposs_plus.yaml; docs/lposs.md): the patch stage, with
#: sigma per pixel of LPOSS's images, where a patch is LPOSS_PATCH_PX pixels (ViT-B/16) ...
LPOSS = {"k": 400, "gamma": 3.0, "sigma": 0.01, "dist_pow": 1.0, "alpha": 0.95, "iters": 10, "tol": 1e-6}
LPOSS_PATCH_PX = 16
#: ... and the pixel stage (LPOSS+), per pixel of the guide as published (a 13 x 13 window, Lab tau 0.01)
LPOSS_PLUS = {"radius": 6, "tau": 0.01, "alpha": 0.95, "iters": 10, "tol": 1e-6}
#: the backend of both LPOSS stages (the compiled CPU ops)
LPOSS_BACKEND = "cpu"


@dataclass(frozen=True)
class Plan:
    seeds: int
    grid: dict[str, tuple[int, int] | None]
    nms_ratios: tuple[float, ...] = NMS_RATIOS
    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    tau: tuple[float, ...] = (0.1, 0.3, 0.5)
    iters: tuple[int, ...] = (25, 50)
    sk_iters: tuple[int, ...] = (5, 15, 30)
    steps: tuple[int, ...] = (25, 50, 100)
    sigma_spatial: tuple[float, ...] = (0.5, 1.0, 2.0)
    sigma_range: tuple[float, ...] = (0.05, 0.1, 0.2)
    radius: tuple[int, ...] = (1, 2)


FULL = Plan(seeds=16, grid={"voc": None, "stuff": None})
SMOKE = Plan(seeds=2, grid={"voc": (10, 12), "stuff": (10, 12)}, nms_ratios=(0.0, 0.2, 0.5), eps=(0.05, 0.1),
             tau=(0.1, 0.3), iters=(10, 50), sk_iters=(15,), steps=(50,), sigma_spatial=(1.0,), sigma_range=(0.1,),
             radius=(2,))


def column_name(col: tuple[str, str]) -> str:
    return f"{KIND_LABEL[col[0]]} {col[1]}"


def scene_seed(col: tuple[str, str], seed: int) -> int:
    """A different scene for every (column, seed): no two cells share a generator seed."""
    return 1000 * COLUMNS.index(col) + seed


def key_of(head: dict) -> tuple:
    return tuple(sorted(head.items()))


def standardise(s: torch.Tensor) -> torch.Tensor:
    """Each image's scores [B, N, C] to zero mean and unit spread over its finite entries (-inf stays -inf)."""
    out = []
    for img in s:
        fin = torch.isfinite(img)
        vals = img[fin]
        sd = vals.std() if vals.numel() > 1 else torch.ones((), dtype=img.dtype)
        out.append(torch.where(fin, (img - vals.mean()) / sd.clamp_min(1e-12), img))
    return torch.stack(out)


@dataclass
class Case:
    """One scene with its memoised class distributions, transitions, head scores and evaluations.

    A head is a dict: ``mode`` ("raw", "kl", "op", "mv" or "fused") and its parameters (``nms`` as
    (ratio, axis)); a fused head names its two parts as ``op`` and ``mv`` (heads as sorted item tuples).
    """

    scene: Scene
    q_cache: dict = field(default_factory=dict)
    kernel_cache: dict = field(default_factory=dict)
    score_cache: dict = field(default_factory=dict)
    eval_cache: dict = field(default_factory=dict)

    def q(self, nms: tuple[float, str]) -> torch.Tensor:
        """``R.class_distributions(feats, text, nms=ratio, nms_axis=axis)``, its softmax computed once per scene."""
        nms = (0.0, "classes") if nms[0] == 0 else nms
        if nms not in self.q_cache:
            if "p" not in self.q_cache:  # reference.class_distributions' P (method.md section 1, scale 100)
                x, t = R.unit_vectors(self.scene.feats), R.unit_vectors(self.scene.text)
                self.q_cache["p"] = torch.softmax(100.0 * torch.einsum("bnd,cd->bnc", x, t), dim=-1)
            p = self.q_cache["p"]
            if nms[0] > 0:
                p = R.suppress_weak(p, nms[0], dim=-1 if nms[1] == "classes" else 1)
            self.q_cache[nms] = R.normalise_columns(p)
        return self.q_cache[nms]

    def transition(self, transition: str, eps: float) -> torch.Tensor:
        key = (transition, eps if transition == "gibbs" else None)
        if key not in self.kernel_cache:
            self.kernel_cache[key] = R.markov_transition(self.scene.affinity, transition=transition, eps=eps)
        return self.kernel_cache[key]

    def scores(self, head: dict) -> torch.Tensor:
        key = key_of(head)
        if key not in self.score_cache:
            self.score_cache[key] = self._scores(dict(head))
        return self.score_cache[key]

    def _scores(self, head: dict) -> torch.Tensor:
        mode = head.pop("mode")
        if mode == "raw":  # the logits (CLIP's scale does not move the argmax)
            return torch.einsum("bnd,cd->bnc", R.unit_vectors(self.scene.feats), R.unit_vectors(self.scene.text))
        if mode == "lposs":
            return self._lposs(head)
        if mode == "fused":
            return (standardise(self.scores(dict(head["op"]))) + standardise(self.scores(dict(head["mv"])))) / 2
        q = self.q(head.pop("nms", (0.0, "classes")))
        if mode == "kl":
            return R.kl_scores(q)
        eps = head.pop("eps", PAPER["eps"])
        if mode not in ("op", "mv"):
            raise ValueError(f"unknown mode {mode!r}")
        if BACKEND != "reference":  # ops.discrepancy: the compiled kernels, equal to the reference (method.md 5)
            return ops.discrepancy(q, self.scene.affinity, mode=mode, eps=eps, backend=BACKEND, **head)
        if mode == "op":
            return R.sinkhorn_scores(q, self.transition("gibbs", eps), eps=eps, **head)
        return R.markov_scores(q, self.transition(head.pop("transition"), eps), **head)

    def _lposs(self, head: dict) -> torch.Tensor:
        """LPOSS's patch stage (``ops.label_propagation``, LPOSS's published settings) over the scene's patches, the
        kNN graph on its ``dino_feats``. y0 (``head["y0"]``): "cosine", the raw patch-text cosines (LPOSS's input),
        or "nq", N Q (MV's start f(0), with ``head["nms"]``). Positions: patch centres in guide pixels; sigma scaled
        by LPOSS_PATCH_PX / the scene's pixels per patch, so the geometric term per patch is LPOSS's
        (exp(-0.16) between neighbouring patches)."""
        sc = self.scene
        if sc.dino_feats is None:
            raise ValueError("LPOSS rows need a scene with dino_feats (make_clip_like_scene)")
        y0 = head.pop("y0")
        if y0 == "cosine":
            scores = self.scores({"mode": "raw"})
        elif y0 == "nq":
            scores = self.q(head.pop("nms", (0.0, "classes"))) * sc.feats.shape[1]
        else:
            raise ValueError(f"unknown LPOSS input y0={y0!r}")
        h, w = sc.grid
        px = sc.guide.shape[-1] / w
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = (torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).float() + 0.5) * px  # [N, 2] (y, x) pixels
        params = {**LPOSS, "sigma": LPOSS["sigma"] * LPOSS_PATCH_PX / px}
        return ops.label_propagation(scores, sc.dino_feats, pos, backend=LPOSS_BACKEND, **params)

    def evaluate(self, head: dict, jbu: dict | None) -> float:
        """mIoU at the guide's resolution of ``head``'s labels: JBU with ``jbu``'s parameters, or nearest."""
        key = (key_of(head), None if jbu is None else key_of(jbu))
        if key not in self.eval_cache:
            sc = self.scene
            maps = self.scores(head).transpose(1, 2).reshape(1, -1, *sc.grid).contiguous()
            if jbu is None:
                lab = maps.argmax(dim=1, keepdim=True).float()
                lab = F.interpolate(lab, size=sc.guide.shape[-2:], mode="nearest")[:, 0].long()
            else:
                lab = ops.jbu_argmax(maps, sc.guide, **jbu)
            self.eval_cache[key] = miou(lab[0], sc.labels_full[0], sc.text.shape[0])
        return self.eval_cache[key]

    def refined(self, head: dict, refiner: str, jbu: dict, pamr: dict) -> tuple[float, float]:
        """(mIoU, mBIoU) at the guide's resolution of ``head``'s labels after ``refiner``: "bilinear"
        (``ops.refine_scores``, align_corners=False), "jbu" (``ops.jbu_argmax`` with ``jbu``), "pamr"
        (bilinear, then PAMR with ``pamr`` on the guide normalised with OpenAI CLIP's mean / std, as the
        Segmenter does) or "lposs+" (bilinear, then LPOSS+'s pixel stage ``ops.pixel_propagation`` on the guide
        with LPOSS_PLUS). mBIoU: Boundary IoU of this image over the scene's classes, the mean over the classes
        with a non-zero boundary union."""
        key = ("refined", key_of(head), refiner)
        if key not in self.eval_cache:
            sc = self.scene
            maps = self.scores(head).transpose(1, 2).reshape(1, -1, *sc.grid).contiguous()
            size = tuple(sc.guide.shape[-2:])
            if refiner == "jbu":
                lab = ops.jbu_argmax(maps, sc.guide, **jbu)
            elif refiner in ("bilinear", "pamr"):
                image = normalise(sc.guide.float(), _OPENAI_MEAN, _OPENAI_STD) if refiner == "pamr" else None
                lab = ops.refine_scores(maps, size, image=image, **pamr).argmax(dim=1)
            elif refiner == "lposs+":
                up = ops.refine_scores(maps, size)
                lab = ops.pixel_propagation(up, sc.guide.float(), backend=LPOSS_BACKEND, **LPOSS_PLUS).argmax(dim=1)
            else:
                raise ValueError(f"unknown refiner {refiner!r}")
            k = sc.text.shape[0]
            target = sc.labels_full[0]
            inter, union = boundary_intersection_union(lab[0], target, k)
            self.eval_cache[key] = (miou(lab[0], target, k), scores_from_boundary(inter, union)["mBIoU"])
        return self.eval_cache[key]


Table = dict[tuple[str, str], list[float]]  # column -> mIoU per seed


def average(t: Table) -> float:
    """The mean over the columns of each column's mean over seeds."""
    return mean(mean(v) for v in t.values())


@dataclass
class Decision:
    param: str
    paper: object  # the paper's value, or None where it is silent
    candidates: dict  # value -> mean mIoU (the mean of the columns)
    chosen: object
    source: str  # "paper" or "ours"
    basis: str  # which head / rows the candidates come from


def decide(param: str, candidates: dict, basis: str, paper: object = None) -> Decision:
    """The rule of issue 19: the paper's value unless the best is better by more than MARGIN; else the best."""
    best = max(candidates, key=lambda v: candidates[v])
    if paper is not None and paper in candidates and candidates[best] - candidates[paper] <= MARGIN:
        return Decision(param, paper, candidates, paper, "paper", basis)
    if paper is None and param in COST:
        tied = [v for v in candidates if candidates[best] - candidates[v] <= TIE]
        best = min(tied, key=COST[param])
    return Decision(param, paper, candidates, best, "paper" if best == paper else "ours", basis)


def default_heads() -> tuple[dict, dict, Callable[[str, str], dict]]:
    """The heads of the main table at the code's defaults (``HeadOptions()``): KL, OP and MV(readout,
    transition); NMS off unless the defaults turn it on."""
    d = HeadOptions()
    nms = (d.nms, d.nms_axis) if d.nms > 0 else (0.0, "classes")
    kl = {"mode": "kl", "nms": nms}
    op = {"mode": "op", "nms": nms, "eps": d.eps, "iters": d.iters}

    def mv(readout: str, transition: str) -> dict:
        return {"mode": "mv", "nms": nms, "eps": d.eps, "transition": transition, "readout": readout,
                "sk_iters": d.sk_iters, "steps": d.steps, "tau": d.tau}
    return kl, op, mv


def run(plan: Plan, *, log: Callable[[str], None] = print) -> dict:
    """Every table and decision of the ablation; ``wall_s`` is the run's wall time (scene generation included)."""
    t_start = time.perf_counter()
    cases = {(col, s): Case(make_clip_like_scene(scene_seed(col, s), col[0], col[1], grid=plan.grid[col[0]]))
             for col in COLUMNS for s in range(plan.seeds)}
    log(f"scenes done ({time.perf_counter() - t_start:.0f} s)")

    def table(head: dict, jbu: dict | None) -> Table:
        return {col: [cases[col, s].evaluate(head, jbu) for s in range(plan.seeds)] for col in COLUMNS}

    def sweep(base: dict, param: str, values, jbu: dict | None = None, *, jbu_param: bool = False) -> dict:
        if jbu_param:
            return {v: average(table(base, {**(jbu or {}), param: v})) for v in values}
        return {v: average(table({**base, param: v}, jbu)) for v in values}

    d = HeadOptions()
    jbu0 = {"sigma_spatial": d.sigma_spatial, "sigma_range": d.sigma_range, "radius": d.radius}
    kl_head, op_head, mv_of = default_heads()
    rows: dict[str, Table] = {}
    labels: dict[str, str] = {}
    # the main table: each row adds one part to the row above, everything else at the code's defaults
    rows["raw"], labels["raw"] = table({"mode": "raw"}, None), "raw logits"
    rows["kl"], labels["kl"] = table(kl_head, None), "+ KL"
    rows["jbu"], labels["jbu"] = table(kl_head, jbu0), "+ JBU"
    rows["op"], labels["op"] = table(op_head, jbu0), "+ OP"
    log(f"raw, kl, jbu, op done ({time.perf_counter() - t_start:.0f} s)")
    mv_heads = {}
    for readout, transition in MV_VARIANTS:
        name = f"mv_{readout}_{transition}"
        mv_heads[name] = mv_of(readout, transition)
        rows[name], labels[name] = table(mv_heads[name], jbu0), f"+ MV (instead of OP), {readout}, {transition}"
        log(f"{name} done ({time.perf_counter() - t_start:.0f} s)")
    paper_mv = {**mv_of(PAPER["readout"], PAPER["transition"]), "tau": PAPER["tau"], "sk_iters": PAPER["sk_iters"]}
    rows["mv_paper"] = table(paper_mv, jbu0)
    labels["mv_paper"] = f"+ MV (instead of OP), the paper's: velocity, attention, tau {PAPER['tau']:g}"

    decisions: list[Decision] = []
    rd = decide("readout", {r: average(rows[f"mv_{r}_{PAPER['transition']}"]) for r in ("integrated", "velocity")},
                f"MV rows, transition {PAPER['transition']}", PAPER["readout"])
    tr = decide("transition", {t: average(rows[f"mv_{rd.chosen}_{t}"]) for t in ("gibbs", "attention")},
                f"MV rows, readout {rd.chosen}", PAPER["transition"])
    mv_default = f"mv_{rd.chosen}_{tr.chosen}"
    md = decide("mode", {"op": average(rows["op"]), "mv": average(rows[mv_default])},
                f"rows + OP and {mv_default}", PAPER["mode"])
    decisions += [md, tr, rd]
    fused = {"mode": "fused", "op": key_of(op_head), "mv": key_of(mv_heads[mv_default])}
    rows["fused"], labels["fused"] = table(fused, jbu0), f"OP and MV fused (MV {rd.chosen}, {tr.chosen})"
    fused_paper = {"mode": "fused", "op": key_of(op_head), "mv": key_of(paper_mv)}
    rows["fused_paper"] = table(fused_paper, jbu0)
    labels["fused_paper"] = "OP and the paper's MV fused"
    log(f"fused done ({time.perf_counter() - t_start:.0f} s)")

    # the NMS side table: KL by axis and ratio (nearest upsampling), then NMS on the chosen head (with JBU)
    kl_sweep = {(axis, r): table({"mode": "kl", "nms": (r, axis)}, None) for axis in NMS_AXES for r in plan.nms_ratios}
    best_ratio = {axis: max((r for r in plan.nms_ratios if r > 0), key=lambda r, a=axis: average(kl_sweep[a, r]))
                  for axis in NMS_AXES}
    head = dict(op_head) if md.chosen == "op" else dict(mv_heads[mv_default])
    head_name = "op" if md.chosen == "op" else mv_default
    nms_options = {(0.0, "off"): (0.0, "classes")} | {(best_ratio[a], a): (best_ratio[a], a) for a in NMS_AXES}
    nms_tables = {k: table({**head, "nms": v}, jbu0) for k, v in nms_options.items()}
    nms_paper = {(best_ratio[a], a): table({**paper_mv, "nms": (best_ratio[a], a)}, jbu0) for a in NMS_AXES}
    nd = decide("nms (ratio, axis)", {k: average(t) for k, t in nms_tables.items()}, f"{head_name} with JBU")
    decisions.append(nd)
    log(f"NMS side table done ({time.perf_counter() - t_start:.0f} s)")

    # the defaults of the chosen head, one parameter at a time (no JBU: nearest upsampling)
    nms_head = nms_options[nd.chosen]
    head["nms"] = nms_head
    op_final = {**op_head, "nms": nms_head}
    mv_final = {**mv_heads[mv_default], "nms": nms_head}
    eps_head = op_final if (md.chosen == "op" or tr.chosen == "attention") else mv_final
    decisions.append(decide("eps", sweep(eps_head, "eps", plan.eps), "op" if eps_head is op_final else mv_default,
                            PAPER["eps"]))
    decisions.append(decide("iters", sweep(op_final, "iters", plan.iters), "op", PAPER["iters"]))
    decisions.append(decide("sk_iters", sweep(mv_final, "sk_iters", plan.sk_iters), mv_default, PAPER["sk_iters"]))
    decisions.append(decide("steps", sweep(mv_final, "steps", plan.steps), mv_default))
    tau_head = {**mv_final, "readout": "velocity"}
    decisions.append(decide("tau", sweep(tau_head, "tau", plan.tau), f"mv_velocity_{tr.chosen}", PAPER["tau"]))
    log(f"head sweeps done ({time.perf_counter() - t_start:.0f} s)")
    for param in ("sigma_spatial", "sigma_range", "radius"):
        decisions.append(decide(param, sweep(head, param, getattr(plan, param), jbu0, jbu_param=True),
                                f"{head_name} with JBU"))
    log(f"JBU sweeps done ({time.perf_counter() - t_start:.0f} s)")

    # the heads side table: the default head (mode mv, HeadOptions()'s values) by each refiner, then OP and LPOSS
    mv_code = mv_of(d.readout, d.transition)
    pamr = d.pamr_params()

    def refined(head: dict, refiner: str) -> dict:
        return {col: [cases[col, s].refined(head, refiner, jbu0, pamr) for s in range(plan.seeds)] for col in COLUMNS}
    refiners = {r: refined(mv_code, r) for r in REFINERS}
    log(f"refiners of the default head done ({time.perf_counter() - t_start:.0f} s)")
    side_heads = {"op": op_head, "lposs": {"mode": "lposs", "y0": "cosine"},
                  "lposs_nq": {"mode": "lposs", "y0": "nq", "nms": kl_head["nms"]}}
    heads = {(h, r): refined(side_heads[h], r) for h, r in OTHER_HEADS}
    log(f"heads side table done ({time.perf_counter() - t_start:.0f} s)")
    return {"rows": rows, "refiners": refiners, "heads": heads, "pamr": pamr,
            "refiner_head": f"mv_{d.readout}_{d.transition}",
            "labels": labels, "kl_sweep": kl_sweep, "best_ratio": best_ratio,
            "nms_tables": nms_tables, "nms_paper": nms_paper, "head_name": head_name,
            "decisions": decisions, "mv_default": mv_default, "seeds": plan.seeds,
            "grid": {k: plan.grid[k] or DATASETS[k].grid for k in DATASETS},
            "wall_s": time.perf_counter() - t_start}


def fmt_value(v: object) -> str:
    if isinstance(v, tuple):
        return "off" if v[1] == "off" else f"{v[0]:g} on {v[1]}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def cell(values: list[float]) -> str:
    spread = pstdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.3f} ± {spread:.3f}"


ORDERINGS = (("+ KL above raw", "kl", "raw"), ("+ NMS above + KL", "nms", "kl"), ("+ JBU above + NMS", "jbu", "nms"),
             ("+ OP above + JBU", "op", "jbu"), ("MV above OP", "mv", "op"))


def orderings(res: dict) -> list[list[str]]:
    """The paper's orderings, for our default head and for the paper's MV (velocity, attention, tau 0.3): the
    mean of the four columns of each side and the columns where the ordering holds. "+ NMS" is KL with the
    better NMS of the side table (nearest upsampling); fused below both OP and MV."""
    rows, best = res["rows"], res["best_ratio"]
    nms_axis = max(NMS_AXES, key=lambda a: average(res["kl_sweep"][a, best[a]]))
    base = {"raw": rows["raw"], "kl": rows["kl"], "nms": res["kl_sweep"][nms_axis, best[nms_axis]],
            "jbu": rows["jbu"], "op": rows["op"]}
    out = []
    for who, mv, fused in (("default", res["mv_default"], "fused"), ("paper's MV", "mv_paper", "fused_paper")):
        t = {**base, "mv": rows[mv], "fused": rows[fused]}
        for text, hi, lo in ORDERINGS:
            cols = [column_name(c) for c in COLUMNS if mean(t[hi][c]) > mean(t[lo][c])]
            ok = average(t[hi]) > average(t[lo])
            out.append([who, text, f"{average(t[hi]):.3f} vs {average(t[lo]):.3f}", "holds" if ok else "**fails**",
                        ", ".join(cols) or "none"])
        cols = [column_name(c) for c in COLUMNS
                if mean(t["fused"][c]) < min(mean(t["op"][c]), mean(t["mv"][c]))]
        ok = average(t["fused"]) < min(average(t["op"]), average(t["mv"]))
        out.append([who, "fused below both OP and MV", f"{average(t['fused']):.3f} vs "
                    f"{min(average(t['op']), average(t['mv'])):.3f}", "holds" if ok else "**fails**",
                    ", ".join(cols) or "none"])
    return out


DEFAULTS_BEGIN = "<!-- defaults table: written by python -m bench.bench_ablation; do not edit by hand -->"
DEFAULTS_END = "<!-- end of defaults table -->"
DEFAULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "defaults.md"
#: the README's "Method defaults" holds the same block between the same markers
DEFAULTS_README = Path(__file__).resolve().parents[1] / "README.md"


def defaults_table(res: dict, commit: str) -> str:
    """The README's defaults table, from the decisions (every number copied from this run)."""
    code = HeadOptions()
    code_value = {"mode": "mv", "nms (ratio, axis)": (code.nms, code.nms_axis if code.nms > 0 else "off")}
    rows = []
    for d in res["decisions"]:
        now_ = code_value.get(d.param, getattr(code, d.param, None))
        nums = ", ".join(f"{fmt_value(v)}{' (paper)' if v == d.paper else ''} {s:.3f}" for v, s in d.candidates.items())
        rows.append([d.param, f"`{fmt_value(d.chosen)}`", d.source, f"{nums} ({d.basis})",
                     "" if now_ == d.chosen or (isinstance(now_, tuple) and now_[1] == "off" and d.chosen[1] == "off")
                     else f"code has `{fmt_value(now_)}`"])
    head = (f"Decided by `python -m bench.bench_ablation --seeds {res['seeds']}` at {commit} ({res['seeds']} seeds per "
            "column, CLIP-like scenes; mean mIoU over the four columns). Rule: the paper's value unless the best "
            f"candidate beats it by more than {MARGIN}; where the paper is silent, the best (for radius and steps, "
            f"the cheapest of those within {TIE} of the best). The last column flags a decided default the code does "
            "not have yet.")
    return "\n".join([DEFAULTS_BEGIN, "", head, "",
                      markdown_table(["parameter", "default", "from", "the ablation's numbers", "code"], rows),
                      "", DEFAULTS_END])


def write_defaults(res: dict, commit: str, path: Path = DEFAULTS_DOC) -> Path:
    """Rewrite the block between the markers of docs/defaults.md (the page stays otherwise as written) and, when
    writing the repository's page, the same block of the README's "Method defaults"."""
    block = defaults_table(res, commit)
    if path == DEFAULTS_DOC and DEFAULTS_README.exists():
        readme = DEFAULTS_README.read_text()
        if DEFAULTS_BEGIN in readme and DEFAULTS_END in readme:
            pre, rest = readme.split(DEFAULTS_BEGIN, 1)
            DEFAULTS_README.write_text(pre + block + rest.split(DEFAULTS_END, 1)[1])
    text = path.read_text() if path.exists() else ""
    if DEFAULTS_BEGIN in text and DEFAULTS_END in text:
        pre, rest = text.split(DEFAULTS_BEGIN, 1)
        text = pre + block + rest.split(DEFAULTS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def write_results(res: dict, out_dir: Path, *, smoke: bool) -> list[str]:
    cols = [column_name(c) for c in COLUMNS]
    table_rows = []
    paper_key = {"raw": "raw", "kl": "kl", "jbu": "jbu", "op": "op", "mv_paper": "mv", "fused_paper": "fused"}
    for name, t in res["rows"].items():
        paper = PAPER_ROWS.get(paper_key.get(name, ""))
        table_rows.append([res["labels"][name]] + [cell(t[c]) for c in COLUMNS] + [f"{average(t):.3f}"]
                          + (list(paper) if paper else ["", "", ""]))
    header = ["pipeline"] + cols + ["mean", "paper VOC21", "paper Stuff", "paper avg of 4"]
    ratios = sorted({r for _, r in res["kl_sweep"]})
    ratio_rows = [[axis] + [f"{average(res['kl_sweep'][axis, r]):.3f}" for r in ratios] for axis in NMS_AXES]
    nms_rows = [[f"{res['head_name']} (our default head)", fmt_value(k)] + [cell(t[c]) for c in COLUMNS]
                + [f"{average(t):.3f}"] for k, t in res["nms_tables"].items()]
    nms_rows += [["MV, the paper's", fmt_value(k)] + [cell(t[c]) for c in COLUMNS] + [f"{average(t):.3f}"]
                 for k, t in res["nms_paper"].items()]
    side = [(("mv", r), t) for r, t in res["refiners"].items()] + list(res["heads"].items())
    ref_rows = [[HEAD_LABEL[h], REFINER_LABEL[r]] + [f"{cell([v[0] for v in t[c]])} / {cell([v[1] for v in t[c]])}"
                                                     for c in COLUMNS]
                + [f"{mean(mean(v[0] for v in t[c]) for c in COLUMNS):.3f} / "
                   f"{mean(mean(v[1] for v in t[c]) for c in COLUMNS):.3f}"] for (h, r), t in side]
    dec_rows = [[d.param, "silent" if d.paper is None else fmt_value(d.paper),
                 ", ".join(f"{fmt_value(v)}: {s:.3f}" for v, s in d.candidates.items()), d.basis,
                 f"**{fmt_value(d.chosen)}**", d.source] for d in res["decisions"]]
    load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    grid = res["grid"]
    d = HeadOptions()
    nms_now = "off" if d.nms == 0 else fmt_value((d.nms, d.nms_axis))
    backend_flag = "" if BACKEND == "reference" else f" --backend {BACKEND}"
    guide_px = {k: (grid[k][0] * DATASETS[k].patch_px, grid[k][1] * DATASETS[k].patch_px) for k in DATASETS}
    pamr = res["pamr"]
    body = [
        f"{now()}; {device_name('cpu')}; {versions()}; ovss_fast {commit}; load average at the end {load} "
        f"(the machine's 2 cores shared with other jobs). `python -m bench.bench_ablation{' --smoke' if smoke else ''} "
        f"--seeds {res['seeds']}{backend_flag}`: wall time {res['wall_s']:.0f} s (every scene, row and sweep "
        "below)." + (f" Fewer seeds than the {FULL.seeds} of a full run: `python -m bench.bench_ablation --backend "
                     f"cpu` runs those." if res["seeds"] < FULL.seeds and not smoke else ""),
        "",
        f"Scenes: `ovss_fast.synthetic.make_clip_like_scene` (CLIP-like failures: an image-level term towards the "
        f"salient classes, a per-class text bias, spatially correlated noise, irregular shapes, a textured guide; "
        f"strengths calibrated on raw and + KL only, section 'Scene calibration'), a fresh image for every (column, "
        f"seed), {res['seeds']} seeds per column. VOC-like: 21 classes (background in every image), 2-6 present, "
        f"{grid['voc'][0]} x {grid['voc'][1]} patches; Stuff-like: 171 classes, 8-20 present, "
        f"{grid['stuff'][0]} x {grid['stuff'][1]} patches; 8 px per patch; hard = more logit noise, a noisier "
        "affinity and guide. mIoU per image at the guide's resolution, mean ± standard deviation over the seeds; "
        "'mean' is the mean of the four columns. OP and MV heads in float32 by the "
        f"{'reference' if BACKEND == 'reference' else f'`{BACKEND}` backend of `ops.discrepancy`'}; JBU by "
        "`ops.jbu_argmax`.",
        "",
        "Main table: each row adds one part to the row above (the MV rows replace OP), every setting it does not "
        f"ablate at the code's defaults (`HeadOptions()`: NMS {nms_now}, "
        f"eps {d.eps:g}, iters {d.iters}, sk_iters {d.sk_iters}, steps {d.steps}, tau {d.tau:g}, JBU "
        f"sigma_spatial {d.sigma_spatial:g}, sigma_range {d.sigma_range:g}, radius {d.radius}); the paper's MV "
        f"row takes the paper's tau {PAPER['tau']:g}. Rows before '+ JBU' are nearest-upsampled from the patch "
        "grid. NMS is in the side table below. The paper's columns are its mIoU (%) on VOC21 and COCO-Stuff and "
        "the mean of its four "
        "benchmarks; its '+ JBU' row includes its NMS, its MV row sits beside our row of the paper's reading.",
        "",
        markdown_table(header, table_rows),
        "",
        "The paper's orderings, for our default head and for the paper's MV (mean of the four columns; the columns "
        "where the ordering holds). '+ NMS' is KL with the better NMS of the side table:",
        "",
        markdown_table(["head", "ordering", "mean mIoU", "", "columns where it holds"], orderings(res)),
        "",
        "NMS side table. KL with NMS, mean of the four columns, by axis (rows) and ratio (columns), nearest "
        "upsampling:",
        "",
        markdown_table(["axis"] + [f"{r:g}" for r in ratios], ratio_rows),
        "",
        "The MV heads with NMS off and with each axis at its best KL ratio (with JBU):",
        "",
        markdown_table(["head", "nms"] + cols + ["mean"], nms_rows),
        "",
        f"Heads and refiners. First the default head (`{res['refiner_head']}`: mode mv with every `HeadOptions()` "
        f"value, NMS {nms_now}): its patch scores to the guide's pixels by bilinear (`ops.refine_scores`, "
        "align_corners=False), JBU (`ops.jbu_argmax`, the main table's parameters), PAMR (bilinear, then `ops.pamr` "
        f"on the guide normalised with OpenAI CLIP's mean / std, as the Segmenter's refine pamr; NACLIP's "
        f"{pamr['iters']} iterations, dilations {tuple(pamr['dilations'])}) and LPOSS+ (bilinear, then "
        f"`ops.pixel_propagation` on the guide, LPOSS+'s published radius {LPOSS_PLUS['radius']}, tau "
        f"{LPOSS_PLUS['tau']:g}, alpha {LPOSS_PLUS['alpha']:g}, {LPOSS_PLUS['iters']} CG steps). Then OP with JBU "
        "(the main table's '+ OP') and LPOSS's patch stage (`ops.label_propagation`, backend "
        f"`{LPOSS_BACKEND}`, LPOSS's published k {LPOSS['k']} (clipped to N: N = "
        f"{grid['voc'][0] * grid['voc'][1]} and {grid['stuff'][0] * grid['stuff'][1]} patches here, k / N "
        f"{min(1.0, LPOSS['k'] / (grid['voc'][0] * grid['voc'][1])):.2f} and "
        f"{min(1.0, LPOSS['k'] / (grid['stuff'][0] * grid['stuff'][1])):.2f}; LPOSS's VOC protocol: 6 windows of "
        f"196, about 0.34), gamma {LPOSS['gamma']:g}, alpha {LPOSS['alpha']:g}, {LPOSS['iters']} CG steps, tol "
        f"{LPOSS['tol']:g}): y0 = the raw patch-text cosines as LPOSS takes them, the kNN graph on the scene's "
        "`dino_feats` (the region features its affinity is built from: regions, not classes, the same noise), "
        "positions = the patch centres in guide pixels. LPOSS's sigma 0.01 is per pixel of its images, where a "
        f"patch is {LPOSS_PATCH_PX} px; a patch here is {DATASETS['voc'].patch_px} px, so sigma is "
        f"{LPOSS['sigma'] * LPOSS_PATCH_PX / DATASETS['voc'].patch_px:g} per guide pixel (LPOSS's exp(-0.16) "
        "between neighbouring patches); LPOSS+'s radius and tau stay per guide pixel as published (its 13 x 13 "
        f"window spans {(2 * LPOSS_PLUS['radius'] + 1) / DATASETS['voc'].patch_px:g} patches here, "
        f"{(2 * LPOSS_PLUS['radius'] + 1) / LPOSS_PATCH_PX:g} in LPOSS). 'LPOSS from N·Q' is not LPOSS's "
        "configuration: its propagation started from the default head's input f(0) = N Q (method.md section 3; "
        "each class a distribution over patches, so a per-class offset of the cosines cancels), to compare the "
        "two propagations on one input. Each cell: mIoU / mBIoU, mean ± standard deviation "
        "over the seeds; mBIoU is Boundary IoU (`ovss_fast.eval.boundary_intersection_union`, dilation ratio "
        "0.02) per image over the scene's classes, the mean over the classes with a non-zero boundary union, then "
        "the mean over the seeds (per image, not pooled over the seeds). The guides are "
        f"{guide_px['voc'][0]} x {guide_px['voc'][1]} px (VOC-like) and {guide_px['stuff'][0]} x "
        f"{guide_px['stuff'][1]} px (Stuff-like), {DATASETS['voc'].patch_px} px per patch: PAMR's dilation "
        f"{max(pamr['dilations'])} spans {max(pamr['dilations']) / DATASETS['voc'].patch_px:g} patches and "
        f"{max(pamr['dilations']) / min(min(g) for g in guide_px.values()):.0%} of the shorter guide side, large "
        "next to NACLIP's setting (16 px patches on images a few hundred px a side).",
        "",
        markdown_table(["head", "refiner"] + cols + ["mean (mIoU / mBIoU)"], ref_rows),
        "",
        f"Head defaults by the rule of issue 19: where the paper is explicit, its value unless the best candidate "
        f"beats it by more than {MARGIN} mIoU (mean of the four columns); where it is silent, the best candidate "
        f"(for radius and steps, whose larger values cost more, the cheapest candidate within {TIE} mIoU of the "
        "best: a difference far below the seeds' spread). "
        "Candidates are scored on the head named in 'basis' with every other parameter at its decided default; "
        "the eps, iters, sk_iters, steps and tau sweeps without JBU (nearest upsampling), the NMS and JBU ones "
        "with it. Decided in this order: readout, transition, mode from the main table, then the rest. The "
        f"README's defaults table is written from these rows into `docs/defaults.md`.",
        "",
        markdown_table(["parameter", "paper", "candidates (mean mIoU)", "basis", "default", "from"], dec_rows),
    ]
    plots = plot(res, out_dir / "plots")
    body += ["", "Plot: " + ", ".join(f"[{p}](plots/{p})" if p.endswith(".png") else p for p in plots) + "."]
    write_section(HEADING, "\n".join(body), out_dir / "RESULTS.md")
    if not smoke:
        write_defaults(res, commit)
    return plots


def plot(res: dict, out_dir: Path) -> list[str]:
    """Grouped bars: one group per row, one bar per column (error bar = std over seeds); the paper's VOC21 and
    Stuff mIoU / 100 as markers."""
    try:
        import matplotlib
    except ImportError:
        return ["plot not written: matplotlib not installed: pip install matplotlib"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(res["rows"])
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(COLUMNS)
    colours = ["#4c72b0", "#8fa8d8", "#c44e52", "#e8a0a2"]
    x = np.arange(len(names))
    for j, col in enumerate(COLUMNS):
        m = [mean(res["rows"][n][col]) for n in names]
        sd = [pstdev(res["rows"][n][col]) if len(res["rows"][n][col]) > 1 else 0.0 for n in names]
        ax.bar(x + (j - 1.5) * width, m, width, yerr=sd, capsize=2, color=colours[j], label=column_name(col))
    paper_key = {"raw": "raw", "kl": "kl", "jbu": "jbu", "op": "op", "mv_paper": "mv", "fused_paper": "fused"}
    for k, (lab, marker) in enumerate((("paper VOC21", "^"), ("paper Stuff", "v"))):
        pts = [(i, PAPER_ROWS[paper_key[n]][k] / 100) for i, n in enumerate(names) if n in paper_key]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color="k", zorder=3, s=22, label=lab)
    short = [res["labels"][n].replace("+ MV (instead of OP), ", "MV\n").replace(", ratio", "\nratio")
             .replace(", axis", "\naxis").replace("OP and MV fused ", "fused\n") for n in names]
    ax.set_xticks(x, short, fontsize=7)
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_title(f"Synthetic ablation ({res['seeds']} seeds per column; bars = mean, whiskers = std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "ablation.png", dpi=110)
    plt.close(fig)
    return ["ablation.png"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the paper's ablation on synthetic scenes, and the head defaults")
    p.add_argument("--smoke", action="store_true", help="two seeds of small scenes, short sweeps (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="scenes per column (default 16; smoke 2)")
    p.add_argument("--out", type=Path, default=None, help="folder for RESULTS.md and plots/ (default bench/; "
                                                          "required with --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--backend", default="reference", choices=["reference", "cpu", "auto"],
                   help="backend of the OP and MV heads (default reference, the float32 spec; cpu: the compiled "
                        "kernels)")
    args = p.parse_args(argv)
    if args.smoke and args.out is None:
        print("error: --smoke needs --out (it must not overwrite bench/RESULTS.md)", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    global BACKEND
    BACKEND = args.backend
    plan = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        plan = Plan(**{**plan.__dict__, "seeds": args.seeds})
    res = run(plan)
    out = args.out or BENCH_DIR
    plots = write_results(res, out, smoke=args.smoke)
    print(f"wrote the '{HEADING}' section of {out / 'RESULTS.md'} and {', '.join(plots)} ({res['wall_s']:.0f} s)")
    for d in res["decisions"]:
        print(f"default {d.param}: {fmt_value(d.chosen)} ({d.source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
