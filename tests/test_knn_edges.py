"""The CPU kNN + edge weights of LPOSS's patch stage (csrc/cpu/knn_edges.cpp, torch.ops.ovss_fast.knn_edges):
the neighbour sets and weights against a stable-sort oracle over several similarity tiles (256 rows), ties at
the k-th place across tiles, k >= N, 1 vs 2 threads, and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovss_fast.kernels.dispatch import get_backend

# the cpu backend's label_propagation needs knn_edges (kernels/extension.py KERNEL_FOR)
pytestmark = pytest.mark.skipif(bool(get_backend("cpu").unsupported_reasons("label_propagation", (torch.zeros(1),),
                                                                          {})), reason="no compiled knn_edges")


def oracle(feats, pos, k, gamma=3.0, sigma=0.01, dist_pow=1.0):
    """float64: each row's min(k, N) largest inner products (a stable sort: lower index first among equals)."""
    f = feats.double().numpy()
    p = pos.double().numpy()
    sim = f @ f.T
    k = min(k, f.shape[0])
    ks = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(((p[:, None, :] - p[ks]) ** 2).sum(-1))
    w = np.maximum(np.take_along_axis(sim, ks, 1), 0) ** gamma * np.exp(-sigma * dist**dist_pow)
    return torch.from_numpy(ks), torch.from_numpy(w)


def by_index(index, w):
    """Each row's entries in order of index (the op's order within a row is unspecified)."""
    order = index.argsort(dim=1)
    return index.gather(1, order), w.gather(1, order)


def unit(feats):
    return torch.nn.functional.normalize(feats, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,k", [(600, 50), (600, 400), (300, 700), (256, 256), (1, 5)])
def test_knn_edges_matches_a_stable_sort(dtype, N, k):
    """N over 1-3 tiles of 256 (600 = 256 + 256 + 88), k < N, k = N and k > N (clipped to N)."""
    gen = torch.Generator().manual_seed(N + k)
    centres = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    feats = unit(centres[torch.randint(0, 5, (N,), generator=gen)] + 0.7 * torch.randn(N, 24, generator=gen,
                                                                                        dtype=torch.float64))
    pos = torch.rand(N, 2, generator=gen, dtype=torch.float64) * 400
    gamma = 2.5 if N == 300 else 3.0  # std::pow and the cube
    index, w = torch.ops.ovss_fast.knn_edges(feats.to(dtype), pos.to(dtype), k, gamma, 0.01, 1.0)
    assert index.shape == (N, min(k, N)) and index.dtype == torch.int64 and w.dtype == dtype
    want_i, want_w = by_index(*oracle(feats, pos, k, gamma=gamma))
    got_i, got_w = by_index(index, w)
    assert torch.equal(got_i, want_i)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got_w.double() - want_w).abs().max()) < tol * float(want_w.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 90, 120, 121, 300])
def test_knn_edges_ties_at_the_kth_place_go_to_the_lower_index(dtype, k):
    """600 rows drawn from 5 unit vectors whose cosines are exact in binary: every row ties at the k-th place
    with rows in other tiles, and the lower indices must win (as a stable sort)."""
    gen = torch.Generator().manual_seed(k)
    base = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [0, 0, 1, 0]],
                        dtype=torch.float64)
    feats = base[torch.randint(0, 5, (600,), generator=gen)]
    pos = torch.rand(600, 2, generator=gen, dtype=torch.float64) * 64
    index, w = torch.ops.ovss_fast.knn_edges(feats.to(dtype), pos.to(dtype), k, 2.0, 0.05, 0.5)
    want_i, want_w = by_index(*oracle(feats, pos, k, gamma=2.0, sigma=0.05, dist_pow=0.5))
    got_i, got_w = by_index(index, w)
    assert torch.equal(got_i, want_i)
    assert torch.allclose(got_w.double(), want_w, rtol=1e-5, atol=0)


def test_knn_edges_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(2)
    feats = unit(torch.randn(700, 32, generator=gen))
    pos = torch.rand(700, 2, generator=gen) * 300
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(by_index(*torch.ops.ovss_fast.knn_edges(feats, pos, 200, 3.0, 0.01, 1.0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_knn_edges_opcheck_and_checks():
    ops = torch.ops.ovss_fast
    gen = torch.Generator().manual_seed(4)
    feats, pos = unit(torch.randn(9, 5, generator=gen)), torch.rand(9, 2, generator=gen)
    torch.library.opcheck(ops.knn_edges, (feats, pos, 4, 3.0, 0.01, 1.0))
    with pytest.raises(RuntimeError, match="positions should be"):
        ops.knn_edges(feats, pos[:8], 4, 3.0, 0.01, 1.0)
    with pytest.raises(RuntimeError, match="k should be >= 1"):
        ops.knn_edges(feats, pos, 0, 3.0, 0.01, 1.0)
    with pytest.raises(RuntimeError, match="dist_pow should be > 0"):
        ops.knn_edges(feats, pos, 4, 3.0, 0.01, 0.0)
    with pytest.raises(RuntimeError, match="feats should be"):
        ops.knn_edges(feats[0], pos, 4, 3.0, 0.01, 1.0)


def test_knn_edges_similarities_outside_the_unit_range():
    """Unnormalised features: similarities far outside [-1, 1] fall into the histogram's end bins of the cut,
    where the strict selection decides alone."""
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(520, 8, generator=gen, dtype=torch.float64) * 5
    pos = torch.rand(520, 2, generator=gen, dtype=torch.float64) * 100
    index, w = torch.ops.ovss_fast.knn_edges(feats, pos, 60, 1.0, 0.01, 1.0)
    want_i, want_w = by_index(*oracle(feats, pos, 60, gamma=1.0))
    got_i, got_w = by_index(index, w)
    assert torch.equal(got_i, want_i)
    assert torch.allclose(got_w, want_w, rtol=1e-12, atol=0)
