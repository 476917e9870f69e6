"""The Triton backend (ovss_fast.kernels.triton) against the float64 reference.

Three kinds of test:

* ``triton_interpret``: the kernels on tiny CPU tensors under the Triton interpreter. Triton
  decides once per process, when ``triton.language`` is first imported, whether kernels
  compile or are interpreted, and TRITON_INTERPRET=1 must not leak into the other test
  modules (``backend="auto"`` would then pick the slow interpreter for CPU tensors). So these
  tests run in ONE child pytest process started with TRITON_INTERPRET=1; in this process each
  of them reports the outcome its twin had in the child (a failure carries the child's message;
  tests/triton_child.py).
* plain tests of ``unsupported_reasons`` and an ahead-of-time compile of every kernel for
  sm_90 (H100 / H200), which needs no GPU and catches what the interpreter does not check
  (constexpr globals, layouts, shared memory);
* ``cuda`` tests at real sizes, skipped without a GPU.

Tolerances (method.md section 5): float32 scores rel. error <= 1e-4 (``rel_err`` from
conftest: max |a - e| / max |e|, -inf entries must coincide); labels identical except where
the reference's top two scores are within that tolerance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import compile_for_sm90, rel_err, velocity_lstar
from triton_child import HAS_TRITON, InterpreterChild

from ovss_fast.kernels import reference as R
from ovss_fast.kernels.triton._runtime import TritonOptions
from ovss_fast.ops import api as ops

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


# --------------------------------------------------------------------------- the interpreter child
interpreted = InterpreterChild(__file__).interpreted


def _backend():
    from ovss_fast.kernels.triton import TRITON_BACKEND

    return TRITON_BACKEND


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed-storage layout (a non-contiguous view)."""
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() or x.shape[-1] == 1 or x.shape[-2] == 1
    return y


def _q(B: int, N: int, C: int, *, dead: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    """Class distributions over patches [B, N, C] (columns sum to 1; listed columns all zero)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, N, C, generator=g) ** 3
    for c in dead:
        q[:, :, c] = 0
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-30)


def _kernel(B: int, N: int, *, symmetric: bool = False, seed: int = 1) -> torch.Tensor:
    """A Gibbs-like kernel in (0, 1]; non-symmetric unless asked, so K and K^T are told apart."""
    g = torch.Generator().manual_seed(seed)
    k = torch.exp(-torch.rand(B, N, N, generator=g) / 0.2)
    return 0.5 * (k + k.transpose(1, 2)) if symmetric else k


# --------------------------------------------------------------------------- section 1
@interpreted
@pytest.mark.parametrize(
    "B,N,C,D,nms,dtype,layout",
    [
        (2, 37, 5, 20, 0.0, torch.float32, "contiguous"),
        (1, 37, 1, 20, 0.0, torch.float32, "contiguous"),
        (2, 37, 5, 20, 0.5, torch.float32, "noncontiguous"),
        (2, 37, 5, 20, 0.0, torch.float16, "contiguous"),
        (1, 19, 21, 24, 0.3, torch.bfloat16, "noncontiguous"),
    ],
)
def test_class_distributions(B, N, C, D, nms, dtype, layout):
    g = torch.Generator().manual_seed(B * 100 + C)
    feats = torch.randn(B, N, D, generator=g).to(dtype)
    text = torch.randn(C, D, generator=g).to(dtype)
    if layout == "noncontiguous":
        feats = _noncontig(feats)
        text = torch.randn(C, 2 * D, generator=g).to(dtype)[:, ::2]
    got = _backend().class_distributions(feats, text, scale=100.0, nms=nms)
    want = R.class_distributions(feats.double(), text.double(), scale=100.0, nms=nms)
    assert got.dtype == torch.float32 and got.shape == (B, N, C)
    assert rel_err(got, want) <= TOL
    # emptied columns stay exactly 0 (a dead class), the others sum to 1
    assert torch.equal(got.sum(dim=1) == 0, want.sum(dim=1) == 0)


@interpreted
def test_class_distributions_nms_kills_a_class():
    g = torch.Generator().manual_seed(3)
    text = torch.randn(4, 16, generator=g)
    # every patch is a noisy copy of class 0, 1 or 2, so class 3 never comes near the winner
    own = torch.randint(0, 3, (2, 37), generator=g)
    feats = text[own] + 0.2 * torch.randn(2, 37, 16, generator=g)
    got = _backend().class_distributions(feats, text, nms=0.9)
    want = R.class_distributions(feats.double(), text.double(), nms=0.9)
    dead = R.dead_classes(want)
    assert bool(dead.any())
    assert torch.equal(R.dead_classes(got), dead)
    assert rel_err(got, want) <= TOL


# --------------------------------------------------------------------------- section 2
@interpreted
@pytest.mark.parametrize(
    "B,N,dtype,layout",
    [(2, 37, torch.float32, "noncontiguous"), (1, 17, torch.bfloat16, "contiguous"),
     (1, 37, torch.float16, "contiguous")],
)
def test_gibbs_kernel(B, N, dtype, layout):
    g = torch.Generator().manual_seed(N)
    a = (torch.rand(B, N, N, generator=g) ** 4).to(dtype)  # non-symmetric on purpose
    a[0, 0, 1] = 0  # a zero pair pulls Craw's max to -log(1e-12) when its mirror is 0 too
    a[0, 1, 0] = 0
    if layout == "noncontiguous":
        a = _noncontig(a)
    cost, kern = _backend().gibbs_kernel(a, eps=0.1)
    cost_ref, kern_ref = R.gibbs_kernel(a.double(), eps=0.1)
    assert cost.dtype == kern.dtype == torch.float32
    assert rel_err(cost, cost_ref) <= TOL
    assert rel_err(kern, kern_ref) <= TOL


@interpreted
def test_gibbs_kernel_constant_affinity():
    a = torch.full((2, 19, 19), 0.25)
    cost, kern = _backend().gibbs_kernel(a, eps=0.05)
    assert torch.equal(cost, torch.zeros_like(cost))
    assert torch.equal(kern, torch.ones_like(kern))


def _gibbs_affinity(B: int, N: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """A non-symmetric affinity whose Craw range differs per image (image 0 holds a zero pair, whose
    Craw is -log(1e-12)); "transposed": a transposed view, "slice": every other column of a larger
    batch (strides 2 in b and in j)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2 * B, N + 1, 2 * N + 1, generator=g)
    a = (a ** (2.0 + 2.0 * torch.arange(2 * B).view(-1, 1, 1))).to(dtype)
    a = a[::2, 1:, 1::2] if layout == "slice" else a[:B, :N, :N].contiguous()
    if N > 1:
        a[0, 0, N - 1] = 0
        a[0, N - 1, 0] = 0
    if layout == "transposed":
        a = a.transpose(1, 2)
    assert a.shape == (B, N, N) and (N == 1 or a.is_contiguous() == (layout == "contiguous"))
    return a


@interpreted
@pytest.mark.parametrize(
    "B,N,dtype,layout",
    [
        (1, 1, torch.float32, "contiguous"),
        (3, 1, torch.float16, "slice"),
        (1, 17, torch.bfloat16, "contiguous"),
        (3, 17, torch.float32, "slice"),
        (1, 40, torch.float16, "transposed"),
        (3, 40, torch.float32, "contiguous"),
        (1, 64, torch.float32, "slice"),
        (3, 64, torch.bfloat16, "transposed"),
    ],
)
def test_gibbs_kernel_only(B, N, dtype, layout):
    """Symmetric tiles (N not a multiple of the tile, one patch, B > 1, any strides): the K of
    gibbs_kernel bit for bit, exactly symmetric, and the float64 reference's K within 1e-4."""
    from ovss_fast.kernels.triton import gibbs_kernel as gk

    a = _gibbs_affinity(B, N, dtype, layout, seed=B * 100 + N)
    kern = gk.gibbs_kernel_only(a, eps=0.1)
    _, kern_two_pass = gk.gibbs_kernel(a, eps=0.1)
    _, kern_ref = R.gibbs_kernel(a.double(), eps=0.1)
    assert kern.dtype == torch.float32 and kern.shape == (B, N, N) and kern.is_contiguous()
    assert torch.equal(kern, kern_two_pass)
    assert torch.equal(kern, kern.transpose(1, 2))
    assert rel_err(kern, kern_ref) <= TOL
    if N > 1:  # the zero pair is image 0's largest cost, so its K there is exp(-1 / eps)
        assert abs(float(kern[0, 0, N - 1]) - float(torch.exp(torch.tensor(-10.0)))) <= 1e-9


