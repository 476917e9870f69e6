"""The paper's ablation replayed on synthetic scenes (method.md section 6), and the head defaults it decides.

``python -m bench.bench_ablation [--smoke] [--seeds 8] [--out DIR] [--threads T]``

Scenes: ``ovss_fast.synthetic.make_dataset_scene``, one fresh image per (column, seed): VOC-like (21
classes, 2-6 present, 21 x 28 patches) and Stuff-like (171 classes, 8-20 present, 24 x 24 patches), easy
and hard. mIoU per image at the guide's resolution (the classes in the prediction or the ground truth),
then mean and spread over the seeds.

Rows, each adding one part as in the paper's ablation table (method.md, "What the full paper reports"):
raw logits (argmax of the patch-text cosine); + KL; + NMS on each axis at the ratio of ``NMS_RATIOS`` where
KL scores best (mean over every column); + JBU (KL with the better NMS, joint bilateral upsampling); + OP;
+ MV, each readout (integrated, velocity) and transition (gibbs, attention), in place of OP; OP and MV
fused (the mean of the two score maps after per-image standardisation, the default MV). Rows before
"+ JBU" are nearest-upsampled from the patch grid, the others go through JBU. Everything runs in the
float32 reference (``ovss_fast.kernels.reference``) except JBU, which is ``ops.jbu_argmax`` (the fused CPU kernel
where the extension is built; it matches the reference).

Then the defaults (the rule of issue 19): where the paper is explicit (mode mv, transition attention,
readout velocity, eps 0.1, iters 50, sk_iters 15, tau 0.3), its choice unless the ablation shows it worse
by more than ``MARGIN`` mIoU on average over the four columns; where it is silent (NMS ratio and axis,
steps, the JBU parameters), the ablation's best. The parameter sweeps run on the head the earlier decisions
chose and are scored without JBU (nearest upsampling), except the JBU sweep.

Writes the "Synthetic ablation" section of ``OUT/RESULTS.md`` and ``OUT/plots/ablation.png`` (matplotlib);
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
from ovss_fast.kernels import reference as R  # noqa: E402
from ovss_fast.ops import api as ops  # noqa: E402
from ovss_fast.synthetic import DATASETS, Scene, make_dataset_scene, miou  # noqa: E402

HEADING = "Synthetic ablation"
COLUMNS = (("voc", "easy"), ("voc", "hard"), ("stuff", "easy"), ("stuff", "hard"))
KIND_LABEL = {"voc": "VOC-like", "stuff": "Stuff-like"}
NMS_RATIOS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
NMS_AXES = ("classes", "patches")
#: a paper-explicit default stays unless the ablation shows it worse by more than this (mIoU, mean of the columns)
MARGIN = 0.02
#: the head's parameters as the paper states them (method.md, "What the full paper reports")
PAPER = {"mode": "mv", "transition": "attention", "readout": "velocity", "eps": 0.1, "iters": 50, "sk_iters": 15,
         "tau": 0.3}
#: the head's parameters where the paper is silent, before this ablation (ovss_fast.ops defaults)
OURS = {"steps": 50, "sigma_spatial": 1.0, "sigma_range": 0.1, "radius": 2}
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
MV_VARIANTS = tuple((r, t) for r in ("integrated", "velocity") for t in ("gibbs", "attention"))


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


FULL = Plan(seeds=8, grid={"voc": None, "stuff": None})
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
        if mode == "fused":
            return (standardise(self.scores(dict(head["op"]))) + standardise(self.scores(dict(head["mv"])))) / 2
        q = self.q(head.pop("nms", (0.0, "classes")))
        if mode == "kl":
            return R.kl_scores(q)
        eps = head.pop("eps", PAPER["eps"])
        if mode == "op":
            return R.sinkhorn_scores(q, self.transition("gibbs", eps), eps=eps, **head)
        if mode == "mv":
            return R.markov_scores(q, self.transition(head.pop("transition"), eps), **head)
        raise ValueError(f"unknown mode {mode!r}")

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
    return Decision(param, paper, candidates, best, "paper" if best == paper else "ours", basis)


def run(plan: Plan, *, log: Callable[[str], None] = print) -> dict:
    """Every table and decision of the ablation; ``wall_s`` is the run's wall time (scene generation included)."""
    t_start = time.perf_counter()
    cases = {(col, s): Case(make_dataset_scene(scene_seed(col, s), col[0], difficulty=col[1], grid=plan.grid[col[0]]))
             for col in COLUMNS for s in range(plan.seeds)}

    def table(head: dict, jbu: dict | None) -> Table:
        return {col: [cases[col, s].evaluate(head, jbu) for s in range(plan.seeds)] for col in COLUMNS}

    def sweep(base: dict, param: str, values, jbu: dict | None = None, *, jbu_param: bool = False) -> dict:
        if jbu_param:
            return {v: average(table(base, {**(jbu or {}), param: v})) for v in values}
        return {v: average(table({**base, param: v}, jbu)) for v in values}

    rows: dict[str, Table] = {}
    labels: dict[str, str] = {}
    rows["raw"], labels["raw"] = table({"mode": "raw"}, None), "raw logits"
    log(f"raw done ({time.perf_counter() - t_start:.0f} s)")
    kl_sweep = {(axis, r): table({"mode": "kl", "nms": (r, axis)}, None) for axis in NMS_AXES for r in plan.nms_ratios}
    rows["kl"], labels["kl"] = kl_sweep[NMS_AXES[0], 0.0], "+ KL"
    best_ratio = {axis: max(plan.nms_ratios, key=lambda r, a=axis: average(kl_sweep[a, r])) for axis in NMS_AXES}
    for axis in NMS_AXES:
        rows[f"nms_{axis}"] = kl_sweep[axis, best_ratio[axis]]
        labels[f"nms_{axis}"] = f"+ NMS, axis {axis}, ratio {best_ratio[axis]:g}"
    axis_rows = max(NMS_AXES, key=lambda a: average(rows[f"nms_{a}"]))
    nms_rows = (best_ratio[axis_rows], axis_rows)
    log(f"KL and its NMS sweep done ({time.perf_counter() - t_start:.0f} s): NMS {nms_rows}")

    jbu0: dict = {}
    rows["jbu"], labels["jbu"] = table({"mode": "kl", "nms": nms_rows}, jbu0), "+ JBU"
    op_head = {"mode": "op", "nms": nms_rows}
    rows["op"], labels["op"] = table(op_head, jbu0), "+ OP"
    log(f"op done ({time.perf_counter() - t_start:.0f} s)")
    mv_heads = {}
    for readout, transition in MV_VARIANTS:
        name = f"mv_{readout}_{transition}"
        mv_heads[name] = {"mode": "mv", "nms": nms_rows, "readout": readout, "transition": transition}
        rows[name], labels[name] = table(mv_heads[name], jbu0), f"+ MV (instead of OP), {readout}, {transition}"
        log(f"{name} done ({time.perf_counter() - t_start:.0f} s)")

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
    log(f"fused done ({time.perf_counter() - t_start:.0f} s)")

    # the defaults of the chosen head, one parameter at a time (no JBU: nearest upsampling)
    head = dict(op_head) if md.chosen == "op" else dict(mv_heads[mv_default])
    head_name = "op" if md.chosen == "op" else mv_default
    nms_options = {(0.0, "off"): (0.0, "classes")} | {(best_ratio[a], a): (best_ratio[a], a) for a in NMS_AXES
                                                      if best_ratio[a] > 0}
    nms_scores = {k: average(table({**head, "nms": v}, None)) for k, v in nms_options.items()}
    nd = decide("nms (ratio, axis)", nms_scores, f"{head_name}, each axis at its best KL ratio")
    decisions.append(nd)
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
    return {"rows": rows, "labels": labels, "kl_sweep": kl_sweep, "best_ratio": best_ratio, "nms_rows": nms_rows,
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


def ordering_sentence(res: dict) -> str:
    """Where the mean over our columns orders the rows as the paper's table does, and where not."""
    avg = {k: average(v) for k, v in res["rows"].items()}
    nms_best = max(avg[f"nms_{a}"] for a in NMS_AXES)
    mv_paper, mv_ours = avg["mv_velocity_attention"], avg[res["mv_default"]]
    checks = [
        ("+ KL above raw", avg["kl"] > avg["raw"]),
        ("+ NMS above + KL", nms_best > avg["kl"]),
        ("+ JBU above + NMS", avg["jbu"] > nms_best),
        ("+ OP above + JBU", avg["op"] > avg["jbu"]),
        ("MV (the paper's velocity readout on attention) above OP", mv_paper > avg["op"]),
        (f"MV (our default, {res['mv_default'][3:].replace('_', ', ')}) above OP", mv_ours > avg["op"]),
        ("fused below both OP and MV", avg["fused"] < min(avg["op"], mv_ours)),
    ]
    if res["mv_default"] == "mv_velocity_attention":
        checks.pop(5)
    agree = [c for c, ok in checks if ok]
    differ = [c for c, ok in checks if not ok]
    return (f"Against the paper's ordering (the mean of our four columns): it agrees on {'; '.join(agree) or 'nothing'}"
            f"; it does not on {'; '.join(differ) or 'anything'}.")


def write_results(res: dict, out_dir: Path, *, smoke: bool) -> list[str]:
    cols = [column_name(c) for c in COLUMNS]
    table_rows = []
    paper_key = {"raw": "raw", "kl": "kl", "nms_classes": "nms", "nms_patches": "nms", "jbu": "jbu", "op": "op",
                 "mv_velocity_attention": "mv", "fused": "fused"}
    for name, t in res["rows"].items():
        paper = PAPER_ROWS.get(paper_key.get(name, ""))
        table_rows.append([res["labels"][name]] + [cell(t[c]) for c in COLUMNS] + [f"{average(t):.3f}"]
                          + (list(paper) if paper else ["", "", ""]))
    header = ["pipeline"] + cols + ["mean", "paper VOC21", "paper Stuff", "paper avg of 4"]
    ratio_rows = [[axis] + [f"{average(res['kl_sweep'][axis, r]):.3f}" for r in sorted({r for _, r in res['kl_sweep']})]
                  for axis in NMS_AXES]
    ratios = sorted({r for _, r in res["kl_sweep"]})
    dec_rows = [[d.param, "silent" if d.paper is None else fmt_value(d.paper),
                 ", ".join(f"{fmt_value(v)}: {s:.3f}" for v, s in d.candidates.items()), d.basis,
                 f"**{fmt_value(d.chosen)}**", d.source] for d in res["decisions"]]
    load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    grid = res["grid"]
    body = [
        f"{now()}; {device_name('cpu')}; {versions()}; ovss_fast {commit}; load average at the end {load}. "
        f"`python -m bench.bench_ablation{' --smoke' if smoke else ''} --seeds {res['seeds']}`: "
        f"wall time {res['wall_s']:.0f} s (every scene, row and sweep below).",
        "",
        f"Scenes: `ovss_fast.synthetic.make_dataset_scene`, a fresh image for every (column, seed), {res['seeds']} "
        f"seeds per column. VOC-like: 21 classes (background in every image), 2-6 present, "
        f"{grid['voc'][0]} x {grid['voc'][1]} patches; Stuff-like: 171 classes, 8-20 present, "
        f"{grid['stuff'][0]} x {grid['stuff'][1]} patches; 8 px per patch; hard = more class noise, a noisier "
        "affinity and guide. mIoU per image at the guide's resolution, mean ± standard deviation over the seeds; "
        "'mean' is the mean of the four columns. Float32 reference heads; JBU by `ops.jbu_argmax`. Rows before "
        "'+ JBU' are nearest-upsampled from the patch grid. Each row adds one part, as in the paper's ablation "
        "(method.md); the MV rows replace OP; the later rows use the NMS of the better '+ NMS' row "
        f"({fmt_value(res['nms_rows'])}). The paper's columns are its mIoU (%) on VOC21 and COCO-Stuff and the "
        "mean of its four benchmarks (VOC21, Stuff, City, ADE), CLIP ViT-B/16; its MV row is set beside our MV "
        "row of the same reading (velocity, attention).",
        "",
        markdown_table(header, table_rows),
        "",
        ordering_sentence(res),
        "",
        "KL with NMS, mean of the four columns, by axis (rows) and ratio (columns):",
        "",
        markdown_table(["axis"] + [f"{r:g}" for r in ratios], ratio_rows),
        "",
        f"Head defaults by the rule of issue 19: where the paper is explicit, its value unless the best candidate "
        f"beats it by more than {MARGIN} mIoU (mean of the four columns); where it is silent, the best candidate. "
        "Candidates are scored on the head named in 'basis' with every other parameter at its decided default; "
        "the nms, eps, iters, sk_iters, steps and tau sweeps without JBU (nearest upsampling), the JBU sweeps "
        "with it. Decided in this order: readout, transition, mode from the rows above, then the rest.",
        "",
        markdown_table(["parameter", "paper", "candidates (mean mIoU)", "basis", "default", "from"], dec_rows),
    ]
    plots = plot(res, out_dir / "plots")
    body += ["", "Plot: " + ", ".join(f"[{p}](plots/{p})" if p.endswith(".png") else p for p in plots) + "."]
    write_section(HEADING, "\n".join(body), out_dir / "RESULTS.md")
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
    paper_key = {"raw": "raw", "kl": "kl", "nms_classes": "nms", "nms_patches": "nms", "jbu": "jbu", "op": "op",
                 "mv_velocity_attention": "mv", "fused": "fused"}
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
    p.add_argument("--seeds", type=int, default=None, help="scenes per column (default 8; smoke 2)")
    p.add_argument("--out", type=Path, default=None, help="folder for RESULTS.md and plots/ (default bench/; "
                                                          "required with --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = p.parse_args(argv)
    if args.smoke and args.out is None:
        print("error: --smoke needs --out (it must not overwrite bench/RESULTS.md)", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
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
