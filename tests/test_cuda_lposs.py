"""LPOSS / LPOSS+ on a GPU: the "cuda" backend (csrc/cuda/pixel_propagation*, knn_propagation*,
propagation_cg.cuh) and the "triton" backend (kernels/triton/propagation.py) on CUDA tensors, against the scipy
oracles of tests/test_lposs.py (float64 transcriptions of LPOSS's own graph construction and per-class CG):
float64 within 1e-10, float32 within 1e-4 (rel_err), on awkward shapes (H, W not multiples of a block, C = 1,
radius 1, N < k, a class of zeros, classes stopping at different steps), half inputs, the C++ checks and
opcheck of the CUDA ops, and the protocol sizes (slow). Every test needs a GPU (marker ``cuda``); none runs here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_lposs import _windows_inputs, oracle_patch, oracle_pixel

import ovss_fast
from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import get_backend

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
CASES = [(torch.float64, "cuda"), (torch.float32, "cuda"), (torch.float32, "triton")]


def _need(backend, op, *tensors):
    reasons = get_backend(backend).unsupported_reasons(op, tensors, {})
    if reasons:
        pytest.skip("; ".join(reasons))


def _pixel_inputs(B, C, H, W, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    image[:, :, : H // 2] = image[:, :, : H // 2] * 0.1 + 0.6
    scores = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return scores.to(dtype), image.to(dtype)


@pytest.mark.parametrize("dtype,backend", CASES)
@pytest.mark.parametrize("B,C,H,W,radius", [(1, 3, 17, 23, 3), (2, 1, 9, 14, 6), (1, 5, 1, 7, 2), (1, 2, 20, 5, 1),
                                            (1, 11, 131, 7, 2)])
def test_pixel_propagation_matches_scipy(dtype, backend, B, C, H, W, radius):
    scores, image = (t.cuda() for t in _pixel_inputs(B, C, H, W, B * 1000 + H * W + C, dtype))
    _need(backend, "pixel_propagation", scores, image)
    out = ovss_fast.pixel_propagation(scores, image, radius=radius, backend=backend)
    assert out.shape == scores.shape and out.dtype == dtype and out.is_cuda
    want = torch.stack([oracle_pixel(scores[b].cpu(), image[b].cpu(), radius=radius) for b in range(B)])
    assert rel_err(out.cpu(), want) < TOL[dtype]
    assert rel_err(scores.cpu(), want) > 1e-2


@pytest.mark.parametrize("dtype,backend", CASES)
def test_pixel_propagation_per_class_stop(dtype, backend):
    scores, image = (t.cuda() for t in _pixel_inputs(1, 4, 12, 10, 2, dtype))
    scores[:, 1] = 0
    scores[:, 3] *= 1e3
    _need(backend, "pixel_propagation", scores, image)
    for tol, iters in ((1e-2, 40), (1e-4, 3)):
        out = ovss_fast.pixel_propagation(scores, image, radius=2, tol=tol, iters=iters, tau=0.1, backend=backend)
        want = oracle_pixel(scores[0].cpu(), image[0].cpu(), radius=2, tol=tol, iters=iters, tau=0.1)
        assert rel_err(out[0].cpu(), want) < max(TOL[dtype], 1e-9)
        assert bool((out[:, 1] == 0).all())
    assert bool((ovss_fast.pixel_propagation(scores, image, iters=0, backend=backend) == 0).all())  # x0 = 0


@pytest.mark.parametrize("dtype,backend", CASES)
@pytest.mark.parametrize("windows,grid,C,k", [(3, 7, 5, 40), (2, 5, 1, 400), (4, 6, 21, 64)])
def test_label_propagation_matches_scipy(dtype, backend, windows, grid, C, k):
    gen = torch.Generator().manual_seed(windows * 100 + C)
    scores, feats, pos = (t.cuda() for t in _windows_inputs(windows, grid, C, 24, gen, dtype))
    _need(backend, "label_propagation", scores, feats, pos)
    out = ovss_fast.label_propagation(scores, feats, pos, k=k, backend=backend)
    assert out.shape == scores.shape and out.dtype == dtype and out.is_cuda
    want = oracle_patch(scores.cpu(), feats.cpu(), pos.cpu(), k=k)
    assert rel_err(out.cpu(), want) < TOL[dtype]
    assert rel_err(scores.cpu(), want) > 1e-2


@pytest.mark.parametrize("dtype,backend", CASES)
def test_label_propagation_stops_and_ties(dtype, backend):
    gen = torch.Generator().manual_seed(11)
    scores, feats, pos = _windows_inputs(2, 6, 6, 16, gen, dtype)
    scores[:, 2] = 0
    scores[:, 4] *= 1e3
    s, f, p = scores.cuda(), feats.cuda(), pos.cuda()
    _need(backend, "label_propagation", s, f, p)
    for tol, iters in ((1e-2, 50), (1e-4, 7), (0.0, 3)):
        out = ovss_fast.label_propagation(s, f, p, k=40, tol=tol, iters=iters, backend=backend)
        assert rel_err(out.cpu(), oracle_patch(scores, feats, pos, k=40, tol=tol, iters=iters)) < max(TOL[dtype],
                                                                                                       1e-9)
        assert bool((out[:, 2] == 0).all())
    base = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [0, 0, 1, 0]],
                        dtype=dtype)
    feats = base[torch.tensor([0, 1, 0, 2, 0, 3, 0, 4, 1, 0, 1, 0])]
    pos = (torch.rand(12, 2, generator=gen, dtype=torch.float64) * 64).to(dtype)
    scores = torch.randn(12, 2, generator=gen, dtype=torch.float64).to(dtype)
    for k in (2, 3, 4):
        out = ovss_fast.label_propagation(scores.cuda(), feats.cuda(), pos.cuda(), k=k, backend=backend)
        assert rel_err(out.cpu(), oracle_patch(scores, feats, pos, k=k)) < max(TOL[dtype], 1e-10)


def test_cuda_float64_agrees_with_cpu():
    gen = torch.Generator().manual_seed(5)
    scores, feats, pos = _windows_inputs(3, 6, 7, 16, gen)
    _need("cuda", "label_propagation", scores.cuda(), feats.cuda(), pos.cuda())
    a = ovss_fast.label_propagation(scores, feats, pos, k=50, backend="cpu")
    b = ovss_fast.label_propagation(scores.cuda(), feats.cuda(), pos.cuda(), k=50, backend="cuda")
    assert rel_err(b.cpu(), a) < 1e-12
    sc, im = _pixel_inputs(2, 3, 15, 19, 6, torch.float64)
    a = ovss_fast.pixel_propagation(sc, im, radius=4, backend="cpu")
    b = ovss_fast.pixel_propagation(sc.cuda(), im.cuda(), radius=4, backend="cuda")
    assert rel_err(b.cpu(), a) < 1e-12


def test_half_inputs_are_computed_in_float32():
    sc, im = _pixel_inputs(1, 3, 10, 12, 8, torch.float64)
    _need("cuda", "pixel_propagation", sc.cuda(), im.cuda())
    for dtype in (torch.float16, torch.bfloat16):
        s, i = sc.to(dtype), im.to(dtype)
        out = ovss_fast.pixel_propagation(s.cuda(), i.cuda(), radius=2, backend="cuda")
        assert out.dtype == torch.float32
        assert rel_err(out.cpu(), R.pixel_propagation(s.double(), i.double(), radius=2)) < 1e-4


def test_cuda_ops_opcheck_and_checks():
    if get_backend("cuda").unsupported_reasons("pixel_propagation", (torch.zeros(1, device="cuda"),), {}):
        pytest.skip("the build has no CUDA pixel_propagation")
    ops = torch.ops.ovss_fast
    gen = torch.Generator().manual_seed(4)
    scores, image = torch.randn(1, 2, 6, 7, generator=gen).cuda(), torch.rand(1, 3, 6, 7, generator=gen).cuda()
    torch.library.opcheck(ops.pixel_propagation, (scores, image, 2, 0.1, 0.95, 4, 1e-6))
    index = torch.randint(0, 9, (9, 3), generator=gen).cuda()
    w, b = torch.rand(9, 3, generator=gen).cuda(), torch.randn(9, 4, generator=gen).cuda()
    torch.library.opcheck(ops.knn_propagation, (index, w, b, 0.9, 5, 1e-6))
    with pytest.raises(RuntimeError, match=r"index should lie in \[0, 9\)"):
        ops.knn_propagation(index + 9, w, b, 0.9, 5, 1e-6)
    with pytest.raises(RuntimeError, match="index and weights should be"):
        ops.knn_propagation(index, w[:, :2], b, 0.9, 5, 1e-6)
    with pytest.raises(RuntimeError, match="image should be"):
        ops.pixel_propagation(scores, image[:, :, :5], 2, 0.1, 0.95, 4, 1e-6)
    with pytest.raises(RuntimeError, match="all inputs must be on one device"):
        ops.pixel_propagation(scores, image.cpu(), 2, 0.1, 0.95, 4, 1e-6)
    # the compiled op against the CPU one on the same graph (self-links included: they are dropped)
    x_cpu = ops.knn_propagation(index.cpu(), w.cpu().double(), b.cpu().double(), 0.9, 5, 1e-6)
    assert rel_err(ops.knn_propagation(index, w.double(), b.double(), 0.9, 5, 1e-6).cpu(), x_cpu) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_protocol_sizes_float32(backend):
    """LPOSS's sizes: 15 windows x 196 patches, k = 400, C = 171; a 448 x 597 image, radius 6, C = 21."""
    gen = torch.Generator().manual_seed(5)
    scores, feats, pos = _windows_inputs(15, 14, 171, 64, gen)
    _need(backend, "label_propagation", scores.float().cuda(), feats.float().cuda(), pos.float().cuda())
    want = R.label_propagation(scores[None].cuda(), feats[None].cuda(), pos[None].cuda())[0]
    out = ovss_fast.label_propagation(scores.float().cuda(), feats.float().cuda(), pos.float().cuda(),
                                      backend=backend)
    assert rel_err(out, want) < 1e-4
    sc, im = (t.cuda() for t in _pixel_inputs(1, 21, 448, 597, 3, torch.float64))
    want = R.pixel_propagation(sc, im)
    assert rel_err(ovss_fast.pixel_propagation(sc.float(), im.float(), backend=backend), want) < 1e-4
