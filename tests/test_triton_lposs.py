"""The Triton LPOSS / LPOSS+ (ovss_fast.kernels.triton.propagation) against the float64 reference
(reference.label_propagation, reference.pixel_propagation; tests/test_lposs.py checks the reference against
scipy's CG on LPOSS's own graph construction).

Interpreter tests (``triton_interpret``) run in one TRITON_INTERPRET=1 child pytest (tests/triton_child.py) on
small awkward shapes: B = 2, C = 1, radius 1, a square wider than the image, C above one class block, N < k,
tied similarities, a class of zeros, a loose tol (classes stop at different steps), iters = 0. Plain tests: the
backend's reasons and an ahead-of-time compile of the four kernels for sm_90 (no GPU needed).

Tolerance: float32 within 1e-4 of the float64 result (rel_err: max abs error over max abs value).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import compile_for_sm90, rel_err
from triton_child import HAS_TRITON, InterpreterChild

import ovss_fast
from ovss_fast.kernels import reference as R

interpreted = InterpreterChild(__file__).interpreted
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = 1e-4


def _pixel_inputs(B, C, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    image[:, :, : H // 2] = image[:, :, : H // 2] * 0.1 + 0.6  # a flat region beside a noisy one
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64), image


def _patch_inputs(N, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, D, generator=g, dtype=torch.float64)
    feats = centres[torch.randint(0, 4, (N,), generator=g)] + 0.6 * torch.randn(N, D, generator=g,
                                                                                 dtype=torch.float64)
    positions = torch.rand(N, 2, generator=g, dtype=torch.float64) * 120
    return torch.randn(N, C, generator=g, dtype=torch.float64), feats, positions


@interpreted
@pytest.mark.parametrize("B, C, H, W, radius", [
    (1, 3, 9, 11, 2),  # H, W odd
    (2, 1, 5, 7, 1),  # B = 2, C = 1, radius 1
    (1, 2, 4, 6, 3),  # the square wider than the image
    (1, 20, 3, 5, 1),  # C above one class block
    (1, 2, 40, 31, 1),  # two pixel blocks of the interpreter (1024 pixels), the boundary inside a row
])
def test_pixel_propagation(B, C, H, W, radius):
    from ovss_fast.kernels.triton import propagation as T

    scores, image = _pixel_inputs(B, C, H, W, seed=B * 100 + C * 10 + radius)
    out = T.pixel_propagation(scores.float(), image.float(), radius=radius)
    want = R.pixel_propagation(scores, image, radius=radius)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert rel_err(out, want) <= TOL
    assert rel_err(scores, want) > 1e-2  # propagation moved the scores


@interpreted
def test_pixel_graph_is_the_reference_stencil():
    """The forward half, slot f = dy (2r+1) + dx - 1, equals the reference's stencil at offset (dy, dx)."""
    from ovss_fast.kernels.triton import propagation as T

    _, image = _pixel_inputs(2, 1, 5, 6, seed=4)
    r = 2
    s = T.pixel_graph(image.float(), radius=r, tau=0.05)
    ref = R.pixel_graph(image, radius=r, tau=0.05)  # [B, P, H, W] over reference.pixel_offsets
    offsets = R.pixel_offsets(r)
    for f in range(s.shape[1]):
        dy, dx = divmod(f + 1 + r, 2 * r + 1)
        o = offsets.index((dy, dx - r))
        assert rel_err(s[:, f].reshape(2, 5, 6), ref[:, o]) <= 1e-5


@interpreted
def test_pixel_propagation_per_class_stop_and_zero_class():
    from ovss_fast.kernels.triton import propagation as T

    scores, image = _pixel_inputs(1, 3, 6, 5, seed=9)
    scores[:, 1] = 0
    scores[:, 2] *= 1e3
    for tol, iters in ((1e-2, 15), (0.0, 0)):
        out = T.pixel_propagation(scores.float(), image.float(), radius=2, tau=0.1, tol=tol, iters=iters)
        want = R.pixel_propagation(scores, image, radius=2, tau=0.1, tol=tol, iters=iters)
        assert rel_err(out, want) <= TOL and bool((out[:, 1] == 0).all())


