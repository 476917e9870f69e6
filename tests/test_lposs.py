"""LPOSS / LPOSS+ label propagation: ovss_fast.label_propagation and ovss_fast.pixel_propagation.

The oracle is a float64 transcription of LPOSS's segmentation/evaluation/lposs_eval.py (get_lposs_laplacian,
get_pixel_connections, get_lposs_plus_laplacian, normalize_connection_graph, perform_lp) with scipy's sparse
matrices and scipy's per-class conjugate gradient in place of cupyx (docs/lposs.md lists the facts). Every
backend that runs here is compared with it: float64 within 1e-10, float32 within 1e-4 (rel_err: max abs error
over max abs value).
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
import torch
from conftest import rel_err

import ovss_fast
from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import get_backend

sp = pytest.importorskip("scipy.sparse")
spla = pytest.importorskip("scipy.sparse.linalg")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
BACKENDS = ["reference", "cpu"]


def _need(backend: str, op: str, *tensors: torch.Tensor) -> None:
    reasons = get_backend(backend).unsupported_reasons(op, tensors, {})
    if reasons:
        pytest.skip("; ".join(reasons))


# --------------------------------------------------------------------------- oracles (scipy, float64)
def _normalised(W):
    """normalize_connection_graph: diagonal removed, D^-1/2 W D^-1/2 with degree 0 -> 1."""
    W = W - sp.diags(W.diagonal())
    d = np.asarray(W.sum(axis=1)).ravel()
    d[d == 0] = 1
    Dm = sp.diags(1 / np.sqrt(d))
    return Dm @ W @ Dm


def _solve(S, Y, alpha, iters, tol):
    """perform_lp: one CG per class (column of Y), x0 = 0."""
    L = sp.eye(S.shape[0]) - alpha * S
    out = np.zeros_like(Y)
    for c in range(Y.shape[1]):
        out[:, c] = spla.cg(L, Y[:, c], rtol=tol, maxiter=iters)[0]
    return out


def oracle_patch(scores, feats, positions, k=400, gamma=3.0, sigma=0.01, dist_pow=1.0, alpha=0.95, iters=10,
                 tol=1e-6):
    y, f, pos = (t.double().numpy() for t in (scores, feats, positions))
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    N = f.shape[0]
    k = min(k, N)
    sim = f @ f.T
    ks = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sim, ks, 1)
    dist = np.sqrt(((pos[:, None, :] - pos[None]) ** 2).sum(-1)) ** dist_pow
    w = np.maximum(sims, 0) ** gamma * np.take_along_axis(np.exp(-sigma * dist), ks, 1)
    W = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(N), k), ks.ravel())), shape=(N, N))
    return torch.from_numpy(_solve(_normalised(W + W.T), y, alpha, iters, tol))


def oracle_pixel(scores, image, radius=6, tau=0.01, alpha=0.95, iters=10, tol=1e-6):
    C, H, W = scores.shape
    lab = R.srgb_to_lab(image.double()).permute(1, 2, 0).reshape(H * W, 3).numpy() / np.array([100, 128, 128.0])
    idx = np.arange(H * W)
    locs = np.stack((idx // W, idx % W), 1)
    rows, cols = [], []
    for mov in product(range(-radius, radius + 1), range(-radius, radius + 1)):
        if mov == (0, 0):
            continue
        nl = locs + np.array(mov)
        m = (nl[:, 0] >= 0) & (nl[:, 1] >= 0) & (nl[:, 0] < H) & (nl[:, 1] < W)
        rows.append(np.nonzero(m)[0])
        cols.append(nl[m, 0] * W + nl[m, 1])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    w = np.exp(-np.sqrt(((lab[rows] - lab[cols]) ** 2).sum(-1)) / tau)
    S = _normalised(sp.csr_matrix((w, (rows, cols)), shape=(H * W, H * W)))
    y = scores.double().reshape(C, H * W).numpy().T
    return torch.from_numpy(_solve(S, y, alpha, iters, tol).T.reshape(C, H, W))


def _windows_inputs(windows, grid, C, D, gen, dtype=torch.float64):
    """Patch features / scores / centres of `windows` overlapping windows of grid x grid patches (16 px)."""
    n = grid * grid
    N = windows * n
    # clustered features, so the kNN graph has structure (and many positive cosines)
    centres = torch.randn(6, D, generator=gen, dtype=torch.float64)
    feats = centres[torch.randint(0, 6, (N,), generator=gen)] + 0.7 * torch.randn(N, D, generator=gen,
                                                                                    dtype=torch.float64)
    scores = torch.randn(N, C, generator=gen, dtype=torch.float64) * 0.1
    iy, ix = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.cat([torch.stack([8 + 16 * iy.reshape(-1) + 112 * (w // 3), 8 + 16 * ix.reshape(-1) + 112 * (w % 3)],
                                 1) for w in range(windows)]).double()
    return scores.to(dtype), feats.to(dtype), pos.to(dtype)


# --------------------------------------------------------------------------- patch stage
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("windows,grid,C,k", [(3, 7, 5, 40), (2, 5, 1, 400), (4, 6, 21, 64)])
def test_label_propagation_matches_scipy(backend, dtype, windows, grid, C, k):
    gen = torch.Generator().manual_seed(windows * 100 + C)
    scores, feats, pos = _windows_inputs(windows, grid, C, 24, gen, dtype)
    _need(backend, "label_propagation", scores, feats, pos)
    out = ovss_fast.label_propagation(scores, feats, pos, k=k, backend=backend)
    assert out.shape == scores.shape and out.dtype == dtype
    want = oracle_patch(scores, feats, pos, k=k)
    assert rel_err(out, want) < TOL[dtype]
    # propagation moved the scores (the test would pass on an identity otherwise)
    assert rel_err(scores, want) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_propagation_batched_and_shared_graph(backend):
    gen = torch.Generator().manual_seed(7)
    s1, f1, p1 = _windows_inputs(2, 5, 3, 16, gen)
    s2, f2, _ = _windows_inputs(2, 5, 3, 16, gen)
    _need(backend, "label_propagation", s1, f1, p1)
    out = ovss_fast.label_propagation(torch.stack([s1, s2]), torch.stack([f1, f2]), torch.stack([p1, p1]), k=30,
                                      backend=backend)
    assert rel_err(out[0], oracle_patch(s1, f1, p1, k=30)) < 1e-10
    assert rel_err(out[1], oracle_patch(s2, f2, p1, k=30)) < 1e-10
    shared = ovss_fast.label_propagation(torch.stack([s1, s2]), f1, p1, k=30, backend=backend)  # [N, D] for all
    assert rel_err(shared[1], oracle_patch(s2, f1, p1, k=30)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_propagation_ties_go_to_the_lower_index(backend):
    """Repeated features tie at the k-th place: the lower indices win, as a stable sort."""
    gen = torch.Generator().manual_seed(3)
    # unit vectors whose entries and cosines are exact in binary, so every implementation sees the same ties
    base = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [0, 0, 1, 0]],
                        dtype=torch.float64)
    feats = base[torch.tensor([0, 1, 0, 2, 0, 3, 0, 4, 1, 0, 1, 0])]
    pos = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 64
    scores = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    _need(backend, "label_propagation", scores, feats, pos)
    for k in (2, 3, 4):
        out = ovss_fast.label_propagation(scores, feats, pos, k=k, backend=backend)
        assert rel_err(out, oracle_patch(scores, feats, pos, k=k)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_class_stops_on_its_own(backend):
    """A loose tol and many iterations: classes converge at different steps; zero classes stay zero."""
    gen = torch.Generator().manual_seed(11)
    scores, feats, pos = _windows_inputs(2, 6, 6, 16, gen)
    scores[:, 2] = 0
    scores[:, 4] *= 1e3
    _need(backend, "label_propagation", scores, feats, pos)
    for tol, iters in ((1e-2, 50), (1e-4, 7), (0.0, 3)):
        out = ovss_fast.label_propagation(scores, feats, pos, k=40, tol=tol, iters=iters, backend=backend)
        assert rel_err(out, oracle_patch(scores, feats, pos, k=40, tol=tol, iters=iters)) < 1e-9
        assert bool((out[:, 2] == 0).all())
    # steps actually differ per class at tol 1e-2: a shared stopping rule would give another answer
    x1 = R.label_propagation(scores[None], feats[None], pos[None], k=40, tol=1e-2, iters=50)[0]
    x2 = R.label_propagation(scores[None], feats[None], pos[None], k=40, tol=0.0, iters=50)[0]
    assert rel_err(x1, x2) > 1e-6


@pytest.mark.slow
def test_label_propagation_protocol_size_float32():
    """15 windows x 196 patches, C = 171, k = 400: float32 on the cpu backend within 1e-4 of float64."""
    gen = torch.Generator().manual_seed(5)
    scores, feats, pos = _windows_inputs(15, 14, 171, 64, gen)
    _need("cpu", "label_propagation", scores, feats, pos)
    want = R.label_propagation(scores[None], feats[None], pos[None])[0]
    out = ovss_fast.label_propagation(scores.float(), feats.float(), pos.float(), backend="cpu")
    assert rel_err(out, want) < 1e-4


# --------------------------------------------------------------------------- pixel stage
def test_srgb_to_lab_matches_kornia():
    kornia = pytest.importorskip("kornia")
    img = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    img[0, :, 0, 0] = 0.0
    img[0, :, 0, 1] = 1.0
    img[1, 0, 3, 3] = 0.04045
    assert rel_err(R.srgb_to_lab(img), kornia.color.rgb_to_lab(img)) < 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,C,H,W,radius", [(1, 3, 17, 23, 3), (2, 1, 9, 14, 6), (1, 5, 1, 7, 2), (1, 2, 20, 5, 1)])
def test_pixel_propagation_matches_scipy(backend, dtype, B, C, H, W, radius):
    gen = torch.Generator().manual_seed(B * 1000 + H * W + C)
    image = torch.rand(B, 3, H, W, generator=gen, dtype=torch.float64)
    image[:, :, : H // 2] = image[:, :, : H // 2] * 0.1 + 0.6  # a flat region beside a noisy one
    scores = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    image, scores = image.to(dtype), scores.to(dtype)
    _need(backend, "pixel_propagation", scores, image)
    out = ovss_fast.pixel_propagation(scores, image, radius=radius, backend=backend)
    assert out.shape == scores.shape and out.dtype == dtype
    want = torch.stack([oracle_pixel(scores[b], image[b], radius=radius) for b in range(B)])
    assert rel_err(out, want) < TOL[dtype]
    assert rel_err(scores, want) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_propagation_single_pixel_and_per_class_stop(backend):
    image = torch.rand(1, 3, 1, 1, dtype=torch.float64)
    scores = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    _need(backend, "pixel_propagation", scores, image)
    # no neighbours: degree 0 -> 1, S = 0, x = y0
    assert rel_err(ovss_fast.pixel_propagation(scores, image, backend=backend), scores) < 1e-12
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 12, 10, generator=gen, dtype=torch.float64)
    scores = torch.randn(1, 3, 12, 10, generator=gen, dtype=torch.float64)
    scores[:, 1] = 0
    out = ovss_fast.pixel_propagation(scores, image, radius=2, tol=1e-2, iters=40, tau=0.1, backend=backend)
    assert rel_err(out[0], oracle_pixel(scores[0], image[0], radius=2, tol=1e-2, iters=40, tau=0.1)) < 1e-9
    assert bool((out[:, 1] == 0).all())


# --------------------------------------------------------------------------- validation
def test_validation_messages_name_the_argument():
    s, f, p = torch.randn(10, 3), torch.randn(10, 8), torch.rand(10, 2)
    with pytest.raises(ValueError, match="positions"):
        ovss_fast.label_propagation(s, f, torch.rand(10, 3))
    with pytest.raises(ValueError, match="feats"):
        ovss_fast.label_propagation(s, torch.randn(9, 8), p)
    with pytest.raises(ValueError, match="scores should be a 3D"):
        ovss_fast.label_propagation(torch.randn(10), f, p)
    with pytest.raises(ValueError, match="alpha must lie in"):
        ovss_fast.label_propagation(s, f, p, alpha=1.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ovss_fast.label_propagation(s, f, p, k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        ovss_fast.label_propagation(s, f, p, k=4.5)
    with pytest.raises(ValueError, match="tol"):
        ovss_fast.label_propagation(s, f, p, tol=-1.0)
    with pytest.raises(ValueError, match="feats is 3D"):
        ovss_fast.label_propagation(s, f[None], p)
    with pytest.raises(ValueError, match="scores has C = 0"):
        ovss_fast.label_propagation(torch.randn(10, 0), f, p)
    img, sc = torch.rand(1, 3, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"image must hold sRGB values in \[0, 1\]"):
        ovss_fast.pixel_propagation(sc, img * 255)
    with pytest.raises(ValueError, match="image must be RGB"):
        ovss_fast.pixel_propagation(sc, torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="must agree on B, H and W"):
        ovss_fast.pixel_propagation(torch.randn(1, 2, 4, 4), img)
    with pytest.raises(ValueError, match="radius must be >= 1"):
        ovss_fast.pixel_propagation(sc, img, radius=0)
    with pytest.raises(ValueError, match="tau must be a positive"):
        ovss_fast.pixel_propagation(sc, img, tau=0.0)
    with pytest.raises(ValueError, match="backend"):
        ovss_fast.pixel_propagation(sc, img, backend="gpu")


# --------------------------------------------------------------------------- the compiled ops
def test_compiled_ops_opcheck_and_checks():
    """The schemas, fake kernels and C++ argument checks of knn_propagation and pixel_propagation."""
    if get_backend("cpu").unsupported_reasons("pixel_propagation", (torch.zeros(1),), {}):
        pytest.skip("the compiled extension has no pixel_propagation")
    ops = torch.ops.ovss_fast
    gen = torch.Generator().manual_seed(4)
    scores, image = torch.randn(1, 2, 6, 7, generator=gen), torch.rand(1, 3, 6, 7, generator=gen)
    torch.library.opcheck(ops.pixel_propagation, (scores, image, 2, 0.1, 0.95, 4, 1e-6))
    index = torch.randint(0, 9, (9, 3), generator=gen)
    w, b = torch.rand(9, 3, generator=gen), torch.randn(9, 4, generator=gen)
    torch.library.opcheck(ops.knn_propagation, (index, w, b, 0.9, 5, 1e-6))
    with pytest.raises(RuntimeError, match=r"index should lie in \[0, 9\)"):
        ops.knn_propagation(index + 9, w, b, 0.9, 5, 1e-6)
    with pytest.raises(RuntimeError, match="index and weights should be"):
        ops.knn_propagation(index, w[:, :2], b, 0.9, 5, 1e-6)
    with pytest.raises(RuntimeError, match="image should be"):
        ops.pixel_propagation(scores, image[:, :, :5], 2, 0.1, 0.95, 4, 1e-6)


def test_compiled_ops_do_not_depend_on_the_thread_count():
    if get_backend("cpu").unsupported_reasons("pixel_propagation", (torch.zeros(1),), {}):
        pytest.skip("the compiled extension has no pixel_propagation")
    gen = torch.Generator().manual_seed(8)
    scores, image = torch.randn(1, 5, 19, 13, generator=gen), torch.rand(1, 3, 19, 13, generator=gen)
    index = torch.randint(0, 300, (300, 40), generator=gen)  # 5 blocks of 64 rows
    w, b = torch.rand(300, 40, generator=gen), torch.randn(300, 6, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ovss_fast.pixel_propagation(scores, image, radius=3, backend="cpu"),
               torch.ops.ovss_fast.knn_propagation(index, w, b, 0.95, 10, 1e-6))
        torch.set_num_threads(2)
        two = (ovss_fast.pixel_propagation(scores, image, radius=3, backend="cpu"),
               torch.ops.ovss_fast.knn_propagation(index, w, b, 0.95, 10, 1e-6))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# --------------------------------------------------------------------------- class blocks of the compiled products
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C,H,W,radius", [(70, 9, 11, 6), (171, 4, 6, 1), (33, 3, 2, 6), (64, 14, 3, 2)])
def test_pixel_propagation_class_blocks(dtype, C, H, W, radius):
    """C over the register blocks of the stencil product (blocks of 64 float / 32 double classes, then the rest;
    C not a multiple of 8), images smaller than the stencil, radius 1 and 6: the cpu backend against scipy."""
    gen = torch.Generator().manual_seed(C + H)
    image = torch.rand(1, 3, H, W, generator=gen, dtype=torch.float64)
    scores = torch.randn(1, C, H, W, generator=gen, dtype=torch.float64)
    _need("cpu", "pixel_propagation", scores, image)
    out = ovss_fast.pixel_propagation(scores.to(dtype), image.to(dtype), radius=radius, tau=0.1, backend="cpu")
    want = oracle_pixel(scores[0], image[0], radius=radius, tau=0.1)[None]
    assert rel_err(out, want) < TOL[dtype]
    assert rel_err(scores, want) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [70, 171])
def test_label_propagation_class_blocks(dtype, C):
    gen = torch.Generator().manual_seed(C)
    scores, feats, pos = _windows_inputs(2, 6, C, 16, gen, dtype)
    _need("cpu", "label_propagation", scores, feats, pos)
    out = ovss_fast.label_propagation(scores, feats, pos, k=30, backend="cpu")
    assert rel_err(out, oracle_patch(scores, feats, pos, k=30)) < TOL[dtype]


def test_compiled_products_do_not_depend_on_the_thread_count_over_class_blocks():
    """C = 77: two register blocks per node (64 + 16 classes); 1 and 2 threads give the same bits."""
    if get_backend("cpu").unsupported_reasons("pixel_propagation", (torch.zeros(1),), {}):
        pytest.skip("the compiled extension has no pixel_propagation")
    gen = torch.Generator().manual_seed(12)
    scores, image = torch.randn(1, 77, 23, 17, generator=gen), torch.rand(1, 3, 23, 17, generator=gen)
    index = torch.randint(0, 200, (200, 30), generator=gen)
    w, b = torch.rand(200, 30, generator=gen), torch.randn(200, 77, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((ovss_fast.pixel_propagation(scores, image, radius=6, backend="cpu"),
                         torch.ops.ovss_fast.knn_propagation(index, w, b, 0.95, 10, 1e-6)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
