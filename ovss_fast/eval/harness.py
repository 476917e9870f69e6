"""The evaluation protocol: resize, predict, compare with the annotation, accumulate, all-reduce.

Per image (a benchmark of :mod:`ovss_fast.eval.datasets`), with the DSLO protocol
(``--protocol dslo``, the default; :mod:`ovss_fast.eval.protocols` has the peers'):

    image [3, H, W], annotation [H, W]
      -> resized (bilinear, antialiased) so the short side is the dataset's short side and
         the long side at most 2048 (aspect kept; mmseg's Resize(scale=(2048, short),
         keep_ratio=True)), then rounded to whole patches
      -> Segmenter scores on the whole image's patch grid (method.md section 7; windows of the
         dataset's window size only for an image over the memory budget, listed in the results
         file; ``--protocol dslo-windows``: always the dataset's window / stride)
      -> joint bilateral upsampling guided by the ORIGINAL image straight to the annotation's
         [H, W], argmax (the method's own upsampler stands in for the usual bilinear resize
         of scores; nothing is predicted at an intermediate size)
      -> confusion matrix against the annotation (255 ignored), summed over images and ranks.

The peers' protocols resize without antialias and without snapping, upsample each
window's logits bilinearly to pixels and average them, resize bilinearly to the
annotation, take the logits argmax and apply their background threshold (the
Segmenter's ``aggregation="pixels"``, ``head="logits"``, ``bg_threshold``).

``--synthetic`` runs seeded scenes of :mod:`ovss_fast.synthetic` (CLIP-like features,
affinity, guide and ground truth) through :func:`ovss_fast.segment_features` instead:
the same loop, sharding, metrics and report with no dataset and no weights.
"""

from __future__ import annotations

import datetime
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast import __version__
from ovss_fast.errors import InputError
from ovss_fast.eval.checkpoint import Guarded, RunState
from ovss_fast.eval.datasets import IGNORE_INDEX, LONG_SIDE_CAP
from ovss_fast.eval.distributed import DistContext
from ovss_fast.eval.metrics import (
    boundary_intersection_union,
    confusion_matrix,
    scores_from_boundary,
    scores_from_confusion,
)
from ovss_fast.ops import validate as check
from ovss_fast.ops.api import jbu_argmax, refine_lposs_plus, refine_scores, segment_features
from ovss_fast.ops.options import HeadOptions
from ovss_fast.synthetic import make_scene