@interpreted
@pytest.mark.parametrize("N, C, k", [
    (23, 3, 6),  # k < N
    (9, 1, 40),  # N < k, C = 1
    (14, 40, 5),  # C above one class block
])
def test_label_propagation(N, C, k):
    from ovss_fast.kernels.triton import propagation as T

    scores, feats, pos = _patch_inputs(N, C, 8, seed=N + C + k)
    out = T.label_propagation(scores[None].float(), feats[None].float(), pos[None].float(), k=k)
    want = R.label_propagation(scores[None], feats[None], pos[None], k=k)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert rel_err(out, want) <= TOL
    assert rel_err(scores[None], want) > 1e-2


@interpreted
def test_label_propagation_ties_and_batch():
    """Repeated features tie at the k-th place (the lower index wins); B = 2 images, each its own graph."""
    from ovss_fast.kernels.triton import propagation as T

    g = torch.Generator().manual_seed(3)
    # unit vectors whose entries and cosines are exact in binary: float32 sees the same ties as float64
    base = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5]],
                        dtype=torch.float64)
    feats = torch.stack([base[torch.tensor([0, 1, 0, 2, 0, 3, 0, 1, 1, 0])],
                         base[torch.tensor([2, 2, 3, 0, 1, 2, 3, 3, 0, 0])]])
    pos = torch.rand(2, 10, 2, generator=g, dtype=torch.float64) * 64
    scores = torch.randn(2, 10, 2, generator=g, dtype=torch.float64)
    for k in (2, 4):
        out = T.label_propagation(scores.float(), feats.float(), pos.float(), k=k)
        assert rel_err(out, R.label_propagation(scores, feats, pos, k=k)) <= TOL


@interpreted
def test_public_ops_on_triton():
    scores, image = _pixel_inputs(1, 2, 5, 5, seed=11)
    out = ovss_fast.pixel_propagation(scores.float(), image.float(), radius=1, backend="triton")
    assert rel_err(out, R.pixel_propagation(scores, image, radius=1)) <= TOL
    s, f, p = _patch_inputs(11, 2, 6, seed=12)
    out = ovss_fast.label_propagation(s.float(), f.float(), p.float(), k=5, backend="triton")  # [N, C] in and out
    assert out.shape == s.shape
    assert rel_err(out, R.label_propagation(s[None], f[None], p[None], k=5)[0]) <= TOL


@needs_triton
def test_backend_reasons():
    from ovss_fast.kernels.triton import TRITON_BACKEND

    scores, image = torch.zeros(1, 2, 4, 4, dtype=torch.float64), torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    assert any("float64" in r for r in TRITON_BACKEND.unsupported_reasons("pixel_propagation", (scores, image), {}))
    s, f, p = torch.zeros(1, 5, 2), torch.zeros(1, 5, 3), torch.zeros(1, 5, 2, dtype=torch.float64)
    assert any("float64" in r for r in TRITON_BACKEND.unsupported_reasons("label_propagation", (s, f, p), {}))
    assert not any("no op" in r for r in TRITON_BACKEND.unsupported_reasons("label_propagation", (s, f, p.float()),
                                                                            {}))
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 8192, 4096)  # no memory: a view
    assert any("int32" in r for r in TRITON_BACKEND.unsupported_reasons("pixel_propagation", (huge[:, :1], huge),
                                                                         {"radius": 6}))


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for the GPU")
def test_kernels_compile_for_h100():
    """The four kernels lower to sm_90 code (ptxas included) for every autotune config; no GPU needed."""
    from ovss_fast.kernels.triton import propagation as T

    ints = {"crow_ptr": "*i64", "col_ptr": "*i64"}
    cases = [(T._stencil_weights_kernel, dict(c.kwargs), c.num_warps) for c in T._PIXEL_CONFIGS]
    cases += [(T._stencil_scale_kernel, dict(c.kwargs), c.num_warps) for c in T._PIXEL_CONFIGS]
    cases += [(T._stencil_matvec_kernel, dict(c.kwargs), c.num_warps) for c in T._MATVEC_CONFIGS]
    cases += [(T._csr_matvec_kernel, dict(c.kwargs), c.num_warps) for c in T._CSR_CONFIGS]
    for kernel, constexprs, warps in cases:
        compiled = compile_for_sm90(kernel, constexprs, warps, ints, {"alpha", "inv_tau"})
        assert compiled.metadata.shared <= 227 * 1024, kernel.__name__