@interpreted
def test_gibbs_kernel_only_constant_affinity():
    a = torch.full((2, 19, 19), 0.25)
    assert torch.equal(_backend().gibbs_kernel_only(a, eps=0.05), torch.ones(2, 19, 19))  # separate
    from ovss_fast.kernels.triton import gibbs_kernel as gk

    assert torch.equal(gk.gibbs_kernel_only(a, eps=0.05), torch.ones(2, 19, 19))  # span 0: cost 0, K 1


@interpreted
def test_gibbs_kernel_scale_free():
    """Spec v2 (method.md section 2): Craw = -log(Sym / M + 1e-12), M the image's max of Sym. One batch whose
    affinities differ by 1e20 in scale (1e-20 A, A', 1e20 A'') and an all-zero image (M = 0: cost 0, K = 1):
    both Triton paths match the float64 reference image by image, and 7 A gives A's cost."""
    from ovss_fast.kernels.triton import gibbs_kernel as gk

    g = torch.Generator().manual_seed(11)
    a = torch.rand(4, 23, 23, generator=g) * torch.tensor([1e-20, 1.0, 1e20, 0.0]).view(4, 1, 1)
    cost, kern = gk.gibbs_kernel(a, eps=0.1)
    cost_ref, kern_ref = R.gibbs_kernel(a.double(), eps=0.1)
    for b in range(4):
        assert rel_err(cost[b], cost_ref[b]) <= TOL, b
        assert rel_err(kern[b], kern_ref[b]) <= TOL, b
    assert float(cost[0].amax()) == 1.0 and float(cost[2].amax()) == 1.0  # the tiny / huge images span [0, 1]
    assert torch.equal(cost[3], torch.zeros(23, 23)) and torch.equal(kern[3], torch.ones(23, 23))
    assert torch.equal(gk.gibbs_kernel_only(a, eps=0.1), kern)
    assert float((gk.gibbs_kernel(7.0 * a, eps=0.1)[0] - cost).abs().max()) <= 1e-6


@interpreted
def test_tile_pair_covers_the_upper_triangle(monkeypatch):
    """_tile_pair maps 0 .. T (T + 1) / 2 - 1 onto every (ti, tj), ti <= tj < T, once, column by column
    (every p up to T = 2048 tiles), and stays right at both sides of every column start up to the
    largest T whose 8 p + 1 fits int32 (23170), where float32 rounds 8 p + 1 and its square root."""
    import triton
    import triton.language as tl

    from ovss_fast.kernels.triton import gibbs_kernel as gk

    # a jit function finds the functions it calls among its module's globals, not in closures
    monkeypatch.setitem(globals(), "_gk_tile_pair", gk._tile_pair)

    @triton.jit
    def pairs_kernel(p_ptr, ti_ptr, tj_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ti, tj = _gk_tile_pair(tl.load(p_ptr + offs, mask=offs < n, other=0))  # noqa: F821 - set above
        tl.store(ti_ptr + offs, ti, mask=offs < n)
        tl.store(tj_ptr + offs, tj, mask=offs < n)

    T = 2048
    cols = torch.arange(T)
    every_tj = torch.repeat_interleave(cols, cols + 1)
    starts = torch.arange(T, 23170) * torch.arange(T + 1, 23171) // 2  # p of (0, k)
    p = torch.cat([torch.arange(len(every_tj)), starts - 1, starts])
    want_tj = torch.cat([every_tj, torch.arange(T - 1, 23169), torch.arange(T, 23170)])
    want_ti = p - want_tj * (want_tj + 1) // 2
    assert int(p.max()) * 8 + 1 < 2**31
    ti = torch.empty(len(p), dtype=torch.int32)
    tj = torch.empty_like(ti)
    block = 1 << 18
    pairs_kernel[(triton.cdiv(len(p), block),)](p.to(torch.int32), ti, tj, len(p), BLOCK=block)
    assert torch.equal(tj.long(), want_tj)
    assert torch.equal(ti.long(), want_ti)


@interpreted
@pytest.mark.parametrize("mode", ["op", "mv"])
def test_gibbs_kernel_only_through_discrepancy(mode, monkeypatch):
    """backend_options={"gibbs": "fused"}: ops.discrepancy builds K with gibbs_kernel_only (and only with
    it), matches the reference and, K being the same bits, the separate path exactly; unset: gibbs_kernel."""
    from ovss_fast.kernels.triton import gibbs_kernel as gk

    calls = []
    for name in ("gibbs_kernel", "gibbs_kernel_only"):
        real = getattr(gk, name)
        monkeypatch.setattr(gk, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    q = _q(3, 37, 4, dead=(3,), seed=6)
    aff = _gibbs_affinity(3, 37, torch.float32, "transposed", seed=12)
    kw = dict(mode=mode, iters=4, sk_iters=3, steps=5, transition="gibbs")  # the path that builds K
    want = ops.discrepancy(q.double(), aff.double(), backend="reference", **kw)
    separate = ops.discrepancy(q, aff, backend="triton", **kw)
    assert calls == ["gibbs_kernel"]
    fused = ops.discrepancy(q, aff, backend="triton", backend_options={"gibbs": "fused"}, **kw)
    assert calls == ["gibbs_kernel", "gibbs_kernel_only"]
    assert rel_err(fused, want) <= TOL
    assert torch.equal(fused, separate)
    assert torch.equal(ops.discrepancy(q, aff, backend="triton", backend_options={"gibbs": "separate"}, **kw),
                       separate)
    with pytest.raises(ValueError, match="gibbs must be one of 'separate', 'fused', got 'symmetric'"):
        ops.discrepancy(q, aff, backend="triton", backend_options={"gibbs": "symmetric"}, **kw)
    assert calls == ["gibbs_kernel", "gibbs_kernel_only", "gibbs_kernel"]


@interpreted
def test_gpu_check_runs_the_fused_gibbs_kernel():
    """bench/gpu_check.py's "triton[gibbs fused]" rows: gibbs_kernel_only on every gibbs_kernel case
    (the CPU dry run's sizes here), K checked against float64, and only those cases."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench import gpu_check
    finally:
        sys.path.remove(str(ROOT))
    rows, ok = gpu_check.run_correctness("cpu", [gpu_check.GIBBS_FUSED], quick=True)
    n_cases = sum(c.op == "gibbs_kernel" for c in gpu_check.build_cases("cpu", quick=True))
    assert ok and len(rows) == n_cases >= 3, rows
    assert all(r[1] == "gibbs_kernel" and r[3] == "PASS" and "kernel only" in r[4] for r in rows), rows
    assert os.environ.get("OVSS_FAST_TRITON_GIBBS") is None


@needs_triton
def test_gibbs_option_checked():
    """The backend's gibbs option is checked before any launch (here no kernel runs)."""
    with pytest.raises(ValueError, match="gibbs must be one of 'separate', 'fused', got '1'"):
        _backend().gibbs_kernel_only(torch.rand(1, 4, 4), gibbs="1")


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("B,N,dtype,layout", [(1, 1024, torch.float32, "contiguous"), (1, 4096, torch.float32,
                                               "contiguous"), (15, 196, torch.float32, "slice"),
                                              (2, 257, torch.bfloat16, "transposed")])
def test_gpu_gibbs_kernel_only_real_sizes(B, N, dtype, layout):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    from ovss_fast.kernels.triton import gibbs_kernel as gk

    a = _gibbs_affinity(B, N, dtype, layout, seed=N).cuda()
    kern = gk.gibbs_kernel_only(a, eps=0.1)
    _, kern_two_pass = gk.gibbs_kernel(a, eps=0.1)
    assert torch.equal(kern, kern.transpose(1, 2))
    assert rel_err(kern, kern_two_pass) <= 1e-6
    assert rel_err(kern, R.gibbs_kernel(a.double(), eps=0.1)[1]) <= TOL


# --------------------------------------------------------------------------- section 3, kl
@interpreted
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "noncontiguous"), (torch.float16, "contiguous")])
def test_kl_scores(dtype, layout):
    q = _q(2, 37, 5, dead=(2,)).to(dtype)
    q[1, :5, 0] = 0  # zeros inside a live column score 0
    if layout == "noncontiguous":
        q = _noncontig(q)
    got = _backend().kl_scores(q)
    want = R.kl_scores(q.double())
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= TOL
    assert bool(torch.isinf(got[:, :, 2]).all())