def protocol_size(height: int, width: int, short_side: int, long_side: int = LONG_SIDE_CAP) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``short_side`` with the long side capped, aspect kept.

    The scale is min(short_side / short, long_side / long), sizes rounded half up (as mmseg).
    """
    if short_side <= 0 or long_side <= 0:
        raise InputError(f"short_side and long_side must be positive, got {short_side} and {long_side}")
    scale = min(short_side / min(height, width), long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class SegmenterPredictor:
    """item {"image": uint8 [3, H, W]} -> labels int64 [H, W] on the segmenter's device, by the protocol above.

    antialias: whether the protocol resize antialiases (DSLO's does, the peers' cv2 resize does not);
    snap: whether the resized size is rounded to whole patches (DSLO's) or kept (the peers').
    """

    def __init__(self, segmenter: Any, class_names: Sequence[str], short_side: int,
                 long_side: int = LONG_SIDE_CAP, *, antialias: bool = True, snap: bool = True) -> None:
        self.segmenter = segmenter
        self.class_names = list(class_names)
        self.short_side = int(short_side)
        self.long_side = int(long_side)
        self.antialias = bool(antialias)
        self.snap = bool(snap)
        #: the images that were too large for the memory budget as one window and fell back to windows
        self.fell_back: list[dict] = []

    def __call__(self, item: dict) -> Tensor:
        seg = self.segmenter
        img = item["image"].to(seg.device, non_blocking=True).float().div_(255.0)  # [3, H, W]
        H, W = img.shape[1:]
        size = protocol_size(H, W, self.short_side, self.long_side)
        if self.snap:
            ph, pw = seg.patch
            size = (max(1, round(size[0] / ph)) * ph, max(1, round(size[1] / pw)) * pw)
        x = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False,
                          antialias=self.antialias).clamp_(0, 1)
        pred = seg.predict(x[0], self.class_names, guide=img)  # at the annotation's size, guided by the original
        if pred.fallbacks:
            self.fell_back.append({"name": item.get("name"), "size": [H, W], "resized": list(size)})
        return pred.labels


class SyntheticScenes(torch.utils.data.Dataset):
    """Seeded synthetic scenes as a dataset: ``ds[i]`` -> {"scene": Scene, "label": [H, W], "name": str}."""

    def __init__(self, num_scenes: int = 16, *, seed: int = 0, difficulty: str = "easy", num_classes: int = 6,
                 grid: tuple[int, int] = (24, 24), image_size: tuple[int, int] = (96, 96)) -> None:
        if num_scenes < 1:
            raise InputError(f"num_scenes must be >= 1, got {num_scenes}")
        self.num_scenes, self.seed, self.difficulty = int(num_scenes), int(seed), difficulty
        self.num_classes, self.grid, self.image_size = int(num_classes), tuple(grid), tuple(image_size)
        self.class_names = [f"class{c}" for c in range(self.num_classes)]
        make_scene(self.seed, grid=(2, 2), image_size=(2, 2), difficulty=difficulty)  # validates difficulty early

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> dict:
        scene = make_scene(self.seed + index, grid=self.grid, image_size=self.image_size,
                           num_classes=self.num_classes, num_regions=max(self.num_classes + 3, 9),
                           difficulty=self.difficulty)
        return {"scene": scene, "label": scene.labels_full[0], "name": f"scene{self.seed + index}"}


def synthetic_predictor(mode: str = "mv", backend: str = "auto", device: torch.device | str = "cpu", *,
                        head: str = "dslo", **params: Any) -> Callable[[dict], Tensor]:
    """item {"scene": Scene} -> labels [H, W]: the scene's features, text and affinity through segment_features
    (head "dslo"), or the argmax of the joint-bilaterally upsampled class probabilities softmax(scale * cos)
    (head "logits"; with refine "bilinear" / "pamr" the argmax of the cosines refined as NACLIP refines them, PAMR
    on the scene's guide; "lposs+" LPOSS+'s pixel stage on the guide). Head "lposs" needs patch features the
    scenes do not carry: an InputError. params: the head's options (:class:`~ovss_fast.ops.options.HeadOptions`)."""
    check.choice("head", head, check.HEADS)
    if head == "lposs":
        raise InputError("head 'lposs' needs patch features for its kNN graph (LPOSS's DINO features), which the "
                         "synthetic scenes do not carry (they give an affinity); use head dslo or logits here, or "
                         "--refine lposs+ (the pixel stage on the scene's guide)")
    options = HeadOptions.of("synthetic_predictor", params)

    def predict(item: dict) -> Tensor:
        s = item["scene"]
        feats, text, aff, guide = (t.to(device) for t in (s.feats, s.text, s.affinity, s.guide))
        if head == "logits":
            cos = F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()  # [1, N, C]
            if options.refine != "jbu":  # softmax keeps the order of a pixel's classes: the argmax of the cosines
                cos = cos.transpose(1, 2).reshape(1, -1, *s.grid)
                if options.refine == "lposs+":  # LPOSS+ alone: the pixel stage on the raw cosines
                    return refine_lposs_plus(cos, guide, backend=backend,
                                             **options.pixel_propagation_params()).argmax(dim=1)[0]
                image = guide if options.refine == "pamr" else None
                return refine_scores(cos, tuple(guide.shape[-2:]), image=image, backend=backend,
                                     **options.pamr_params()).argmax(dim=1)[0]
            probs = torch.softmax(options.scale * cos, dim=-1)
            probs = probs.transpose(1, 2).reshape(1, -1, *s.grid)
            return jbu_argmax(probs, guide, backend=backend, **options.for_op("jbu"))[0]
        return segment_features(feats, text, aff, grid=s.grid, guide=guide, mode=mode, backend=backend,
                                **options.as_dict())[0]

    return predict


