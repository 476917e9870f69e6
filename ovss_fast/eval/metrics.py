"""Confusion matrices and the scores read off them (mIoU, mean and overall pixel accuracy).

Convention (mmseg's and detectron2's): rows are ground truth, columns predictions;
pixels labelled ``ignore_index`` are not counted. For class c,

    IoU_c = cm[c, c] / (sum_j cm[c, j] + sum_i cm[i, c] - cm[c, c])
    Acc_c = cm[c, c] / sum_j cm[c, j]

IoU_c is NaN when its union is empty (c neither in the ground truth nor predicted) and
is left out of the mean; a class absent from the ground truth but predicted has
IoU 0 and counts. Acc_c is NaN when c is absent from the ground truth. aAcc is the
fraction of all counted pixels predicted right.

Boundary IoU (Cheng et al., CVPR 2021; LPOSS's ``metrics/boundary_iou.py``): per class, the
boundary of a binary mask is the mask minus its erosion by a 3 x 3 square iterated
d = max(1, round(dilation_ratio * sqrt(H^2 + W^2))) times after a 1-pixel zero border (so the image
border counts as boundary; beyond that border nothing erodes). Prediction pixels whose annotation is
``ignore_index`` are set to ignore first; per class present in either map, the intersection and the
union of the two boundaries are counted. Over a dataset the counts are summed per class, then
BIoU_c = inter_c / union_c and mBIoU is the mean over classes with a non-zero union (as mIoU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError
from ovss_fast.eval.datasets import IGNORE_INDEX


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """pred, target [...] integer labels of one shape -> [K, K] int64 (rows ground truth, columns prediction).

    Target pixels equal to ``ignore_index`` are skipped; any other value outside 0..K-1,
    in either tensor, is an error.
    """
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise InputTypeError(f"pred and target must hold integer labels, got {pred.dtype} and {target.dtype}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long().to(t.device)
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    k = int(num_classes)
    if t.numel():
        for what, v in (("target", t), ("pred", p)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= k:
                raise InputError(f"{what} holds label {lo if lo < 0 else hi}, outside 0..{k - 1} "
                                 f"(and not the ignore index {ignore_index})")
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


def scores_from_confusion(cm: Tensor) -> dict:
    """[K, K] confusion matrix -> {"IoU": [K] float64, "Acc": [K] float64 (NaN as above),
    "mIoU", "mAcc", "aAcc": floats in [0, 1] (NaN when nothing was counted)}."""
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise InputError(f"confusion matrix must be square [K, K], got shape {tuple(cm.shape)}")
    cm = cm.detach().cpu().double()
    tp = cm.diagonal()
    gt = cm.sum(dim=1)
    pred = cm.sum(dim=0)
    union = gt + pred - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    total = float(cm.sum())
    return {
        "IoU": iou,
        "Acc": acc,
        "mIoU": float(iou.nanmean()) if bool((union > 0).any()) else math.nan,
        "mAcc": float(acc.nanmean()) if bool((gt > 0).any()) else math.nan,
        "aAcc": float(tp.sum()) / total if total else math.nan,
    }


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """The erosion count d of an H x W map: max(1, round(dilation_ratio * diagonal)) (round half to even,
    as numpy's and Python's round)."""
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def _boundary_map(labels: Tensor, d: int) -> Tensor:
    """labels [H, W] -> bool [H, W]: the pixels on the Boundary-IoU boundary of their own label's mask.

    For class c the boundary is mask_c minus its erosion: d 3 x 3 erosions of mask_c padded with a
    1-pixel zero border, the window stopping at the padded map's edge. Those equal one (2d + 1) square
    erosion clipped the same way (a rectangle: every pixel of the clipped square is reached), so a pixel of
    label c survives iff every pixel of its clipped square in the padded map is c, i.e. the square's min
    and max labels agree (the border labelled -1, a label of no class). One min and one max filter
    (separable: rows, then columns; max_pool2d's -inf padding leaves the outside out) give every class's
    boundary at once: O(H W) memory, O(H W d) time, whatever the number of classes."""
    x = F.pad(labels.to(torch.float32), (1, 1, 1, 1), value=-1.0)[None, None]  # exact: labels < 2^24

    def square_max(v: Tensor) -> Tensor:
        v = F.max_pool2d(v, (1, 2 * d + 1), stride=1, padding=(0, d))
        return F.max_pool2d(v, (2 * d + 1, 1), stride=1, padding=(d, 0))

    same = square_max(x) == -square_max(-x)
    return ~same[0, 0, 1:-1, 1:-1]


def boundary_intersection_union(pred: Tensor, target: Tensor, num_classes: int, dilation_ratio: float = 0.02,
                                ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """pred, target [H, W] (or [B, H, W]: image by image) integer labels -> (intersection [K], union [K])
    float64: the pixels of each class's boundary in both maps and in either (Boundary IoU, see the module
    docstring), summed over the images; classes in neither map count 0. Labels outside 0..K-1 other
    than ``ignore_index`` (in the target) are an error, as in :func:`confusion_matrix`."""
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    if pred.dim() not in (2, 3):
        raise InputError(f"pred and target must be [H, W] or [B, H, W] label maps, got shape {tuple(pred.shape)}")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise InputTypeError(f"pred and target must hold integer labels, got {pred.dtype} and {target.dtype}")
    if not (isinstance(dilation_ratio, (int, float)) and dilation_ratio >= 0 and math.isfinite(dilation_ratio)):
        raise InputError(f"dilation_ratio must be a finite number >= 0, got {dilation_ratio!r}")
    k = int(num_classes)
    inter = torch.zeros(k, dtype=torch.float64)
    union = torch.zeros(k, dtype=torch.float64)
    if pred.dim() == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    for p, t in zip(pred, target, strict=True):
        t = t.long()
        valid = t != ignore_index
        p = torch.where(valid, p.long().to(t.device), ignore_index)
        tv, pv = t[valid], p[valid]
        if not tv.numel():
            continue
        for what, v in (("target", tv), ("pred", pv)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= k:
                raise InputError(f"{what} holds label {lo if lo < 0 else hi}, outside 0..{k - 1} "
                                 f"(and not the ignore index {ignore_index})")
        d = boundary_dilation(t.shape[0], t.shape[1], dilation_ratio)
        gt_b = _boundary_map(t, d) & valid  # pixels of every class's boundary (not the ignore label's)
        pr_b = _boundary_map(p, d) & valid
        both = gt_b & pr_b & (t == p)  # on the boundary of one class in both maps
        inter_i = torch.bincount(t[both], minlength=k).cpu().double()
        inter += inter_i
        union += (torch.bincount(t[gt_b], minlength=k) + torch.bincount(p[pr_b], minlength=k)).cpu().double() - inter_i
    return inter, union


def scores_from_boundary(intersection: Tensor, union: Tensor) -> dict:
    """Per-class boundary sums (over a dataset) -> {"BIoU": [K] float64 (NaN where the union is 0),
    "mBIoU": the mean over classes with a non-zero union (NaN when none)}."""
    inter, uni = intersection.detach().cpu().double(), union.detach().cpu().double()
    biou = torch.where(uni > 0, inter / uni.clamp_min(1), torch.full_like(uni, math.nan))
    return {"BIoU": biou, "mBIoU": float(biou.nanmean()) if bool((uni > 0).any()) else math.nan}


__all__ = ["boundary_dilation", "boundary_intersection_union", "confusion_matrix", "scores_from_boundary",
           "scores_from_confusion"]