# --------------------------------------------------------------------------- section 3, op
@interpreted
@pytest.mark.parametrize(
    "B,N,C,iters,dead,layout,dtype",
    [
        (2, 37, 5, 3, (1,), "noncontiguous", torch.float32),
        (1, 37, 1, 4, (), "contiguous", torch.float32),
        (1, 37, 5, 50, (), "contiguous", torch.float32),
        (1, 20, 3, 4, (), "contiguous", torch.float16),
        (2, 21, 17, 3, (16,), "contiguous", torch.float32),  # two class tiles, a dead class in the second
    ],
)
def test_sinkhorn_scores(B, N, C, iters, dead, layout, dtype):
    q = _q(B, N, C, dead=dead)
    k = _kernel(B, N)
    q, k = q.to(dtype), k.to(dtype)
    if layout == "noncontiguous":
        q, k = _noncontig(q), _noncontig(k)
    got = _backend().sinkhorn_scores(q, k, eps=0.1, iters=iters)
    want = R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=iters)
    assert got.dtype == torch.float32 and got.shape == (B, N, C)
    assert rel_err(got, want) <= TOL
    for c in dead:
        assert bool((got[:, :, c] == float("-inf")).all())


# --------------------------------------------------------------------------- section 3, mv
@interpreted
@pytest.mark.parametrize(
    "B,N,C,sk_iters,steps,dead,layout",
    [
        (2, 37, 5, 3, 6, (4,), "noncontiguous"),
        (1, 37, 1, 0, 5, (), "contiguous"),
        (1, 37, 5, 15, 50, (), "contiguous"),
        (2, 21, 17, 2, 4, (16,), "contiguous"),  # two class tiles, a dead class in the second
    ],
)
def test_markov_scores_integrated(B, N, C, sk_iters, steps, dead, layout):
    q, k = _q(B, N, C, dead=dead), _kernel(B, N)
    if layout == "noncontiguous":
        q, k = _noncontig(q), _noncontig(k)
    got = _backend().markov_scores(q, k, sk_iters=sk_iters, steps=steps, readout="integrated")
    want = R.markov_scores(q.double(), k.double(), sk_iters=sk_iters, steps=steps, readout="integrated")
    assert rel_err(got, want) <= TOL
    for c in dead:
        assert bool((got[:, :, c] == float("-inf")).all())


def _velocity_margin(q: torch.Tensor, k: torch.Tensor, sk_iters: int, steps: int, tau: float) -> torch.Tensor:
    """min over l of | |f(l) - f(l-1)| - tau | in float64: where it is tiny, lstar may flip by rounding."""
    tt = R.doubly_stochastic(k.double(), sk_iters=sk_iters).transpose(1, 2)
    f = q.shape[1] * q.double()
    margin = torch.full_like(f, float("inf"))
    for _ in range(steps):
        nxt = torch.bmm(tt, f)
        margin = torch.minimum(margin, ((nxt - f).abs() - tau).abs())
        f = nxt
    return margin


@interpreted
@pytest.mark.parametrize("B,N,C,sk_iters,steps,tau,dead", [(2, 37, 5, 3, 8, 0.3, (0,)), (1, 37, 1, 15, 50, 0.05, ())])
def test_markov_scores_velocity(B, N, C, sk_iters, steps, tau, dead):
    q, k = _q(B, N, C, dead=dead), _kernel(B, N)
    got = _backend().markov_scores(q, k, sk_iters=sk_iters, steps=steps, readout="velocity", tau=tau)
    want = R.markov_scores(q.double(), k.double(), sk_iters=sk_iters, steps=steps, readout="velocity", tau=tau)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    robust = (_velocity_margin(q, k, sk_iters, steps, tau) > 1e-3) & torch.isfinite(want)
    # the test is about lstar, not about its edge cases
    assert float(robust.sum()) > 0.9 * float(torch.isfinite(want).sum())
    lstar_got = velocity_lstar(got.double(), q)  # S = lstar + f0 / (1 + f0) (spec v2)
    lstar_want = velocity_lstar(want, q)
    assert torch.equal(lstar_got[robust], lstar_want[robust])
    assert bool(((lstar_want[torch.isfinite(want)] >= 1) & (lstar_want[torch.isfinite(want)] <= steps + 1)).all())
    assert float((got.double() - want)[robust].abs().max()) <= TOL * float(want[robust].abs().max())


@interpreted
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
@pytest.mark.parametrize("B,N,C,dead,layout", [(2, 37, 5, (1,), "noncontiguous"), (1, 21, 17, (16,), "contiguous")])
def test_split_schedule(B, N, C, dead, layout, readout):
    """The row-parallel schedule (one launch per half-iteration / chain step) matches the reference too."""
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = _q(B, N, C, dead=dead), _kernel(B, N)
    if layout == "noncontiguous":
        q, k = _noncontig(q), _noncontig(k)
    if readout == "integrated":  # op has no readout choice: run it once per shape
        got = sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="split")
        assert rel_err(got, R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=4)) <= TOL
        assert rel_err(got, sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="fused")) <= 1e-5
    kw = dict(sk_iters=2, steps=6, readout=readout, tau=0.3)
    got = mk.markov_scores(q, k, schedule="split", **kw)
    fused = mk.markov_scores(q, k, schedule="fused", **kw)
    want = R.markov_scores(q.double(), k.double(), **kw)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    if readout == "integrated":
        assert rel_err(got, want) <= TOL
        assert rel_err(got, fused) <= 1e-5
    else:
        robust = (_velocity_margin(q, k, 2, 6, 0.3) > 1e-3) & torch.isfinite(want)
        assert float((got.double() - want)[robust].abs().max()) <= TOL * float(want[robust].abs().max())
        assert torch.equal(got[robust], fused[robust])


@interpreted
@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_markov_scores_float32_chain_accuracy(schedule):
    """The chain is carried as d = f - 1 (method.md section 3, mv): carrying f itself cancels in
    f - 1 as the chain mixes. On this case the literal float32 form is 2.2e-4 of float64 under the
    interpreter (both schedules); carrying d gives 1.8e-6. Default sk_iters = 15, steps = 50."""
    from ovss_fast.kernels.triton import markov_scores as mk

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 192, 512, generator=g)
    text = torch.randn(2, 512, generator=g)
    aff = torch.rand(1, 192, 192, generator=g)
    q = R.class_distributions(feats.double(), text.double())
    _, k = R.gibbs_kernel(aff.double())
    got = mk.markov_scores(q.float(), k.float(), schedule=schedule)
    assert got.dtype == torch.float32
    assert rel_err(got, R.markov_scores(q, k)) <= TOL


# --------------------------------------------------------------------------- the window schedule (op, mv)
@interpreted
@pytest.mark.parametrize(
    "B,N,C,dead,symmetric,dtype,layout",
    [
        (3, 37, 5, (1,), False, torch.float32, "noncontiguous"),  # B > 1, N not a multiple of the block
        (2, 21, 17, (16,), True, torch.float32, "contiguous"),  # two class tiles, a dead class in the second
        (1, 37, 1, (), True, torch.float32, "contiguous"),  # C = 1
        (2, 20, 3, (0,), True, torch.float16, "contiguous"),
        (2, 19, 4, (2,), False, torch.bfloat16, "contiguous"),
    ],
)
def test_window_schedule_sinkhorn(B, N, C, dead, symmetric, dtype, layout):
    """One launch for the batch, every row of a window per program; symmetric reads K^T u as K u."""
    _check_sinkhorn_schedule(_inputs(B, N, C, dead, symmetric, dtype, layout, N, C), "window", symmetric, dead)