# --------------------------------------------------------------------------- the loop
class _Progress:
    """A progress bar on stderr with the running mIoU of this rank (tqdm when installed)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.total, self.enabled, self.desc, self.done = total, enabled, desc, 0
        self.start = time.monotonic()
        self.bar = None
        self.last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="image", file=sys.stderr)
            except ImportError:
                pass

    def update(self, miou: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        shown = "-" if math.isnan(miou) else f"{100 * miou:.1f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"mIoU {shown}", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last < 0.5 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        filled = int(30 * self.done / max(self.total, 1))
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"{rate:.2f} image/s mIoU {shown}   ")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class EvalOutcome:
    confusion: Tensor  # [K, K] int64 on the CPU, summed over ranks
    images: int  # evaluated over all ranks
    seconds: float  # the slowest rank's wall time of the loop (this run's, without resumed work)
    skipped: list = field(default_factory=list)  # [{"index", "error"}] of unreadable items (--skip-bad)
    resumed: int = 0  # images taken from checkpoints (counted in ``images``)
    wait_seconds: float = 0.0  # the slowest rank's time blocked waiting for the next item (reading, decoding)
    predict_seconds: float = 0.0  # the slowest rank's time in predict (synchronised on CUDA)
    #: Boundary IoU's per-class [intersection, union] sums [2, K] float64 (None: not computed; NaN: incomplete)
    boundary: Tensor | None = None
    boundary_seconds: float = 0.0  # the slowest rank's time computing Boundary IoU
    dilation_ratio: float = 0.02  # Boundary IoU's


class _Clock:
    """Seconds spent waiting on the items and in predict, for the report's loader-wait share."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.predict = 0.0

    def items(self, items: Iterator[dict]) -> Iterator[dict]:
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t0
            yield item

    def predictor(self, predict: Callable[[dict], Tensor], device: torch.device) -> Callable[[dict], Tensor]:
        """predict under torch.inference_mode, timed; on CUDA synchronised so the time is the GPU's too."""
        def timed(item: dict) -> Tensor:
            t0 = time.perf_counter()
            with torch.inference_mode():
                labels = predict(item)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.predict += time.perf_counter() - t0
            return labels

        return timed


def _items(dataset: torch.utils.data.Dataset, indices: list[int], workers: int, pin: bool) -> Iterator[dict]:
    dataset = Guarded(dataset)  # unreadable items arrive as {"error": ...}, also from worker processes
    if workers <= 0:
        for i in indices:
            yield dataset[i]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                         num_workers=workers, pin_memory=pin)
    yield from loader


