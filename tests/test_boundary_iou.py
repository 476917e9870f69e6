"""Boundary IoU (ovss_fast.eval.boundary_intersection_union) against LPOSS's metrics/boundary_iou.py.

The always-run oracle is a plain-numpy transcription of LPOSS's code with cv2's two calls written
out: ``cv2.copyMakeBorder(mask, 1, 1, 1, 1, BORDER_CONSTANT, 0)`` is a zero pad, and
``cv2.erode(m, ones((3, 3)), iterations=d)`` is d times a 3 x 3 minimum whose window stops at the
edge (cv2's default border for erosion is the largest value, so nothing outside erodes). When
opencv is importable the same code also runs with cv2 itself.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ovss_fast.eval import boundary_intersection_union, scores_from_boundary
from ovss_fast.eval.metrics import boundary_dilation

HAS_CV2 = importlib.util.find_spec("cv2") is not None


def _erode3(m: np.ndarray) -> np.ndarray:
    """One 3 x 3 erosion, the window clipped at the edge (cv2.erode's default border)."""
    h, w = m.shape
    big = np.full((h + 2, w + 2), 255, dtype=m.dtype)
    big[1:-1, 1:-1] = m
    out = big[1:-1, 1:-1].copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out = np.minimum(out, big[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
    return out


def _mask_to_boundary(mask: np.ndarray, dilation_ratio: float, cv2_impl: bool) -> np.ndarray:
    h, w = mask.shape
    img_diag = np.sqrt(h ** 2 + w ** 2)
    dilation = int(round(dilation_ratio * img_diag))
    if dilation < 1:
        dilation = 1
    if cv2_impl:
        import cv2

        new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        new_mask_erode = cv2.erode(new_mask, np.ones((3, 3), dtype=np.uint8), iterations=dilation)
    else:
        new_mask = np.pad(mask, 1, constant_values=0)
        new_mask_erode = new_mask
        for _ in range(dilation):
            new_mask_erode = _erode3(new_mask_erode)
    return mask - new_mask_erode[1:h + 1, 1:w + 1]


def lposs_boundary_iou(gt: np.ndarray, dt: np.ndarray, num_classes: int, dilation_ratio: float = 0.02,
                       ignore_index: int = 255, cv2_impl: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """LPOSS's boundary_iou (reduce_zero_label False): per-class intersection and union."""
    intersection = np.zeros(num_classes)
    union = np.zeros(num_classes)
    dt = np.copy(dt)
    gt = np.copy(gt)
    dt[gt == ignore_index] = ignore_index
    for cls_idx in (set(np.unique(gt)).union(np.unique(dt))) - {ignore_index}:
        gt_b = _mask_to_boundary((gt == cls_idx).astype(np.uint8), dilation_ratio, cv2_impl)
        dt_b = _mask_to_boundary((dt == cls_idx).astype(np.uint8), dilation_ratio, cv2_impl)
        intersection[cls_idx] += ((gt_b * dt_b) > 0).sum()
        union[cls_idx] += ((gt_b + dt_b) > 0).sum()
    return intersection, union


def _blobs(h: int, w: int, k: int, seed: int, ignore_band: bool) -> np.ndarray:
    """A real-shaped label map: nearest of a few seeds (convex regions), optionally a 255 band at the
    region borders (as VOC's annotations have), some of it ignore."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, size=(6, 2)) * [h, w]
    labels = rng.integers(0, k, size=6)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    order = np.sort(dist, axis=-1)
    out = labels[dist.argmin(-1)].astype(np.int64)
    if ignore_band:
        out[np.sqrt(order[..., 1]) - np.sqrt(order[..., 0]) < 3] = 255
    return out


def _cases():
    rng = np.random.default_rng(0)
    yield "random", rng.integers(0, 5, size=(37, 53)), rng.integers(0, 5, size=(37, 53)), 5
    t = rng.integers(0, 4, size=(20, 31))
    t[rng.random(t.shape) < 0.2] = 255
    yield "random+ignore", t, rng.integers(0, 4, size=(20, 31)), 4
    for i, (h, w) in enumerate([(375, 500), (500, 333), (61, 97)]):
        gt = _blobs(h, w, 21, seed=i, ignore_band=True)
        pred = _blobs(h, w, 21, seed=i + 10, ignore_band=False)
        yield f"blobs{h}x{w}", gt, pred, 21
    yield "tiny", np.array([[1]]), np.array([[0]]), 2
    yield "line", np.array([[0, 1, 1, 0, 2]]), np.array([[0, 1, 2, 2, 2]]), 3


@pytest.mark.parametrize("ratio", [0.02, 0.005, 0.1])
def test_boundary_iou_equals_lposs(ratio):
    for name, gt, pred, k in _cases():
        want_i, want_u = lposs_boundary_iou(gt, pred, k, ratio)
        got_i, got_u = boundary_intersection_union(torch.from_numpy(pred), torch.from_numpy(gt), k, ratio)
        assert got_i.dtype == torch.float64 and got_u.dtype == torch.float64
        assert np.array_equal(got_i.numpy(), want_i), (name, ratio)
        assert np.array_equal(got_u.numpy(), want_u), (name, ratio)


@pytest.mark.skipif(not HAS_CV2, reason="opencv is not installed (the numpy transcription is the oracle)")
def test_boundary_iou_equals_lposs_with_cv2():
    for name, gt, pred, k in _cases():
        want = lposs_boundary_iou(gt.astype(np.int64), pred.astype(np.int64), k, cv2_impl=True)
        got = boundary_intersection_union(torch.from_numpy(pred), torch.from_numpy(gt), k)
        assert np.array_equal(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1]), name


def test_batched_sums_images_and_dataset_mean():
    cases = list(_cases())[2:4]
    gts = [torch.from_numpy(c[1]) for c in cases]
    preds = [torch.from_numpy(c[2]) for c in cases]
    inter = sum(boundary_intersection_union(p, g, 21)[0] for p, g in zip(preds, gts, strict=True))
    union = sum(boundary_intersection_union(p, g, 21)[1] for p, g in zip(preds, gts, strict=True))
    g0 = torch.from_numpy(_blobs(40, 50, 21, 3, True))
    p0 = torch.from_numpy(_blobs(40, 50, 21, 4, False))
    b_i, b_u = boundary_intersection_union(torch.stack([p0, p0]), torch.stack([g0, g0]), 21)
    s_i, s_u = boundary_intersection_union(p0, g0, 21)
    assert torch.equal(b_i, 2 * s_i) and torch.equal(b_u, 2 * s_u)
    s = scores_from_boundary(inter, union)
    keep = union > 0
    assert torch.isnan(s["BIoU"][~keep]).all()
    assert s["mBIoU"] == pytest.approx(float((inter[keep] / union[keep]).mean()), abs=1e-15)
    perfect = scores_from_boundary(*boundary_intersection_union(gts[0].clamp(max=20), gts[0].clamp(max=20), 21))
    assert perfect["mBIoU"] == 1.0
    import math

    assert math.isnan(scores_from_boundary(torch.zeros(3), torch.zeros(3))["mBIoU"])


def test_dilation_and_errors():
    assert boundary_dilation(375, 500) == 12 and boundary_dilation(10, 10) == 1 and boundary_dilation(1, 1, 0.0) == 1
    p = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="must have one shape"):
        boundary_intersection_union(p, p[:3], 2)
    with pytest.raises(TypeError, match="integer labels"):
        boundary_intersection_union(p.float(), p, 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        boundary_intersection_union(p + 2, p, 2)
    with pytest.raises(ValueError, match="dilation_ratio must be"):
        boundary_intersection_union(p, p, 2, dilation_ratio=-1)
    with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
        boundary_intersection_union(p.view(-1), p.view(-1), 2)
    # prediction outside the class range but under an ignored annotation is not counted, as in LPOSS
    t = torch.full((4, 4), 255)
    assert boundary_intersection_union(p + 7, t, 2)[1].sum() == 0


def test_harness_accumulates_boundary_iou_beside_miou(tmp_path):
    """run_loop sums the per-image boundary counts; the report, its summary and the table show mBIoU."""
    from ovss_fast.eval import SyntheticScenes, make_report, run_loop, synthetic_predictor
    from ovss_fast.eval.harness import format_report
    from ovss_fast.eval.table import format_table

    scenes = SyntheticScenes(3, seed=1)
    predict = synthetic_predictor("kl", "reference")
    out = run_loop(scenes, predict, scenes.num_classes)
    inter = torch.zeros(scenes.num_classes, dtype=torch.float64)
    union = torch.zeros_like(inter)
    for i in range(len(scenes)):
        item = scenes[i]
        got_i, got_u = boundary_intersection_union(predict(item), item["label"], scenes.num_classes)
        inter += got_i
        union += got_u
    assert torch.equal(out.boundary, torch.stack([inter, union])) and union.sum() > 0
    report = make_report(out, [f"c{i}" for i in range(scenes.num_classes)], {"dataset": "synthetic"})
    want = 100 * scores_from_boundary(inter, union)["mBIoU"]
    assert report["mBIoU"] == pytest.approx(want, abs=0.006)
    assert all("BIoU" in row for row in report["per_class"])
    assert report["boundary_iou"]["dilation_ratio"] == 0.02 and report["boundary_iou"]["union"] == union.tolist()
    assert f"mBIoU {report['mBIoU']:.2f}" in format_report(report)
    assert f"{report['mIoU']:.1f} / {report['mBIoU']:.1f}" in format_table([report])
    off = run_loop(scenes, predict, scenes.num_classes, boundary_iou=False)
    assert off.boundary is None and "mBIoU" not in make_report(off, [f"c{i}" for i in range(scenes.num_classes)],
                                                                 {"dataset": "synthetic"})