def _inputs(B: int, N: int, C: int, dead: tuple, symmetric: bool, dtype, layout: str, q_seed: int, k_seed: int):
    """q [B, N, C] (classes ``dead`` dead) and a [B, N, N] kernel (symmetric or not) in ``dtype``, contiguous or
    not (``layout``)."""
    q, k = _q(B, N, C, dead=dead, seed=q_seed), _kernel(B, N, symmetric=symmetric, seed=k_seed)
    q, k = q.to(dtype), k.to(dtype)
    if layout == "noncontiguous":
        q, k = _noncontig(q), _noncontig(k)
    return q, k


def _check_sinkhorn_schedule(qk: tuple, schedule: str, symmetric: bool, dead: tuple) -> None:
    """sinkhorn_scores(schedule=schedule) (iters 4) against float64 within TOL and against the fused schedule
    within 1e-5; the dead classes -inf."""
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = qk
    got = sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule=schedule, symmetric=symmetric)
    want = R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=4)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert rel_err(got, want) <= TOL
    assert rel_err(got, sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="fused")) <= 1e-5
    for c in dead:
        assert bool((got[:, :, c] == float("-inf")).all())


@interpreted
def test_window_schedule_sinkhorn_needs_the_transpose_when_not_symmetric():
    """The general path really reads K^T: claiming symmetry for a non-symmetric K changes the answer."""
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = _q(2, 21, 3), _kernel(2, 21)
    want = R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=4)
    assert rel_err(sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="window"), want) <= TOL
    wrong = sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="window", symmetric=True)
    assert rel_err(wrong, want) > 1e-2
    sym = 0.5 * (k + k.transpose(1, 2))
    assert rel_err(sk.sinkhorn_scores(q, sym, eps=0.1, iters=4, schedule="window", symmetric=True),
                   R.sinkhorn_scores(q.double(), sym.double(), eps=0.1, iters=4)) <= TOL


@interpreted
@pytest.mark.parametrize("op", ["op", "mv"])
def test_window_schedule_partial_sums_past_256(op):
    """N = 300: BLOCK_N = 512 (the second config tier), products over N in two partial sums."""

    q, k = _q(1, 300, 2, seed=3), _kernel(1, 300, symmetric=True, seed=4)
    got, want = _scores_and_reference(op, q, k, "window", sk_iters=1)
    assert rel_err(got, want) <= TOL


def _scores_and_reference(op: str, q, k, schedule: str, *, sk_iters: int):
    """(triton scores with this schedule and symmetric=True, float64 reference) for op (3 iterations) or
    mv (sk_iters, 3 steps)."""
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    if op == "op":
        return (sk.sinkhorn_scores(q, k, eps=0.1, iters=3, schedule=schedule, symmetric=True),
                R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=3))
    return (mk.markov_scores(q, k, sk_iters=sk_iters, steps=3, schedule=schedule, symmetric=True),
            R.markov_scores(q.double(), k.double(), sk_iters=sk_iters, steps=3))


@interpreted
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
@pytest.mark.parametrize(
    "B,N,C,dead,symmetric,dtype,layout",
    [
        (3, 37, 5, (4,), False, torch.float32, "noncontiguous"),
        (2, 21, 17, (16,), True, torch.float32, "contiguous"),
        (1, 37, 1, (), True, torch.float32, "contiguous"),
        (2, 19, 4, (0,), True, torch.bfloat16, "contiguous"),
    ],
)
def test_window_schedule_markov(B, N, C, dead, symmetric, dtype, layout, readout):

    q, k = _inputs(B, N, C, dead, symmetric, dtype, layout, N + 1, C + 1)
    _check_markov_schedule(q, k, "window", "fused", symmetric, dead, readout)


def _check_markov_schedule(q, k, schedule: str, other: str, symmetric: bool, dead: tuple, readout: str) -> None:
    """markov_scores(schedule=schedule) against float64 and against the ``other`` schedule (sk_iters 3,
    steps 6): integrated within TOL / 1e-5; velocity equal where the readout is robust (a margin)."""
    from ovss_fast.kernels.triton import markov_scores as mk

    kw = dict(sk_iters=3, steps=6, readout=readout, tau=0.3)
    got = mk.markov_scores(q, k, schedule=schedule, symmetric=symmetric, **kw)
    second = mk.markov_scores(q, k, schedule=other, **kw)
    want = R.markov_scores(q.double(), k.double(), **kw)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    for c in dead:
        assert bool((got[:, :, c] == float("-inf")).all())
    if readout == "integrated":
        assert rel_err(got, want) <= TOL
        assert rel_err(got, second) <= 1e-5
    else:
        robust = (_velocity_margin(q, k, 3, 6, 0.3) > 1e-3) & torch.isfinite(want)
        assert float(robust.sum()) > 0.5 * float(torch.isfinite(want).sum())
        assert float((got.double() - want)[robust].abs().max()) <= TOL * float(want[robust].abs().max())
        assert torch.equal(got[robust], second[robust])


@interpreted
def test_window_scales_match_the_launch_per_step_scales():
    from ovss_fast.kernels.triton import markov_scores as mk

    for symmetric in (False, True):
        k = _kernel(2, 37, symmetric=symmetric, seed=9)
        r, c, e = mk.window_scales(k, sk_iters=4, symmetric=symmetric)
        r0, c0 = mk.doubly_stochastic_scales(k, sk_iters=4)
        assert r.dtype == c.dtype == torch.float64 and e.dtype == torch.float32
        assert float(((r - r0).abs() / r0).max()) <= 1e-12 and float(((c - c0).abs() / c0).max()) <= 1e-12
        assert float((e - mk.column_drift(k, r0, c0)).abs().max()) <= 1e-6
        t = R.doubly_stochastic(k.double(), sk_iters=4)
        assert torch.allclose(r[:, :, None] * k.double() * c[:, None, :], t, rtol=1e-10, atol=0)


@interpreted
@pytest.mark.parametrize("mode", ["op", "mv"])
def test_window_schedule_through_discrepancy(mode, monkeypatch):
    """backend_options={"schedule": "window"}: ops.discrepancy passes symmetric=True (gibbs_kernel's K is
    exactly symmetric) and matches the reference; tf32x3 runs the same path (the interpreter computes
    its dots in float32, so only a GPU run can say whether tf32x3 holds 1e-4)."""
    from ovss_fast.kernels.triton import TRITON_BACKEND

    g = torch.Generator().manual_seed(11)
    q = _q(3, 37, 4, dead=(3,), seed=5)
    aff = torch.rand(3, 37, 37, generator=g)
    _, k = TRITON_BACKEND.gibbs_kernel(aff, eps=0.1)
    assert torch.equal(k, k.transpose(1, 2))
    seen = []
    name = "sinkhorn_scores" if mode == "op" else "markov_scores"
    real = getattr(type(TRITON_BACKEND), name)

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("symmetric"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(TRITON_BACKEND), name, spy)
    kw = dict(mode=mode, iters=4, sk_iters=3, steps=5)
    want = ops.discrepancy(q.double(), aff.double(), backend="reference", **kw)
    got = ops.discrepancy(q, aff, backend="triton", backend_options={"schedule": "window"}, **kw)
    assert seen == [True]
    assert rel_err(got, want) <= TOL
    tf32x3 = {"schedule": "window", "precision": "tf32x3"}
    assert rel_err(ops.discrepancy(q, aff, backend="triton", backend_options=tf32x3, **kw), want) <= TOL


