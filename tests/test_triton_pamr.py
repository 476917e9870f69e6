"""The Triton PAMR (ovss_fast.kernels.triton.pamr) against the float64 reference (reference.pamr).

Interpreter tests (``triton_interpret``) run in one TRITON_INTERPRET=1 child pytest
(tests/triton_child.py) on small awkward shapes: B = 2, C = 1, K = 1, H or W smaller than the
largest dilation, NACLIP's extended dilations (1, 2, 4, 8, 12, 24) with 50 iterations, a
non-contiguous half-precision image. Plain tests: the backend's reasons and an ahead-of-time
compile of both kernels for sm_90 (no GPU needed).

Tolerance: the refined map is a convex combination of the (resized) scores, so float32 rounds on
the scale of the scores: max |triton - reference| <= 1e-5 max |scores|. ``rel_err`` (max |a - e| /
max |e|) is also held to method.md section 5's 1e-4: after 50 smoothing steps max |e| is several
times smaller than the scores, and the PyTorch reference itself, run in float32, reaches 2.2e-5
there (20 seeds).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_for_sm90, rel_err
from triton_child import HAS_TRITON, InterpreterChild

import ovss_fast
from ovss_fast.kernels import reference as R

interpreted = InterpreterChild(__file__).interpreted
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = 1e-5


def _inputs(B, C, K, h, w, H, W, *, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, h, w, generator=g).to(dtype), torch.randn(B, K, H, W, generator=g).to(dtype)


def _check(out, scores, image, iters, dilations):
    ref = R.pamr(scores.double(), image.double(), iters=iters, dilations=dilations)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    scale = F.interpolate(scores.double(), size=image.shape[-2:], mode="bilinear", align_corners=True).abs().max()
    err = float((out.double() - ref).abs().max() / scale)
    assert err <= TOL, err
    assert rel_err(out, ref) <= 1e-4


@interpreted
@pytest.mark.parametrize("B, C, K, h, w, H, W, iters, dilations", [
    (2, 3, 3, 5, 6, 10, 12, 3, (1, 2)),  # B = 2, scores resized to the image
    (1, 1, 1, 4, 4, 7, 5, 4, (8, 16)),  # C = K = 1, H and W smaller than both dilations
    (2, 5, 3, 6, 3, 6, 3, 2, (2, 2, 5)),  # no resize, a repeated dilation, W < 5
])
def test_pamr(B, C, K, h, w, H, W, iters, dilations):
    from ovss_fast.kernels.triton import pamr as T

    scores, image = _inputs(B, C, K, h, w, H, W, seed=B * 100 + C * 10 + K + iters)
    _check(T.pamr(scores, image, iters=iters, dilations=dilations), scores, image, iters, dilations)


@interpreted
@pytest.mark.slow
def test_pamr_naclip_extended_setting():
    """NACLIP's ``--pamr`` extended setting: 50 iterations, dilations (1, 2, 4, 8, 12, 24), on a 9 x 9 image."""
    from ovss_fast.kernels.triton import pamr as T

    dilations = (1, 2, 4, 8, 12, 24)
    scores, image = _inputs(2, 2, 3, 5, 5, 9, 9, seed=7)
    _check(T.pamr(scores, image, iters=50, dilations=dilations), scores, image, 50, dilations)


@interpreted
def test_pamr_affinity():
    from ovss_fast.kernels.triton import pamr as T

    _, image = _inputs(2, 1, 3, 1, 1, 6, 11, seed=3)
    for dilations in ((1,), (4, 9)):
        a = T.pamr_affinity(image, dilations)
        ref = R.pamr_affinity(image.double(), dilations)
        assert a.shape == (2, 8 * len(dilations), 6, 11)
        assert float((a.double() - ref).abs().max()) <= TOL


@interpreted
def test_pamr_half_noncontiguous_and_zero_iterations():
    """A float16 image in transposed storage and float16 scores; iters = 0 is the resize alone; inputs untouched."""
    from ovss_fast.kernels.triton import pamr as T

    scores, image = _inputs(2, 2, 3, 3, 4, 8, 6, seed=5, dtype=torch.float16)
    image = image.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not image.is_contiguous()
    _check(T.pamr(scores, image, iters=3, dilations=(1, 3)), scores, image, 3, (1, 3))
    same = torch.randn(1, 2, 5, 5)
    kept = same.clone()
    out0 = T.pamr(same, torch.randn(1, 3, 5, 5), iters=0)
    assert torch.equal(out0, kept) and out0.data_ptr() != same.data_ptr()
    T.pamr(same, torch.randn(1, 3, 5, 5), iters=2, dilations=(1,))
    assert torch.equal(same, kept)


@interpreted
def test_public_op_on_triton():
    scores, image = _inputs(1, 2, 3, 4, 4, 9, 8, seed=11)
    out = ovss_fast.pamr(scores, image, iters=2, dilations=(1, 2), backend="triton")
    _check(out, scores, image, 2, (1, 2))


@needs_triton
def test_backend_reasons():
    from ovss_fast.kernels.triton import MAX_PAMR_CHANNELS, TRITON_BACKEND

    scores = torch.zeros(1, 2, 4, 4)
    wide = torch.zeros(1, MAX_PAMR_CHANNELS + 1, 4, 4)
    reasons = TRITON_BACKEND.unsupported_reasons("pamr", (scores, wide), {"iters": 1, "dilations": (1,)})
    assert any(f"at most {MAX_PAMR_CHANNELS} image channels" in r for r in reasons)
    reasons = TRITON_BACKEND.unsupported_reasons("pamr", (scores.double(), wide[:, :3].double()), {})
    assert any("float64" in r for r in reasons)


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for the GPU")
def test_kernels_compile_for_h100():
    """Both kernels lower to sm_90 code (ptxas included) for every autotune config; no GPU needed."""
    from ovss_fast.kernels.triton import pamr as T

    cases = [(T._pamr_affinity_kernel, {**cfg.kwargs, "BLOCK_K": 4}, cfg.num_warps) for cfg in T._AFF_CONFIGS]
    cases += [(T._pamr_step_kernel, dict(cfg.kwargs), cfg.num_warps) for cfg in T._STEP_CONFIGS]
    for kernel, constexprs, warps in cases:
        compiled = compile_for_sm90(kernel, constexprs, warps, {"dil_ptr": "*i32", "x_ptr": "*fp16"})
        assert compiled.metadata.shared <= 227 * 1024, kernel.__name__