def run_loop(dataset: torch.utils.data.Dataset, predict: Callable[[dict], Tensor], num_classes: int, *,
             ctx: DistContext | None = None, limit: int | None = None, workers: int = 0,
             progress: bool = False, desc: str = "eval", state: RunState | None = None,
             boundary_iou: bool = True, dilation_ratio: float = 0.02) -> EvalOutcome:
    """Predict this rank's share of the first ``limit`` items, accumulate the confusion matrix, reduce over ranks.

    ``boundary_iou``: also accumulate Boundary IoU's per-class sums
    (:func:`~ovss_fast.eval.metrics.boundary_intersection_union`, ``dilation_ratio``) beside it.

    Item i goes to rank i % world_size; the confusion matrices (int64) are summed, so the
    outcome does not depend on the number of ranks.

    state (:class:`~ovss_fast.eval.checkpoint.RunState`): checkpoints, resume and bad items;
    default: none kept, and an unreadable item raises :class:`~ovss_fast.eval.checkpoint.BadItem`
    naming it. SIGINT / SIGTERM stop the loop at an image boundary with
    :class:`~ovss_fast.eval.checkpoint.Interrupted` once the checkpoint is written.
    """
    ctx = ctx or DistContext()
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    sizes = ctx.all_reduce(torch.tensor([n, -n], dtype=torch.int64), op="max")
    if int(sizes[0]) != -int(sizes[1]):
        raise RuntimeError(f"ranks see different numbers of images ({-int(sizes[1])} to {int(sizes[0])}); "
                           "every node must hold the same dataset")
    state = state or RunState(num_classes, rank=ctx.rank, world_size=ctx.world_size)
    indices = state.todo(ctx.shard(n))
    device = ctx.device
    cm = state.confusion.to(device)
    bnd = state.boundary  # [2, K] float64 on the CPU, checkpointed with the confusion matrix
    bnd_seconds = 0.0
    bar = _Progress(len(indices), progress and ctx.is_main, desc)
    clock = _Clock()
    predict = clock.predictor(predict, device)
    start = time.perf_counter()
    try:
        with state.guard(cm):
            for index, item in zip(indices, clock.items(_items(dataset, indices, workers, pin=device.type == "cuda")),
                                   strict=True):
                if "error" in item:
                    state.item_bad(index, item["error"], cm)
                    continue
                labels = predict(item)
                target = item["label"].to(device, non_blocking=True)
                cm += confusion_matrix(labels, target, num_classes, ignore_index=IGNORE_INDEX)
                if boundary_iou:
                    t_b = time.perf_counter()
                    inter, union = boundary_intersection_union(labels, target, num_classes, dilation_ratio,
                                                               ignore_index=IGNORE_INDEX)
                    bnd[0] += inter
                    bnd[1] += union
                    bnd_seconds += time.perf_counter() - t_b
                bar.update(scores_from_confusion(cm)["mIoU"] if bar.enabled else math.nan)
                state.item_done(index, cm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    cm = ctx.all_reduce(cm)
    images = int(ctx.all_reduce(torch.tensor([len(state.done)], dtype=torch.int64))[0])
    resumed = int(ctx.all_reduce(torch.tensor([state.resumed], dtype=torch.int64))[0])
    times = ctx.all_reduce(torch.tensor([seconds, clock.wait, clock.predict, bnd_seconds], dtype=torch.float64),
                           op="max")
    seconds, wait, pred, bnd_seconds = (float(t) for t in times)
    boundary = ctx.all_reduce(bnd.to(device)).cpu() if boundary_iou else None
    bad = sorted(ctx.gather_objects(state.bad), key=lambda b: b["index"])
    return EvalOutcome(confusion=cm.cpu(), images=images, seconds=seconds, skipped=bad, resumed=resumed,
                       wait_seconds=wait, predict_seconds=pred, boundary=boundary, boundary_seconds=bnd_seconds,
                       dilation_ratio=dilation_ratio)


# --------------------------------------------------------------------------- the report
def _num(x: float, digits: int = 2) -> float | None:
    return None if math.isnan(x) else round(100.0 * x, digits)


def segmenter_config(seg: Any) -> dict:
    """The Segmenter settings that decide its predictions (for the results file)."""
    def px(cells: tuple[int, int] | None) -> list[int] | None:
        return None if cells is None else [cells[0] * seg.patch[0], cells[1] * seg.patch[1]]

    return {
        "model": seg.model_name, "affinity": seg.affinity_name, "mode": seg.mode, "features": seg.features,
        "head": seg.head, "bg_threshold": seg.bg_threshold, "aggregation": seg.aggregation, "crop": seg.crop,
        "pos_interp": seg.pos_interp, "antialias": seg.antialias,
        "window_px": px(seg.window), "stride_px": px(seg.stride), "fallback_window_px": px(seg.fallback_window),
        "patch": list(seg.patch), "dtype": str(seg.dtype).replace("torch.", ""),
        "device": str(seg.device), "backend": seg.backend, "templates": len(seg.templates),
        "memory_budget_gib": seg.memory_budget / 2**30, **seg.options.as_dict(),
        # the preset: which values are the paper's, which ours, which were given over it
        "preset": seg.preset.record() if hasattr(seg, "preset") else None,
    }


def make_report(outcome: EvalOutcome, class_names: Sequence[str], config: dict, ctx: DistContext | None = None) -> dict:
    """The results file: metrics in percent (None where undefined), per-class rows, config, confusion matrix."""
    ctx = ctx or DistContext()
    s = scores_from_confusion(outcome.confusion)
    gt = outcome.confusion.sum(dim=1)
    per_class = [{"class": name, "IoU": _num(float(iou)), "Acc": _num(float(acc)), "gt_pixels": int(n)}
                 for name, iou, acc, n in zip(class_names, s["IoU"], s["Acc"], gt, strict=True)]
    boundary: dict = {}
    if outcome.boundary is not None:
        b = scores_from_boundary(outcome.boundary[0], outcome.boundary[1])
        for row, v in zip(per_class, b["BIoU"], strict=True):
            row["BIoU"] = _num(float(v))
        boundary = {"mBIoU": _num(b["mBIoU"]),
                    "boundary_iou": {"dilation_ratio": outcome.dilation_ratio,
                                     "seconds": round(outcome.boundary_seconds, 3),
                                     "intersection": outcome.boundary[0].tolist(),
                                     "union": outcome.boundary[1].tolist()}}
    device = ctx.device
    return {
        "mIoU": _num(s["mIoU"]), **({"mBIoU": boundary["mBIoU"]} if boundary else {}),
        "mAcc": _num(s["mAcc"]), "aAcc": _num(s["aAcc"]),
        "images": outcome.images, "seconds": round(outcome.seconds, 3),
        "images_per_second": (round((outcome.images - outcome.resumed) / outcome.seconds, 4)
                              if outcome.seconds > 0 else None),
        "resumed_images": outcome.resumed,
        "skipped": {"count": len(outcome.skipped), "items": outcome.skipped},
        "loader_wait_seconds": round(outcome.wait_seconds, 3), "predict_seconds": round(outcome.predict_seconds, 3),
        "loader_wait_share": round(outcome.wait_seconds / outcome.seconds, 4) if outcome.seconds > 0 else None,
        "per_class": per_class,
        "config": config,
        "environment": {
            "ovss_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": ctx.world_size, "process_group_backend": ctx.backend,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "confusion_matrix": outcome.confusion.tolist(),
        **({"boundary_iou": boundary["boundary_iou"]} if boundary else {}),
    }


def format_report(report: dict) -> str:
    """Per-class IoU in three columns, then the headline numbers."""
    rows = [f"{r['class'].split(';')[0][:22]:<22} {'-' if r['IoU'] is None else format(r['IoU'], '6.2f'):>6}"
            for r in report["per_class"]]
    lines = ["   ".join(rows[i:i + 3]) for i in range(0, len(rows), 3)]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    ips = report["images_per_second"]
    biou = f"  mBIoU {fmt(report['mBIoU'])}" if "mBIoU" in report else ""
    lines.append(f"mIoU {fmt(report['mIoU'])}{biou}  mAcc {fmt(report['mAcc'])}  aAcc {fmt(report['aAcc'])}  "
                 f"({report['images']} images, {report['seconds']:.1f} s, {fmt(ips)} images/s, "
                 f"{report['environment']['world_size']} process(es))")
    share = report.get("loader_wait_share")
    if share is not None:
        lines.append(f"{100 * share:.0f}% of the loop waiting on the data loader (raise --workers if this is large)")
    fell = report.get("window_fallback", {}).get("count", 0)
    if fell:
        lines.append(f"{fell} image(s) over the memory budget as one window fell back to windows (listed in the "
                     "results file)")
    skipped = report.get("skipped", {}).get("count", 0)
    if skipped:
        lines.append(f"{skipped} unreadable item(s) skipped (--skip-bad; listed in the results file)")
    return "\n".join(lines)


__all__ = ["EvalOutcome", "SegmenterPredictor", "SyntheticScenes", "format_report", "make_report",
           "protocol_size", "run_loop", "segmenter_config", "synthetic_predictor"]