# --------------------------------------------------------------------------- the persistent schedule (op, mv)
_PERSISTENT_CASES = [
    # B, N, C, dead, symmetric, dtype, layout, one launch (every phase through the grid barrier code)
    (3, 37, 5, (1,), False, torch.float32, "noncontiguous", False),  # B > 1, N not a multiple of the block
    (2, 21, 17, (16,), True, torch.float32, "contiguous", True),  # two class tiles, dead class in the second
    (1, 37, 1, (), True, torch.float32, "contiguous", False),  # C = 1
    (2, 20, 3, (0,), True, torch.float16, "contiguous", True),
    (2, 19, 4, (2,), False, torch.bfloat16, "contiguous", False),
]


@interpreted
@pytest.mark.parametrize("B,N,C,dead,symmetric,dtype,layout,one_launch", _PERSISTENT_CASES)
def test_persistent_schedule_sinkhorn(B, N, C, dead, symmetric, dtype, layout, one_launch, monkeypatch):
    """Every phase of op over tiles striped across the programs (three in the interpreter, more tiles than
    that), or all phases in one launch through the grid barrier; against float64 and the fused schedule."""
    from ovss_fast.kernels.triton import _schedules

    monkeypatch.setattr(_schedules, "INTERPRET_ONE_LAUNCH", one_launch)
    qk = _inputs(B, N, C, dead, symmetric, dtype, layout, N + 7, C + 7)
    _check_sinkhorn_schedule(qk, "persistent", symmetric, dead)


@interpreted
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
@pytest.mark.parametrize("B,N,C,dead,symmetric,dtype,layout,one_launch", _PERSISTENT_CASES[:3] + _PERSISTENT_CASES[4:])
def test_persistent_schedule_markov(B, N, C, dead, symmetric, dtype, layout, one_launch, readout, monkeypatch):
    """Sinkhorn-Knopp, the drift and the chain of mv as phases of one persistent kernel."""
    from ovss_fast.kernels.triton import _schedules

    monkeypatch.setattr(_schedules, "INTERPRET_ONE_LAUNCH", one_launch)
    q, k = _inputs(B, N, C, dead, symmetric, dtype, layout, N + 8, C + 8)
    _check_markov_schedule(q, k, "persistent", "split", symmetric, dead, readout)


@interpreted
@pytest.mark.parametrize("op", ["op", "mv"])
def test_persistent_schedule_partial_sums_past_256(op, monkeypatch):
    """N = 300 (products over N in partial sums of 256), 19 row blocks of 16: the q / f column sums go
    through the per row block partials; one launch, so the barrier counters must also come back to 0."""
    from ovss_fast.kernels.triton import _schedules

    monkeypatch.setattr(_schedules, "INTERPRET_ONE_LAUNCH", True)
    q, k = _q(1, 300, 2, dead=(1,), seed=5), _kernel(1, 300, symmetric=True, seed=6)
    got, want = _scores_and_reference(op, q, k, "persistent", sk_iters=2)
    assert rel_err(got, want) <= TOL
    assert bool((got[:, :, 1] == float("-inf")).all()) and bool(torch.isfinite(got[:, :, 0]).all())


@interpreted
def test_persistent_schedule_needs_the_transpose_when_not_symmetric():
    """The general persistent path really reads K^T (op) and K's columns (mv's SK and chain)."""
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = _q(2, 21, 3, seed=2), _kernel(2, 21, seed=3)
    want = R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=4)
    assert rel_err(sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="persistent"), want) <= TOL
    assert rel_err(sk.sinkhorn_scores(q, k, eps=0.1, iters=4, schedule="persistent", symmetric=True), want) > 1e-2
    want = R.markov_scores(q.double(), k.double(), sk_iters=3, steps=4)
    assert rel_err(mk.markov_scores(q, k, sk_iters=3, steps=4, schedule="persistent"), want) <= TOL
    assert rel_err(mk.markov_scores(q, k, sk_iters=3, steps=4, schedule="persistent", symmetric=True), want) > 1e-2


@interpreted
@pytest.mark.parametrize("mode", ["op", "mv"])
def test_persistent_schedule_through_discrepancy(mode, monkeypatch):
    """The option schedule="persistent" selects it for any N (here N = 37 and N = 600, past the window
    schedule's limit) through ops.discrepancy, symmetric=True included."""
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    assert sk.choose_schedule(1, 600, 21, torch.device("cpu"), "auto", "persistent") == "persistent"
    g = torch.Generator().manual_seed(12)
    q = _q(2, 37, 4, dead=(2,), seed=6)
    aff = torch.rand(2, 37, 37, generator=g)
    kw = dict(mode=mode, iters=4, sk_iters=3, steps=5)
    want = ops.discrepancy(q.double(), aff.double(), backend="reference", **kw)
    opts = {"schedule": "persistent"}
    assert rel_err(ops.discrepancy(q, aff, backend="triton", backend_options=opts, **kw), want) <= TOL
    opts["precision"] = "tf32x3"
    assert rel_err(ops.discrepancy(q, aff, backend="triton", backend_options=opts, **kw), want) <= TOL


@interpreted
def test_regime_table_runs_the_triton_schedules():
    """bench_discrepancy.run_regimes, the GPU session's table, through the Triton rows (window,
    split, tf32x3) under the interpreter: each row checked against float64, timed, labelled."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench import bench_discrepancy as bd
    finally:
        sys.path.remove(str(ROOT))
    labels = ("reference eager", "triton[window]", "triton[split,tf32x3]")
    variants = [v for v in bd.gpu_variants(quick=False) if v.label in labels]
    variants = [bd.Variant(v.label, v.backend, v.env, v.kwargs) for v in variants]  # every shape
    records = bd.run_regimes("cpu", smoke=True, shapes=[("window", 2, 21, 3)], variants=variants, log=lambda s: None)
    assert [r["backend"] for r in records] == [*labels, *labels]
    assert all(r["passed"] and r["median_ms"] > 0 and r["rel_err"] <= TOL for r in records), records


@needs_triton
def test_schedule_choice(monkeypatch):
    """auto keeps today's fused / split rule; the window schedule only when asked for."""
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    cpu = torch.device("cpu")
    assert sk.choose_schedule(15, 196, 199, cpu) == "fused"
    for forced in ("fused", "split", "window", "persistent"):
        assert sk.choose_schedule(15, 196, 199, cpu, forced) == forced
    # the second argument: the backend's preferred schedule option
    assert sk.choose_schedule(15, 196, 199, cpu, "auto", "window") == "window"
    assert sk.choose_schedule(1, sk.WINDOW_MAX_N + 1, 21, cpu, "auto", "window") == "fused"  # too large: auto
    assert sk.choose_schedule(15, 196, 199, cpu, "auto", "split") == "split"
    with pytest.raises(ValueError, match=r"schedule='window' takes N <= 512 patches, got N = 600"):
        sk.choose_schedule(1, 600, 21, cpu, "window")
    with pytest.raises(ValueError, match="schedule must be one of"):
        sk.choose_schedule(1, 60, 21, cpu, "cooperative")
    assert sk.choose_schedule(1, 4096, 171, cpu, "auto", "persistent") == "persistent"
    assert sk.choose_schedule(1, 4096, 171, cpu, "split", "persistent") == "split"  # an argument wins


# --------------------------------------------------------------------------- section 4
def _jbu_inputs(B: int, C: int, h: int, w: int, H: int, W: int, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, C, h, w, generator=g)
    guide = torch.rand(B, 3, H, W, generator=g)
    return scores, guide


@interpreted
@pytest.mark.parametrize(
    "B,C,h,w,H,W,radius,sigma_range,dtype,layout",
    [
        (2, 5, 4, 5, 11, 13, 1, 0.1, torch.float32, "channels_last"),
        (1, 1, 3, 3, 7, 9, 2, 0.1, torch.float32, "contiguous"),
        (1, 5, 4, 5, 9, 10, 1, 0.01, torch.float16, "contiguous"),  # tiny sigma_r: exps underflow without the max
    ],
)
def test_jbu_upsample(B, C, h, w, H, W, radius, sigma_range, dtype, layout):
    scores, guide = _jbu_inputs(B, C, h, w, H, W, seed=C)
    if C > 2:
        scores[0, 2, 1, 1] = float("-inf")  # a dead class at one cell: -inf wherever that cell is a tap
        scores[:, 3] = float("-inf")  # a dead class everywhere
    scores, guide = scores.to(dtype), guide.to(dtype)
    if layout == "channels_last":
        scores = scores.contiguous(memory_format=torch.channels_last)
        guide = guide.contiguous(memory_format=torch.channels_last)
    kw = dict(sigma_spatial=1.0, sigma_range=sigma_range, radius=radius)
    got = _backend().jbu_upsample(scores, guide, **kw)
    want = R.jbu_upsample(scores.double(), guide.double(), **kw)
    assert got.dtype == torch.float32 and got.shape == (B, C, H, W)
    assert rel_err(got, want) <= TOL  # also checks that the -inf entries coincide
    if C > 2:
        assert bool(torch.isinf(got[0, 2]).any()) and bool(torch.isinf(got[:, 3]).all())


