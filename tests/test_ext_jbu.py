"""The CPU JBU kernels' code paths (csrc/cpu/jbu_cpu.h; method.md sections 4 and 5).

Row segments of pixels sharing their taps, one small matrix product per segment over
class-last scores padded to whole vectors (C not a multiple of the vector length, C = 1),
segments longer than the 64-pixel chunk, downsampling and non-integer factors, B > 1,
radius 0..3; the per-pixel path for non-finite scores or guide pixels; near-ties and
colours far apart (sigma_r = 1e-3: no 0/0). All against the float64 reference:
float32 rel. error <= 1e-4 (float64: 1e-10), labels identical except at near-ties.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_ext import TOL, _gen, assert_labels_match

from ovss_fast.kernels import reference as R
from ovss_fast.kernels.extension import CPU_BACKEND

SHAPES = [
    # B, C, h, w, H, W, radius
    (1, 1, 3, 4, 17, 23, 2),  # C = 1
    (2, 7, 5, 6, 40, 37, 1),  # B > 1, C below one vector
    (1, 9, 4, 4, 30, 30, 3),  # C one past a vector (float32)
    (1, 17, 6, 3, 41, 19, 2),  # C one past two vectors, non-square
    (1, 33, 2, 2, 9, 300, 2),  # 150-pixel segments: cut into 64-pixel chunks
    (1, 5, 9, 13, 9, 13, 0),  # same size, radius 0
    (2, 3, 11, 8, 7, 5, 2),  # downsampling (factor < 1, non-integer)
    (1, 6, 7, 5, 10, 12, 1),  # factor 10/7 and 12/5
    (1, 4, 1, 1, 1, 1, 2),  # one pixel
    (1, 2, 1, 3, 4, 2, 3),  # tiny, taps off the grid
]


def _inputs(key, B, C, h, w, H, W, dtype, scale=1.0):
    g = _gen("jbu-fast", key, B, C, h, w, H, W, dtype)
    scores = scale * torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    guide = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    return scores.to(dtype), guide.to(dtype)


def _check(scores, guide, tol, **kw):
    ref = R.jbu_upsample(scores.double(), guide.double(), **kw)
    up = CPU_BACKEND.jbu_upsample(scores, guide, **kw)
    assert up.shape == ref.shape and up.dtype == scores.dtype
    assert rel_err(up, ref) <= tol
    assert_labels_match(CPU_BACKEND.jbu_argmax(scores, guide, **kw), ref, tol)
    return up, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,h,w,H,W,radius", SHAPES)
def test_jbu_cpu_shapes(dtype, B, C, h, w, H, W, radius):
    scores, guide = _inputs("shape", B, C, h, w, H, W, dtype)
    _check(scores, guide, TOL[dtype], sigma_spatial=1.3, sigma_range=0.15, radius=radius)


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_jbu_cpu_radius_and_sigmas(radius):
    scores, guide = _inputs("radius", 2, 11, 7, 9, 33, 45, torch.float32, scale=3.0)
    _check(scores, guide, 1e-4, sigma_spatial=0.7, sigma_range=0.05, radius=radius)


def test_jbu_cpu_noncontiguous_scores_and_guide():
    g = _gen("jbu-fast-nc")
    scores = torch.randn(1, 6, 8, 19, generator=g)[:, :, :, ::2]  # [1, 6, 8, 10] strided
    guide = torch.rand(1, 47, 3, 51, generator=g).permute(0, 2, 1, 3)  # [1, 3, 47, 51]
    assert not scores.is_contiguous() and not guide.is_contiguous()
    _check(scores, guide, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jbu_cpu_colours_far_apart_no_zero_over_zero(dtype):
    """sigma_r = 1e-3: exponents ~1e6; weights relative to the pixel's largest exponent stay finite."""
    scores, _ = _inputs("far", 1, 5, 4, 4, 16, 16, dtype)
    guide = torch.zeros(1, 3, 16, 16, dtype=dtype)
    guide[..., ::2, :] = 1.0  # every pixel far from its low-res average (0.5)
    guide[:, 1, :, ::3] = 0.25
    up, _ = _check(scores, guide, TOL[dtype], sigma_range=1e-3)
    assert bool(torch.isfinite(up).all())
    # and a smooth guide at sigma_r = 1e-3 (weights spread over several taps)
    scores, guide = _inputs("far-smooth", 1, 5, 6, 6, 25, 25, dtype)
    _check(scores, guide, TOL[dtype], sigma_range=1e-3)


def test_jbu_cpu_near_ties_and_exact_ties():
    scores, guide = _inputs("ties", 1, 10, 6, 7, 29, 31, torch.float32)
    scores[:, 4] = scores[:, 2]  # exact tie: the lower class (2) wins wherever they lead
    scores[:, 7] = scores[:, 5] * (1 + 1e-7)  # near tie
    ref = R.jbu_upsample(scores.double(), guide.double())
    labels = CPU_BACKEND.jbu_argmax(scores, guide)
    assert_labels_match(labels, ref, 1e-4)
    assert not bool((labels == 4).any())
    # where the exact tie (2 = 4) leads by a clear margin in float64, class 2 wins
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]).abs() > 1e-4 * top2[:, 0].abs().clamp_min(1)
    lead = ref.argmax(dim=1)
    assert bool((lead == 2).any())
    assert torch.equal(labels[(lead == 2) & clear], lead[(lead == 2) & clear])


def test_jbu_cpu_nonfinite_takes_the_reference_rules():
    """-inf and NaN scores, a NaN guide pixel: the per-pixel path, as the reference."""
    scores, guide = _inputs("nonfinite", 2, 9, 6, 8, 31, 37, torch.float32)
    scores[0, 3, 2, 5] = float("-inf")
    scores[1, 8] = float("-inf")  # dead class in image 1
    scores[1, 2, 4, 1] = float("nan")
    guide[0, 1, 20, 7] = float("nan")
    ref = R.jbu_upsample(scores.double(), guide.double())
    up = CPU_BACKEND.jbu_upsample(scores, guide)
    assert torch.equal(torch.isnan(up), torch.isnan(ref))
    keep = ~torch.isnan(ref)
    assert rel_err(up[keep], ref[keep]) <= 1e-4
    assert torch.equal(CPU_BACKEND.jbu_argmax(scores, guide), ref.argmax(dim=1))


def test_jbu_cpu_argmax_is_scale_free_and_float32_exact_on_a_bench_like_case():
    """A smooth bench-like case: labels equal the float32 reference's, for scores at any scale."""
    g = _gen("jbu-fast-bench")
    scores = torch.nn.functional.avg_pool2d(torch.randn(1, 21, 14, 17, generator=g), 3, stride=1)
    guide = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(150, 200), mode="bilinear")
    ref = R.jbu_argmax(scores, guide)
    for scale in (1e-3, 1.0, 1e3):
        assert torch.equal(CPU_BACKEND.jbu_argmax(scores * scale, guide), ref)
