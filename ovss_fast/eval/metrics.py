"""Confusion matrices and the scores read off them (mIoU, mean and overall pixel accuracy).

Convention (mmseg's and detectron2's): rows are ground truth, columns predictions;
pixels labelled ``ignore_index`` are not counted. For class c,

    IoU_c = cm[c, c] / (sum_j cm[c, j] + sum_i cm[i, c] - cm[c, c])
    Acc_c = cm[c, c] / sum_j cm[c, j]

IoU_c is NaN when its union is empty (c neither in the ground truth nor predicted) and
is left out of the mean; a class absent from the ground truth but predicted has
IoU 0 and counts. Acc_c is NaN when c is absent from the ground truth. aAcc is the
fraction of all counted pixels predicted right.
"""

from __future__ import annotations

import math

import torch
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


__all__ = ["confusion_matrix", "scores_from_confusion"]