def _top2_gap(up: torch.Tensor) -> torch.Tensor:
    top = up.topk(2, dim=1).values if up.shape[1] > 1 else torch.cat([up, up - float("inf")], dim=1)
    return top[:, 0] - top[:, 1]


@interpreted
@pytest.mark.parametrize(
    "B,C,h,w,H,W,radius",
    [(2, 6, 4, 5, 11, 13, 1), (1, 9, 3, 4, 8, 8, 2), (1, 1, 3, 3, 5, 7, 1)],
)
def test_jbu_argmax(B, C, h, w, H, W, radius):
    scores, guide = _jbu_inputs(B, C, h, w, H, W, seed=C + 10)
    if C > 5:
        scores[:, 5] = scores[:, 1]  # an exact tie across class tiles: the lower class (1) wins
        scores[:, 0] = float("-inf")
    got = _backend().jbu_argmax(scores, guide, radius=radius)
    up = R.jbu_upsample(scores.double(), guide.double(), radius=radius)
    want = up.argmax(dim=1)
    assert got.dtype == torch.int64 and got.shape == (B, H, W)
    fin = up.masked_fill(torch.isinf(up), 0)
    scale = float(fin.abs().amax()) or 1.0
    close = _top2_gap(up) <= TOL * scale
    if C > 5:
        assert not bool((got == 5).any()) and not bool((got == 0).any())
        close &= ~((want == 1) & (up[:, 1] == up[:, 5]))  # the exact ties must be decided like the reference
    assert torch.equal(got[~close], want[~close])
    # the fused argmax agrees with the argmax of the unfused upsampling bit for bit
    assert torch.equal(got, _backend().jbu_upsample(scores, guide, radius=radius).argmax(dim=1))


@interpreted
def test_jbu_argmax_all_dead_pixel_is_class_zero():
    scores, guide = _jbu_inputs(1, 3, 3, 3, 6, 6)
    scores[:] = float("-inf")
    got = _backend().jbu_argmax(scores, guide, radius=1)
    assert torch.equal(got, torch.zeros_like(got))


# --------------------------------------------------------------------------- through the public API
@interpreted
def test_public_api_end_to_end():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 20, 12, generator=g)  # a 4 x 5 grid
    text = torch.randn(3, 12, generator=g)
    aff = torch.rand(1, 20, 20, generator=g)
    guide = torch.rand(1, 3, 9, 11, generator=g)
    for mode in ("kl", "op", "mv"):
        kw = dict(mode=mode, grid=(4, 5), guide=guide, iters=5, sk_iters=3, steps=5, return_scores=True)
        labels, scores = ops.segment_features(feats, text, aff, backend="triton", **kw)
        labels_ref, scores_ref = ops.segment_features(feats.double(), text.double(), aff.double(),
                                                      backend="reference", **kw)
        assert scores.dtype == torch.float32
        assert rel_err(scores, scores_ref) <= TOL, mode
        assert float((labels == labels_ref).double().mean()) >= 0.98, mode


