"""Joint bilateral upsampling (method.md section 4) against a direct loop, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch

from ovss_fast.kernels import reference as ref
from ovss_fast.kernels.common import tap_geometry

F64 = torch.float64


def direct_jbu(scores, guide, sigma_s=1.0, sigma_r=0.1, r=2):
    """A plain per-pixel loop of the formula, in float64 Python arithmetic."""
    B, C, h, w = scores.shape
    H, W = guide.shape[-2:]
    gd = torch.nn.functional.adaptive_avg_pool2d(guide.double(), (h, w))
    out = torch.zeros(B, C, H, W, dtype=F64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                py = (y + 0.5) * h / H - 0.5
                px = (x + 0.5) * w / W - 0.5
                cy, cx = math.floor(py + 0.5), math.floor(px + 0.5)
                taps = []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        qy, qx = cy + dy, cx + dx
                        if 0 <= qy < h and 0 <= qx < w:
                            ds = (qy - py) ** 2 + (qx - px) ** 2
                            dr = float(((guide[b, :, y, x].double() - gd[b, :, qy, qx]) ** 2).sum())
                            taps.append((qy, qx, -ds / (2 * sigma_s**2) - dr / (2 * sigma_r**2)))
                m = max(e for _, _, e in taps)
                den = sum(math.exp(e - m) for _, _, e in taps)
                for c in range(C):
                    num = sum(math.exp(e - m) * float(scores[b, c, qy, qx]) for qy, qx, e in taps)
                    out[b, c, y, x] = num / den
    return out


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 7, 9), (2, 3, 4, 4, 8, 8), (1, 1, 5, 3, 5, 3), (1, 2, 6, 5, 4, 3)])
def test_jbu_matches_direct_loop(shape):
    B, C, h, w, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    scores = torch.randn(B, C, h, w, generator=g, dtype=F64)
    guide = torch.rand(B, 3, H, W, generator=g, dtype=F64)
    got = ref.jbu_upsample(scores, guide, sigma_spatial=1.3, sigma_range=0.2, radius=2)
    torch.testing.assert_close(got, direct_jbu(scores, guide, 1.3, 0.2, 2), atol=1e-12, rtol=1e-10)


def test_jbu_radius_zero_is_nearest_cell():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 3, 3, generator=g, dtype=F64)
    guide = torch.rand(1, 3, 9, 9, generator=g, dtype=F64)
    got = ref.jbu_upsample(scores, guide, radius=0)
    torch.testing.assert_close(got, scores.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))


def test_constant_scores_stay_constant():
    guide = torch.rand(2, 3, 17, 13, generator=torch.Generator().manual_seed(1), dtype=F64)
    scores = torch.full((2, 3, 5, 4), 2.5, dtype=F64)
    torch.testing.assert_close(ref.jbu_upsample(scores, guide), torch.full((2, 3, 17, 13), 2.5, dtype=F64))


def test_extreme_colour_differences_do_not_divide_zero_by_zero():
    scores = torch.randn(1, 2, 4, 4, dtype=F64)
    guide = torch.zeros(1, 3, 8, 8, dtype=F64)
    guide[..., ::2, :] = 1.0  # every pixel far from its low-res average
    out = ref.jbu_upsample(scores, guide, sigma_range=0.001)
    assert torch.isfinite(out).all()
    out32 = ref.jbu_upsample(scores.float(), guide.float(), sigma_range=0.001)
    assert torch.isfinite(out32).all()


def test_argmax_of_upsample_equals_jbu_argmax():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 5, 6, 7, generator=g, dtype=F64)
    guide = torch.rand(2, 3, 23, 19, generator=g, dtype=F64)
    assert torch.equal(ref.jbu_argmax(scores, guide), ref.jbu_upsample(scores, guide).argmax(dim=1))
    assert ref.jbu_argmax(scores, guide).dtype == torch.int64


def test_ties_go_to_the_lowest_class_and_dead_classes_never_win():
    guide = torch.rand(1, 3, 8, 8, dtype=F64)
    scores = torch.zeros(1, 4, 4, 4, dtype=F64)
    scores[:, 0] = float("-inf")  # a dead class
    labels = ref.jbu_argmax(scores, guide)
    assert (labels == 1).all()  # classes 1-3 tie everywhere; class 0 is -inf
    up = ref.jbu_upsample(scores, guide)
    assert torch.isneginf(up[:, 0]).all() and (up[:, 1:] == 0).all()


def test_float32_picks_the_float64_cells_at_exact_halves():
    """h = 8, H = 41: row 20 sits at p' = 3.5 exactly; formed in float32 it rounds to 3.4999998 and
    took cell 3 (the whole 5-tap window one row up). The float32 reference now takes p' in float64."""
    h, H = 8, 41
    y = torch.arange(H, dtype=torch.float32)
    assert int(torch.floor((y[20] + 0.5) * (h / H) - 0.5 + 0.5)) == 3  # the float32 arithmetic's cell
    _, _, cy, cx = tap_geometry(h, h, H, H, 2, torch.device("cpu"), torch.float32)
    assert int(cy[20]) == 4 and int(cx[20]) == 4
    g = torch.Generator().manual_seed(3)
    scores, guide = torch.randn(1, 4, h, h, generator=g), torch.rand(1, 3, H, H, generator=g)
    up32 = ref.jbu_upsample(scores, guide, sigma_spatial=1.0, sigma_range=0.1, radius=1)
    up64 = ref.jbu_upsample(scores.double(), guide.double(), sigma_spatial=1.0, sigma_range=0.1, radius=1)
    assert float((up32.double() - up64).abs().max() / up64.abs().max()) <= 1e-5
    assert torch.equal(ref.jbu_argmax(scores, guide, sigma_spatial=1.0, sigma_range=0.1, radius=1), up64.argmax(dim=1))