# --------------------------------------------------------------------------- this process: no kernels run
@needs_triton
def test_backend_reasons(monkeypatch):
    backend = _backend()
    x32 = torch.zeros(1, 4, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backend.unsupported_reasons("kl_scores", (x32,), {})
    assert any("CPU tensors" in r and "TRITON_INTERPRET=1" in r for r in reasons)
    reasons = backend.unsupported_reasons("kl_scores", (x32.double(),), {})
    assert any("float64" in r for r in reasons)
    assert any("meta" in r for r in backend.unsupported_reasons("kl_scores", (x32.to("meta"),), {}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # unsupported_reasons never imports triton: safe here
    from ovss_fast.kernels.triton._runtime import triton_interprets

    if triton_interprets() is None:  # triton not imported yet: the variable would take effect
        assert backend.unsupported_reasons("kl_scores", (x32,), {}) == []
    else:  # triton already imported for CUDA in this process: the variable comes too late, and we say so
        reasons = backend.unsupported_reasons("kl_scores", (x32,), {})
        assert any("imported without it" in r for r in reasons)
    assert any("float64" in r for r in backend.unsupported_reasons("kl_scores", (x32.double(),), {}))
    big = torch.zeros(2000, 8)
    assert any("2000" in r for r in backend.unsupported_reasons("class_distributions", (torch.zeros(1, 4, 8), big),
                                                                {"scale": 100.0, "nms": 0.0}))
    # forced on CPU tensors without the interpreter: a clear error naming the backend and the reason
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' cannot run kl_scores: CPU tensors"):
        ops.discrepancy(torch.full((1, 4, 2), 0.25), None, mode="kl", backend="triton")


def test_import_without_triton():
    """`import ovss_fast.kernels.triton` works when triton cannot be imported, and says why it cannot serve."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from ovss_fast.kernels.triton import TRITON_BACKEND as T\n"
        "print(T.unsupported_reasons('kl_scores', (torch.zeros(1, 2, 2),), {}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout


def _largest_step(configs):
    """The block sizes of the split step config with the largest tiles."""
    return max(configs, key=lambda c: c.kwargs["BLOCK_R"] * (c.kwargs["BLOCK_S"] + c.kwargs["BLOCK_C"])).kwargs


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for the GPU")
def test_kernels_compile_for_h100():
    """Every kernel lowers to sm_90 code (ptxas included) within H100 shared memory; no GPU needed."""
    from ovss_fast.kernels.triton import class_distributions as cd
    from ovss_fast.kernels.triton import gibbs_kernel as gk
    from ovss_fast.kernels.triton import jbu
    from ovss_fast.kernels.triton import kl_scores as kl
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    floats = {"scale", "nms", "inv_eps", "a", "eps", "tau", "inv_s", "inv_r"}
    ints = {"cy_ptr": "*i32", "cx_ptr": "*i32", "label_ptr": "*i64"}
    scales64 = {"r_ptr": "*fp64", "c_ptr": "*fp64"}  # mv's Sinkhorn-Knopp scale vectors
    cases = [
        (cd._class_distributions_kernel, {"BLOCK_N": 64, "BLOCK_C": 256, "BLOCK_D": 32}, 8, {"x_ptr": "*fp16"}),
        (cd._normalize_columns_kernel, {"BLOCK_N": 16, "BLOCK_C": 256}, 4, {}),
        (gk._cost_range_kernel, {"BLOCK_M": 32, "BLOCK_N": 128}, 4, {"a_ptr": "*bf16"}),
        (gk._gibbs_kernel_kernel, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 128}, 4, {}),
        (kl._column_sums_kernel, {"BLOCK_N": 64, "BLOCK_C": 32}, 4, {}),
        (kl._kl_scores_kernel, {"BLOCK_N": 64, "BLOCK_C": 32}, 4, {}),
        (sk._sinkhorn_scores_kernel, {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32, "PRECISION": "ieee"}, 4,
         {"k_ptr": "*fp16"}),
        (sk._sinkhorn_scores_kernel, {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32, "PRECISION": "tf32x3"}, 4, {}),
        (sk._sinkhorn_step_kernel, {"MODE": 1, "BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 32, "PRECISION": "ieee"},
         4, {}),
        *[(sk._sinkhorn_step_kernel, {"MODE": 0, "PRECISION": "tf32x3", **cfg.kwargs}, cfg.num_warps, {})
          for cfg in sk.TF32X3_STEP_CONFIGS],
        (sk._center_potential_kernel, {"BLOCK_N": 64, "BLOCK_C": 32}, 4, {}),
        (mk._markov_step_kernel, {"VELOCITY": True, "BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 32,
                                  "PRECISION": "ieee"}, 4, {}),
        (mk._markov_step_kernel, {"VELOCITY": False, "PRECISION": "tf32x3", **_largest_step(sk.TF32X3_STEP_CONFIGS)},
         8, {}),
        (mk._markov_finish_kernel, {"VELOCITY": True, "BLOCK_N": 64, "BLOCK_C": 32}, 4, {}),
        (mk._sk_step_kernel, {"KIND": 0, "BLOCK_I": 32, "BLOCK_J": 128}, 4, scales64),
        (mk._sk_step_kernel, {"KIND": 1, "BLOCK_I": 64, "BLOCK_J": 64}, 4, scales64),
        (mk._sk_step_kernel, {"KIND": 2, "BLOCK_I": 64, "BLOCK_J": 64}, 4, scales64),
        (mk._markov_scores_kernel, {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32, "VELOCITY": True,
                                    "PRECISION": "ieee"}, 4, {}),
        # the window schedule: every config, both tiers of N (BLOCK_N 256: one partial sum; 512: two),
        # symmetric and general, ieee and tf32x3
        *[(sk._sinkhorn_window_kernel, {"SYMMETRIC": sym, "PRECISION": prec, "BLOCK_N": bn, **cfg.kwargs},
           cfg.num_warps, {"q_ptr": "*bf16"} if sym else {})
          for prec, cfgs in (("ieee", sk._WINDOW_CONFIGS), ("tf32x3", sk._WINDOW_CONFIGS_TF32X3)) for cfg in cfgs
          for bn, sym in ((256, True), (512, False))],
        *[(mk._markov_window_kernel, {"VELOCITY": vel, "SYMMETRIC": sym, "PRECISION": prec, "BLOCK_N": bn,
                                      **cfg.kwargs}, cfg.num_warps, {})
          for prec, cfgs in (("ieee", sk._WINDOW_CONFIGS), ("tf32x3", sk._WINDOW_CONFIGS_TF32X3)) for cfg in cfgs
          for bn, vel, sym in ((256, True, True), (512, False, False))],
        *[(mk._sk_window_kernel, {"SYMMETRIC": sym, **mk._SK_WINDOW_BLOCKS}, 4, scales64) for sym in (True, False)],
        # the persistent schedule: every config, both tiers of N, symmetric and general, with the grid barrier
        *[(sk._sinkhorn_persistent_kernel, {"SYMMETRIC": sym, "PRECISION": prec, "BLOCK_N": bn, "GRID_SYNC": True,
                                            **cfg.kwargs}, cfg.num_warps, {"bar_ptr": "*i32"})
          for prec, cfgs in (("ieee", sk.PERSISTENT_CONFIGS), ("tf32x3", sk.PERSISTENT_CONFIGS_TF32X3))
          for cfg in cfgs for bn, sym in ((512, True), (256, False))],
        *[(mk._markov_persistent_kernel, {"VELOCITY": vel, "SYMMETRIC": sym, "PRECISION": prec, "BLOCK_N": bn,
                                          "GRID_SYNC": True, **mk.PERSISTENT_SK_BLOCKS, **cfg.kwargs}, cfg.num_warps,
           {"bar_ptr": "*i32", **scales64})
          for prec, cfgs in (("ieee", sk.PERSISTENT_CONFIGS), ("tf32x3", sk.PERSISTENT_CONFIGS_TF32X3))
          for cfg in cfgs for bn, vel, sym in ((512, False, True), (256, True, False))],
        (jbu._jbu_upsample_kernel, {"BLOCK_P": 128, "BLOCK_C": 16}, 4, ints),
        (jbu._jbu_argmax_kernel, {"BLOCK_P": 128, "BLOCK_C": 16}, 4, ints),
    ]
    for kernel, constexprs, warps, pointers in cases:
        compiled = compile_for_sm90(kernel, constexprs, warps, pointers, floats)
        assert compiled.metadata.shared <= 227 * 1024, kernel.__name__
        if constexprs.get("GRID_SYNC"):
            # the grid barrier: one thread per program adds (release) and polls (acquire) at GPU scope
            ptx = compiled.asm["ptx"]
            assert re.search(r"@%p\d+ atom\.global\.gpu\.release\.add\.u32", ptx), kernel.__name__
            assert re.search(r"@%p\d+ ld\.global\.gpu\.acquire\.b32", ptx), kernel.__name__


@needs_triton
def test_autotune_results_kept_on_disk(monkeypatch):
    """Every autotuned kernel keeps its choices in Triton's cache (where this Triton supports it)."""
    import inspect

    import triton

    from ovss_fast.kernels.triton import _runtime, jbu
    from ovss_fast.kernels.triton import class_distributions as cd
    from ovss_fast.kernels.triton import gibbs_kernel as gk
    from ovss_fast.kernels.triton import kl_scores as kl
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this Triton has no cache_results")
    tuners = [v for m in (cd, gk, jbu, kl, mk, sk) for v in vars(m).values() if isinstance(v, triton.runtime.Autotuner)]
    # 19 + the persistent schedule (op, mv) x (ieee, tf32x3) + gibbs_kernel_only's two passes
    assert len(tuners) == 25
    assert all(t.cache_results for t in tuners)
    monkeypatch.setattr(_runtime, "AUTOTUNE_DISK_CACHE", False)  # OVSS_FAST_TRITON_AUTOTUNE_CACHE=0 at import
    tuner = _runtime.autotune(sk._CONFIGS, ["N"])(sk._sinkhorn_scores_kernel)
    _runtime.TUNERS.remove(tuner)
    assert not tuner.cache_results


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles for the GPU")
def test_gibbs_kernel_only_compiles_for_h100():
    """Both symmetric-tile kernels of gibbs_kernel_only, every config, float32 and bfloat16 affinity,
    lower to sm_90 code within H100 shared memory, and ptxas (Triton's own) spills no register."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from ovss_fast.kernels.triton import gibbs_kernel as gk

    ptxas = get_ptxas(90).path
    block_s = triton.next_power_of_2(gk.RANGE_PARTS)
    for cfg in gk.SYM_CONFIGS:
        for kernel, constexprs in ((gk._sym_range_kernel, cfg.kwargs),
                                   (gk._sym_gibbs_kernel, {**cfg.kwargs, "BLOCK_S": block_s})):
            for a_type in ("*fp32", "*bf16"):
                sig = {name: "constexpr" if name in constexprs else (a_type if name == "a_ptr" else "*fp32")
                       if name.endswith("_ptr") else "fp32" if name == "inv_eps" else "i32"
                       for name in kernel.arg_names}
                compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs),
                                          target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": cfg.num_warps, "num_stages": 3})
                what = f"{kernel.__name__} {constexprs} {cfg.num_warps} warps {a_type}"
                assert compiled.metadata.shared <= 227 * 1024, what
                with tempfile.TemporaryDirectory() as tmp:
                    ptx = Path(tmp) / "k.ptx"
                    ptx.write_text(compiled.asm["ptx"])
                    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.o")],
                                         capture_output=True, text=True, check=True)
                spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stdout + out.stderr)
                assert spills and all(int(n) == 0 for n in spills), f"{what}: {out.stdout + out.stderr}"


# --------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("B,N,C", [(2, 1024, 21), (1, 784, 171)])
def test_gpu_scores_real_sizes(B, N, C):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(B, N, 512, generator=g).to(dev)
    text = torch.randn(C, 512, generator=g).to(dev)
    aff = torch.rand(B, N, N, generator=g).to(dev)
    q = ops.class_distributions(feats, text, nms=0.2, backend="triton")
    q_ref = R.class_distributions(feats.double(), text.double(), nms=0.2)
    assert rel_err(q, q_ref) <= TOL
    _, k = ops.gibbs_kernel(aff, backend="triton")
    _, k_ref = R.gibbs_kernel(aff.double())
    assert rel_err(k, k_ref) <= TOL
    qd = q_ref.float()
    for mode, kw in (("op", {}), ("mv", {}), ("kl", {})):
        got = ops.discrepancy(qd, aff, mode=mode, backend="triton", **kw)
        want = ops.discrepancy(qd.double(), aff.double(), mode=mode, backend="reference", **kw)
        assert rel_err(got, want) <= TOL, mode


@pytest.mark.cuda
@needs_triton
def test_gpu_jbu_real_sizes():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    dev = torch.device("cuda")
    scores, guide = _jbu_inputs(2, 21, 28, 28, 448, 448)
    scores, guide = scores.to(dev), guide.to(dev)
    scores[:, 4] = float("-inf")
    up = R.jbu_upsample(scores.double(), guide.double())
    assert rel_err(ops.jbu_upsample(scores, guide, backend="triton"), up) <= TOL
    labels = ops.jbu_argmax(scores, guide, backend="triton")
    want = up.argmax(dim=1)
    close = _top2_gap(up) <= TOL * float(up.masked_fill(torch.isinf(up), 0).abs().amax())
    assert torch.equal(labels[~close], want[~close])


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_gpu_schedules_real_sizes(schedule):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    dev = torch.device("cuda")
    q = _q(2, 1024, 21, dead=(20,)).to(dev)
    _, k = R.gibbs_kernel(torch.rand(2, 1024, 1024, generator=torch.Generator().manual_seed(5)).to(dev).double())
    got = sk.sinkhorn_scores(q.half(), k.float(), eps=0.1, iters=50, schedule=schedule)
    assert rel_err(got, R.sinkhorn_scores(q.half().double(), k, eps=0.1, iters=50)) <= TOL
    for readout in ("integrated", "velocity"):
        got = mk.markov_scores(q, k.float(), readout=readout, schedule=schedule)
        want = R.markov_scores(q.double(), k, readout=readout)
        if readout == "integrated":
            assert rel_err(got, want) <= TOL
        else:
            robust = (_velocity_margin(q, k, 15, 50, 0.3) > 1e-3) & torch.isfinite(want)
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            assert float((got.double() - want)[robust].abs().max()) <= TOL * float(want[robust].abs().max())


def _gpu_scores_inputs(B: int, N: int, C: int, precision: str, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, C] float32 (last class dead) and gibbs_kernel's K float64 on the GPU, with
    for the option ``precision`` (the tests pass it); skips under the interpreter (compiled kernels only)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    dev = torch.device("cuda")
    q = _q(B, N, C, dead=(C - 1,)).to(dev)
    _, k = R.gibbs_kernel(torch.rand(B, N, N, generator=torch.Generator().manual_seed(N)).double().to(dev))
    return q, k


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("B,N,C", [(15, 196, 199), (36, 196, 29), (2, 300, 21)])
def test_gpu_window_schedule_real_sizes(B, N, C, precision, monkeypatch):
    """The window schedule at the pipeline's window batches, symmetric and general, against float64."""
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = _gpu_scores_inputs(B, N, C, precision, monkeypatch)
    opts = TritonOptions(precision=precision)
    want = R.sinkhorn_scores(q.double(), k, eps=0.1, iters=50)
    for symmetric in (True, False):
        got = sk.sinkhorn_scores(q, k.float(), eps=0.1, iters=50, schedule="window", symmetric=symmetric,
                                 options=opts)
        assert rel_err(got, want) <= TOL, symmetric
        got = mk.markov_scores(q, k.float(), schedule="window", symmetric=symmetric,
                                 options=opts)
        assert rel_err(got, R.markov_scores(q.double(), k)) <= TOL, symmetric


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("B,N,C", [(15, 196, 199), (1, 1024, 171), (2, 2304, 21), (1, 4096, 21)])
def test_gpu_persistent_schedule_real_sizes(B, N, C, precision, monkeypatch):
    """The persistent schedule (one launch, grid barriers) at window batches and whole images up to
    N = 4096, against float64; twice in a row (the barrier counters reset themselves), and replayed from
    a CUDA graph as the backend runs it."""
    from ovss_fast.kernels.triton import TRITON_BACKEND
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    q, k = _gpu_scores_inputs(B, N, C, precision, monkeypatch)
    opts = TritonOptions(precision=precision)
    want_op = R.sinkhorn_scores(q.double(), k, eps=0.1, iters=50)
    want_mv = R.markov_scores(q.double(), k)
    for _ in range(2):
        got = sk.sinkhorn_scores(q, k.float(), eps=0.1, iters=50, schedule="persistent", symmetric=True, options=opts)
        assert rel_err(got, want_op) <= TOL
        got = mk.markov_scores(q, k.float(), schedule="persistent", symmetric=True, options=opts)
        assert rel_err(got, want_mv) <= TOL
    if N <= 1024:
        got = sk.sinkhorn_scores(q, k.float(), eps=0.1, iters=50, schedule="persistent", options=opts)
        assert rel_err(got, want_op) <= TOL
    run = {"schedule": "persistent", "precision": precision}
    for _ in range(3):  # eager, then the graph is captured, then replayed
        assert rel_err(TRITON_BACKEND.sinkhorn_scores(q, k.float(), symmetric=True, **run), want_op) <= TOL
        assert rel_err(TRITON_BACKEND.markov_scores(q, k.float(), symmetric=True, **run), want_mv) <= TOL


@pytest.mark.cuda
@needs_triton
def test_gpu_graph_replay_matches_eager(monkeypatch):
    """The CUDA-graph replay of sinkhorn/markov gives the eager numbers on fresh inputs of one shape,
    keeps one graph per signature (captured at its second call), and stays eager while the caller captures."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    from ovss_fast.kernels.triton import TRITON_BACKEND as T
    from ovss_fast.kernels.triton._runtime import GRAPHS

    GRAPHS.clear()
    dev = torch.device("cuda")
    for seed in range(4):  # eager, one capture, then two replays on new inputs
        q = _q(2, 300, 7, dead=(3,), seed=seed).to(dev)
        _, k = R.gibbs_kernel(torch.rand(2, 300, 300, generator=torch.Generator().manual_seed(seed)).double())
        k = k.float().to(dev)
        got_op = T.sinkhorn_scores(q, k, eps=0.1, iters=20)
        got_mv = T.markov_scores(q, k, sk_iters=5, steps=20)
        assert torch.equal(got_op, T.sinkhorn_scores(q, k, eps=0.1, iters=20, graphs=False))
        assert torch.equal(got_mv, T.markov_scores(q, k, sk_iters=5, steps=20, graphs=False))
        assert rel_err(got_op, R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=20)) <= TOL
    assert len(GRAPHS) == 2
    T.sinkhorn_scores(q, k, eps=0.1, iters=21)  # another signature: eager, then another graph
    assert len(GRAPHS) == 2
    T.sinkhorn_scores(q, k, eps=0.1, iters=21)
    assert len(GRAPHS) == 3
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # another stream: its own graph and static buffers
        for _ in range(2):
            assert torch.equal(T.sinkhorn_scores(q, k, eps=0.1, iters=20), got_op)
    torch.cuda.current_stream().wait_stream(side)
    assert len(GRAPHS) == 4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = T.sinkhorn_scores(q, k, eps=0.1, iters=20)
    g.replay()
    assert torch.equal(captured, got_op)
    GRAPHS.clear()


@pytest.mark.cuda
@needs_triton
def test_gpu_jbu_argmax_2048():
    """2048 x 2048 px is 65536 pixel blocks of 64: more than a grid's second axis holds."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled kernels only")
    scores, guide = _jbu_inputs(1, 5, 32, 32, 2048, 2048)
    scores, guide = scores.cuda(), guide.cuda()
    labels = ops.jbu_argmax(scores, guide, backend="triton")
    up = R.jbu_upsample(scores.double(), guide.double())
    close = _top2_gap(up) <= TOL * float(up.abs().amax())
    assert torch.equal(labels[~close], up.argmax(dim=1)[~close])
