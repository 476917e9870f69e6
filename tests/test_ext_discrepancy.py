"""The compiled sinkhorn_scores (mode "op") and markov_scores (mode "mv") ops against the float64 reference.

Covers the CPU kernels through ``ovss_fast.discrepancy(backend="cpu")`` and through
``torch.ops.ovss_fast.*`` directly, the CUDA kernels (marked ``cuda``, skipped without a
GPU), ``torch.library.opcheck``, and the C++ argument checks.

Tolerances (method.md section 5): float32 scores rel. error <= 1e-4 against the float64
reference (``rel_err`` from conftest: max |a - e| / max |e|, -inf entries must coincide).
Half inputs are computed in float32: they are compared with the float64 reference run
on the same (rounded) values, at the float32 tolerance. The velocity readout is an
integer step count: float32 may settle one step earlier or later where the float64
chain's change sits within 1e-4 of tau, and only there.

The module is skipped when ovss_fast.kernels._C cannot be imported, unless
OVSS_FAST_REQUIRE_EXT=1 (then it fails).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import rel_err, velocity_borderline, velocity_lstar

from ovss_fast.kernels import reference as R
from ovss_fast.ops import api as ops

try:
    import ovss_fast.kernels._C  # noqa: F401

    from ovss_fast.kernels.extension import CPU_BACKEND, CUDA_BACKEND
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("OVSS_FAST_REQUIRE_EXT") == "1":
        raise
    pytest.skip(f"ovss_fast.kernels._C is not built: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
TOL32 = 1e-4


# --------------------------------------------------------------------------- inputs
def _gen(*key: object) -> torch.Generator:
    """A fresh, reproducible generator per case (seeded by the case's parameters)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_q(B: int, N: int, C: int, *, gen: torch.Generator, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """[B, N, C] float64: each class a distribution over patches (peaked), ``dead`` columns all zero."""
    q = torch.rand(B, N, C, generator=gen, dtype=torch.float64) ** 4
    for c in dead:
        q[:, :, c] = 0.0
    s = q.sum(dim=1, keepdim=True)
    return torch.where(s > 0, q / s.clamp_min(1e-300), torch.zeros_like(q))


def make_affinity(B: int, N: int, *, gen: torch.Generator) -> torch.Tensor:
    """[B, N, N] float64, non-negative, with some block structure so the chain has something to find."""
    labels = torch.randint(0, 4, (B, N), generator=gen)
    same = (labels[:, :, None] == labels[:, None, :]).double()
    return (0.6 * same + 0.4 * torch.rand(B, N, N, generator=gen, dtype=torch.float64)) ** 2


def make_kernel(B: int, N: int, *, gen: torch.Generator, eps: float = 0.1) -> torch.Tensor:
    return R.gibbs_kernel(make_affinity(B, N, gen=gen), eps=eps)[1]


def assert_scores_close(out: torch.Tensor, ref: torch.Tensor, *, tol: float = TOL32, allow: torch.Tensor | None = None):
    """rel_err(out, ref) <= tol, ignoring the entries in ``allow`` (velocity borderline)."""
    if allow is not None and bool(allow.any()):
        out = torch.where(allow, ref.to(out.dtype), out)
    err = rel_err(out, ref)
    assert err <= tol, f"rel. error {err:.3g} > {tol:g}"


def markov_check(out: torch.Tensor, q: torch.Tensor, kernel: torch.Tensor, *, sk_iters: int = 15, steps: int = 50,
                 readout: str = "integrated", tau: float = 0.3, tol: float = TOL32) -> None:
    ref = R.markov_scores(q.double(), kernel.double(), sk_iters=sk_iters, steps=steps, readout=readout, tau=tau)
    allow = None
    if readout == "velocity" and out.dtype != torch.float64:
        allow = velocity_borderline(q, kernel, sk_iters=sk_iters, steps=steps, tau=tau)
        # mismatching lstar anywhere else is a bug
        lstar_out = velocity_lstar(out.cpu(), q.cpu())
        lstar_ref = velocity_lstar(ref.cpu(), q.cpu())
        fin = torch.isfinite(ref)
        bad = fin & (lstar_out.double() != lstar_ref) & ~allow
        assert not bool(bad.any()), f"{int(bad.sum())} lstar values differ away from the tau threshold"
    assert_scores_close(out.cpu(), ref.cpu(), tol=tol, allow=None if allow is None else allow.cpu())


SHAPES = [(1, 37, 1), (2, 50, 5), (2, 64, 21), (1, 100, 3)]


# --------------------------------------------------------------------------- CPU: public API, backend="cpu"
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discrepancy_op_cpu_backend(shape, dtype):
    B, N, C = shape
    g = _gen("op-api", shape, dtype)
    q, aff = make_q(B, N, C, gen=g), make_affinity(B, N, gen=g)
    out = ops.discrepancy(q.to(dtype), aff.to(dtype), mode="op", backend="cpu")
    ref = ops.discrepancy(q, aff, mode="op", backend="reference")
    assert out.dtype == dtype and out.shape == (B, N, C)
    assert_scores_close(out, ref, tol=1e-10 if dtype == torch.float64 else TOL32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
def test_discrepancy_mv_cpu_backend(shape, dtype, readout):
    B, N, C = shape
    g = _gen("mv-api", shape, dtype, readout)
    q, aff = make_q(B, N, C, gen=g), make_affinity(B, N, gen=g)
    out = ops.discrepancy(q.to(dtype), aff.to(dtype), mode="mv", readout=readout, backend="cpu",
                          transition="gibbs", eps=0.1, tau=0.3, steps=50)
    assert out.dtype == dtype and out.shape == (B, N, C)
    _, kernel = R.gibbs_kernel(aff, eps=0.1)
    markov_check(out, q, kernel, readout=readout, tol=1e-10 if dtype == torch.float64 else TOL32)


def test_auto_picks_the_cpu_backend_for_cpu_tensors():
    from ovss_fast.kernels.dispatch import select

    g = _gen("auto")
    q, aff = make_q(1, 20, 3, gen=g), make_affinity(1, 20, gen=g)
    assert select("sinkhorn_scores", "auto", (q, aff), {"eps": 0.1, "iters": 5}) is CPU_BACKEND
    assert select("markov_scores", "auto", (q, aff), {"sk_iters": 1, "steps": 1}) is CPU_BACKEND


# --------------------------------------------------------------------------- CPU: the ops directly
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [0, 1, 7, 50])
def test_sinkhorn_op_direct(shape, iters):
    B, N, C = shape
    g = _gen("sk", shape, iters)
    q, k = make_q(B, N, C, gen=g), make_kernel(B, N, gen=g)
    out = torch.ops.ovss_fast.sinkhorn_scores(q.float(), k.float(), 0.1, iters)
    ref = R.sinkhorn_scores(q, k, eps=0.1, iters=iters)
    assert_scores_close(out, ref)
    out64 = torch.ops.ovss_fast.sinkhorn_scores(q, k, 0.1, iters)
    assert_scores_close(out64, ref, tol=1e-10)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_sinkhorn_eps(eps):
    g = _gen("sk-eps", eps)
    q, k = make_q(2, 45, 4, gen=g), make_kernel(2, 45, gen=g, eps=eps)
    out = torch.ops.ovss_fast.sinkhorn_scores(q.float(), k.float(), eps, 30)
    assert_scores_close(out, R.sinkhorn_scores(q, k, eps=eps, iters=30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
@pytest.mark.parametrize(("sk_iters", "steps"), [(15, 50), (0, 1), (1, 1), (3, 7), (0, 4)])
def test_markov_op_direct(shape, readout, sk_iters, steps):
    B, N, C = shape
    g = _gen("mv", shape, readout, sk_iters, steps)
    q, k = make_q(B, N, C, gen=g), make_kernel(B, N, gen=g)
    out = torch.ops.ovss_fast.markov_scores(q.float(), k.float(), sk_iters, steps, readout, 0.3)
    markov_check(out, q, k, sk_iters=sk_iters, steps=steps, readout=readout)
    out64 = torch.ops.ovss_fast.markov_scores(q, k, sk_iters, steps, readout, 0.3)
    markov_check(out64, q, k, sk_iters=sk_iters, steps=steps, readout=readout, tol=1e-10)


@pytest.mark.parametrize("tau", [0.01, 0.3, 2.0])
def test_markov_velocity_tau(tau):
    g = _gen("tau", tau)
    q, k = make_q(2, 40, 6, gen=g), make_kernel(2, 40, gen=g)
    out = torch.ops.ovss_fast.markov_scores(q.float(), k.float(), 15, 30, "velocity", tau)
    markov_check(out, q, k, steps=30, readout="velocity", tau=tau)


def test_dead_classes_are_minus_inf():
    g = _gen("dead")
    q, aff = make_q(2, 37, 6, gen=g, dead=(0, 4)), make_affinity(2, 37, gen=g)
    k = R.gibbs_kernel(aff, eps=0.1)[1]
    for out in (
        torch.ops.ovss_fast.sinkhorn_scores(q.float(), k.float(), 0.1, 20),
        torch.ops.ovss_fast.markov_scores(q.float(), k.float(), 15, 20, "integrated", 0.3),
        torch.ops.ovss_fast.markov_scores(q.float(), k.float(), 15, 20, "velocity", 0.3),
    ):
        assert torch.isneginf(out[:, :, [0, 4]]).all()
        assert torch.isfinite(out[:, :, [1, 2, 3, 5]]).all()
    assert_scores_close(torch.ops.ovss_fast.sinkhorn_scores(q.float(), k.float(), 0.1, 20),
                        R.sinkhorn_scores(q, k, eps=0.1, iters=20))
    markov_check(torch.ops.ovss_fast.markov_scores(q.float(), k.float(), 15, 20, "integrated", 0.3), q, k, steps=20)


def test_dead_classes_from_nms_through_the_api():
    g = _gen("nms")
    text = torch.randn(8, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (1, 49), generator=g)  # class 7 owns no patch: NMS empties it
    feats = text[labels] + 0.05 * torch.randn(1, 49, 12, generator=g, dtype=torch.float64)
    q = R.class_distributions(feats, text, scale=100.0, nms=0.9)
    assert bool(R.dead_classes(q).any()), "the case needs a dead class"
    aff = make_affinity(1, 49, gen=g)
    for mode in ("op", "mv"):
        out = ops.discrepancy(q.float(), aff.float(), mode=mode, backend="cpu")
        ref = ops.discrepancy(q, aff, mode=mode, backend="reference")
        assert_scores_close(out, ref)


def test_non_contiguous_inputs():
    g = _gen("strided")
    B, N, C = 2, 50, 5
    q = make_q(B, N, C, gen=g).float().transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, C] with C-major strides
    k = make_kernel(B, N, gen=g).float().transpose(1, 2)  # K^T as a view
    wide = make_q(B, N, 2 * C, gen=g).float()[:, :, ::2]  # a strided slice (columns still sum to <= 1)
    assert not q.is_contiguous() and not k.is_contiguous() and not wide.is_contiguous()
    assert_scores_close(torch.ops.ovss_fast.sinkhorn_scores(q, k, 0.1, 25),
                        R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=25))
    for readout in ("integrated", "velocity"):
        markov_check(torch.ops.ovss_fast.markov_scores(q, k, 15, 25, readout, 0.3), q, k, steps=25, readout=readout)
        markov_check(torch.ops.ovss_fast.markov_scores(wide, k, 15, 25, readout, 0.3), wide, k, steps=25,
                     readout=readout)
    assert_scores_close(torch.ops.ovss_fast.sinkhorn_scores(wide, k, 0.1, 25),
                        R.sinkhorn_scores(wide.double(), k.double(), eps=0.1, iters=25))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    g = _gen("half", dtype)
    q, k = make_q(2, 40, 4, gen=g).to(dtype), make_kernel(2, 40, gen=g).to(dtype)
    out = torch.ops.ovss_fast.sinkhorn_scores(q, k, 0.1, 30)
    assert out.dtype == torch.float32
    assert_scores_close(out, R.sinkhorn_scores(q.double(), k.double(), eps=0.1, iters=30))
    for readout in ("integrated", "velocity"):
        out = torch.ops.ovss_fast.markov_scores(q, k, 15, 30, readout, 0.3)
        assert out.dtype == torch.float32
        markov_check(out, q, k, steps=30, readout=readout)
    # through the API, against the unrounded float64 inputs, at the half-precision tolerance
    q64, aff64 = make_q(1, 36, 3, gen=g), make_affinity(1, 36, gen=g)
    for mode in ("op", "mv"):
        api = ops.discrepancy(q64.to(dtype), aff64.to(dtype), mode=mode, backend="cpu")
        assert api.dtype == torch.float32
        if dtype == torch.float16:  # bfloat16's 8-bit mantissa alone moves the answer by ~1e-2
            assert_scores_close(api, ops.discrepancy(q64, aff64, mode=mode, backend="reference"), tol=1e-2)


def test_mixed_dtypes_compute_in_float64():
    g = _gen("mixed")
    q, k = make_q(1, 30, 3, gen=g), make_kernel(1, 30, gen=g)
    out = torch.ops.ovss_fast.sinkhorn_scores(q.float(), k, 0.1, 10)
    assert out.dtype == torch.float64
    assert_scores_close(out, R.sinkhorn_scores(q.float().double(), k, eps=0.1, iters=10), tol=1e-10)
    out = torch.ops.ovss_fast.markov_scores(q, k.float(), 5, 10, "integrated", 0.3)
    assert out.dtype == torch.float64
    assert_scores_close(out, R.markov_scores(q, k.float().double(), sk_iters=5, steps=10), tol=1e-10)


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_empty_inputs(shape):
    B, N, C = shape
    q = torch.zeros(B, N, C)
    k = torch.zeros(B, N, N)
    assert torch.ops.ovss_fast.sinkhorn_scores(q, k, 0.1, 5).shape == shape
    assert torch.ops.ovss_fast.markov_scores(q, k, 5, 5, "velocity", 0.3).shape == shape


def test_results_are_deterministic():
    g = _gen("det")
    q, k = make_q(2, 64, 9, gen=g).float(), make_kernel(2, 64, gen=g).float()
    a = torch.ops.ovss_fast.markov_scores(q, k, 15, 20, "integrated", 0.3)
    b = torch.ops.ovss_fast.markov_scores(q, k, 15, 20, "integrated", 0.3)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_sinkhorn(dtype):
    g = _gen("opcheck-sk", dtype)
    q, k = make_q(2, 21, 3, gen=g).to(dtype), make_kernel(2, 21, gen=g).to(dtype)
    torch.library.opcheck(torch.ops.ovss_fast.sinkhorn_scores.default, (q, k, 0.1, 5))


@pytest.mark.parametrize("readout", ["integrated", "velocity"])
def test_opcheck_markov(readout):
    g = _gen("opcheck-mv", readout)
    q, k = make_q(2, 21, 3, gen=g).float(), make_kernel(2, 21, gen=g).float()
    torch.library.opcheck(torch.ops.ovss_fast.markov_scores.default, (q, k, 4, 6, readout, 0.3))


# --------------------------------------------------------------------------- argument checks (from C++)
def _good(device: str = "cpu"):
    g = _gen("good")
    return make_q(2, 10, 3, gen=g).float().to(device), make_kernel(2, 10, gen=g).float().to(device)


def _sk(q, k, eps=0.1, iters=3):
    return torch.ops.ovss_fast.sinkhorn_scores(q, k, eps, iters)


def _mv(q, k, sk_iters=3, steps=3, readout="integrated", tau=0.3):
    return torch.ops.ovss_fast.markov_scores(q, k, sk_iters, steps, readout, tau)


@pytest.mark.parametrize("op", [_sk, _mv])
def test_bad_shapes_name_the_argument(op):
    q, k = _good()
    with pytest.raises(RuntimeError, match=r"q should be a 3D tensor \[B, N, C\], got 2D with shape \[10, 3\]"):
        op(q[0], k)
    with pytest.raises(RuntimeError, match=r"kernel should be a 3D tensor \[B, N, N\], got 2D"):
        op(q, k[0])
    with pytest.raises(RuntimeError, match=r"kernel should be square \[B, N, N\], got shape \[2, 10, 9\]"):
        op(q, k[:, :, :9])
    with pytest.raises(RuntimeError, match=r"N of q \(9\) does not match N of kernel \(10\)"):
        op(q[:, :9], k)
    with pytest.raises(RuntimeError, match=r"batch size of q \(1\) and kernel \(2\) differ"):
        op(q[:1], k)
    with pytest.raises(RuntimeError, match=r"q has unsupported dtype"):
        op(q.to(torch.int32), k)
    with pytest.raises(RuntimeError, match=r"kernel has unsupported dtype"):
        op(q, k.to(torch.int64))


def test_bad_parameters_name_the_argument():
    q, k = _good()
    with pytest.raises(RuntimeError, match=r"readout must be 'integrated' or 'velocity', got 'fastest'"):
        _mv(q, k, readout="fastest")
    with pytest.raises(RuntimeError, match=r"readout must be"):
        _mv(q[:, :0], k[:, :0, :0], readout="")  # checked before the empty-input shortcut
    with pytest.raises(RuntimeError, match=r"steps must be >= 1, got 0"):
        _mv(q, k, steps=0)
    with pytest.raises(RuntimeError, match=r"sk_iters must be >= 0, got -1"):
        _mv(q, k, sk_iters=-1)
    with pytest.raises(RuntimeError, match=r"tau must be a number"):
        _mv(q, k, tau=float("nan"))
    with pytest.raises(RuntimeError, match=r"iters must be >= 0, got -2"):
        _sk(q, k, iters=-2)
    with pytest.raises(RuntimeError, match=r"eps must be a positive finite number, got 0"):
        _sk(q, k, eps=0.0)
    with pytest.raises(RuntimeError, match=r"eps must be a positive finite number, got inf"):
        _sk(q, k, eps=float("inf"))


def test_public_api_rejects_bad_readout_before_the_backend():
    q, k = _good()
    with pytest.raises(ValueError, match="readout"):
        ops.discrepancy(q, k, mode="mv", readout="fastest", backend="cpu")


# --------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(1, 37, 1), (2, 50, 5), (2, 257, 21), (1, 1024, 171), (2, 784, 9)]


@pytest.fixture(params=["coop", "tile"])
def schedule(request, monkeypatch):
    """Both CUDA schedules (csrc/cuda/discrepancy_coop.cuh): grid-synchronised tiles, and a block per class tile."""
    monkeypatch.setenv("OVSS_FAST_CUDA_DISCREPANCY", request.param)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_sinkhorn(shape, dtype, schedule):
    B, N, C = shape
    g = _gen("cuda-sk", shape, dtype)
    q, k = make_q(B, N, C, gen=g, dead=(0,) if C > 2 else ()), make_kernel(B, N, gen=g)
    out = torch.ops.ovss_fast.sinkhorn_scores(q.to("cuda", dtype), k.to("cuda", dtype), 0.1, 50)
    assert out.is_cuda and out.dtype == dtype
    assert_scores_close(out.cpu(), R.sinkhorn_scores(q, k, eps=0.1, iters=50),
                        tol=1e-10 if dtype == torch.float64 else TOL32)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
def test_cuda_markov(shape, dtype, readout, schedule):
    B, N, C = shape
    g = _gen("cuda-mv", shape, dtype, readout)
    q, k = make_q(B, N, C, gen=g, dead=(0,) if C > 2 else ()), make_kernel(B, N, gen=g)
    out = torch.ops.ovss_fast.markov_scores(q.to("cuda", dtype), k.to("cuda", dtype), 15, 50, readout, 0.3)
    assert out.is_cuda and out.dtype == dtype
    markov_check(out.cpu(), q, k, readout=readout, tol=1e-10 if dtype == torch.float64 else TOL32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_large_n_global_scratch_path(dtype, schedule):
    # N = 4096 in float64 does not fit shared memory: the kernels take their global-scratch path
    g = _gen("cuda-big", dtype)
    B, N, C = 1, 4096, 6
    q, k = make_q(B, N, C, gen=g), make_kernel(B, N, gen=g)
    out = torch.ops.ovss_fast.sinkhorn_scores(q.to("cuda", dtype), k.to("cuda", dtype), 0.1, 10)
    assert_scores_close(out.cpu(), R.sinkhorn_scores(q, k, eps=0.1, iters=10),
                        tol=1e-10 if dtype == torch.float64 else TOL32)
    out = torch.ops.ovss_fast.markov_scores(q.to("cuda", dtype), k.to("cuda", dtype), 5, 10, "integrated", 0.3)
    markov_check(out.cpu(), q, k, sk_iters=5, steps=10, tol=1e-10 if dtype == torch.float64 else TOL32)


@pytest.mark.cuda
def test_cuda_edge_iterations_half_and_strides(schedule):
    g = _gen("cuda-edge")
    q, k = make_q(2, 50, 5, gen=g, dead=(3,)), make_kernel(2, 50, gen=g)
    qc, kc = q.cuda(), k.cuda()
    for iters in (0, 1):
        assert_scores_close(torch.ops.ovss_fast.sinkhorn_scores(qc.float(), kc.float(), 0.1, iters).cpu(),
                            R.sinkhorn_scores(q, k, eps=0.1, iters=iters))
    for sk_iters, steps in ((0, 1), (0, 4), (1, 1)):
        for readout in ("integrated", "velocity"):
            out = torch.ops.ovss_fast.markov_scores(qc.float(), kc.float(), sk_iters, steps, readout, 0.3)
            markov_check(out.cpu(), q, k, sk_iters=sk_iters, steps=steps, readout=readout)
    qh, kh = qc.half(), kc.half()
    out = torch.ops.ovss_fast.sinkhorn_scores(qh, kh, 0.1, 20)
    assert out.dtype == torch.float32
    assert_scores_close(out.cpu(), R.sinkhorn_scores(qh.double().cpu(), kh.double().cpu(), eps=0.1, iters=20))
    qt, kt = qc.float().transpose(1, 2).contiguous().transpose(1, 2), kc.float().transpose(1, 2)
    markov_check(torch.ops.ovss_fast.markov_scores(qt, kt, 15, 20, "velocity", 0.3).cpu(), q, k.transpose(1, 2),
                 steps=20, readout="velocity")


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream(schedule):
    g = _gen("cuda-stream")
    q, k = make_q(2, 300, 7, gen=g), make_kernel(2, 300, gen=g)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        qc, kc = q.float().cuda(), k.float().cuda()
        out = torch.ops.ovss_fast.markov_scores(qc, kc, 15, 50, "integrated", 0.3)
        out2 = torch.ops.ovss_fast.sinkhorn_scores(qc, kc, 0.1, 50)
    stream.synchronize()
    markov_check(out.cpu(), q, k)
    assert_scores_close(out2.cpu(), R.sinkhorn_scores(q, k, eps=0.1, iters=50))


@pytest.mark.cuda
def test_cuda_api_and_opcheck():
    g = _gen("cuda-api")
    q, aff = make_q(2, 64, 5, gen=g), make_affinity(2, 64, gen=g)
    for mode in ("op", "mv"):
        out = ops.discrepancy(q.float().cuda(), aff.float().cuda(), mode=mode, backend="cuda")
        ref = ops.discrepancy(q, aff, mode=mode, backend="reference")
        assert_scores_close(out.cpu(), ref)
    k = R.gibbs_kernel(aff, eps=0.1)[1].float().cuda()
    torch.library.opcheck(torch.ops.ovss_fast.sinkhorn_scores.default, (q.float().cuda(), k, 0.1, 5))
    torch.library.opcheck(torch.ops.ovss_fast.markov_scores.default, (q.float().cuda(), k, 4, 6, "velocity", 0.3))
    assert not CUDA_BACKEND.unsupported_reasons("markov_scores", (q.cuda(), k), {})


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    q, k = _good()
    with pytest.raises(RuntimeError, match="q on cuda"):
        _sk(q.cuda(), k)


# --------------------------------------------------------------------------- the GPU check script, CPU path
def test_gpu_check_runs_on_cpu(tmp_path):
    """bench/gpu_check.py --device cpu: its correctness part against the CPU backend, small sizes,
    in a process where open_clip cannot be imported (the GPU machine has none)."""
    code = ("import sys; sys.modules['open_clip'] = None; from bench.gpu_check import main; "
            f"sys.exit(main(['--device', 'cpu', '--quick', '--no-write', '--results-dir', {str(tmp_path)!r}]))")
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "sinkhorn_scores" in log and "markov_scores" in log and "PASS" in log
    assert "FAIL" not in log


def test_gpu_check_reports_unloadable_backends_as_failures(monkeypatch):
    sys.path.insert(0, str(ROOT))
    try:
        from bench import gpu_check
    finally:
        sys.path.remove(str(ROOT))
    from ovss_fast.kernels.dispatch import UnavailableBackend

    monkeypatch.setattr(gpu_check, "get_backend", lambda name: UnavailableBackend(name, f"{name} failed to load"))
    rows, ok = gpu_check.run_correctness("cpu", ["triton"], quick=True)
    assert not ok
    assert rows and all(r[3] == "FAIL" and "failed to load" in r[4] for r in rows)
    # and a wrong answer is a failure too
    class Wrong:
        name = "wrong"

        def unsupported_reasons(self, op, tensors, params):
            return []

        def __getattr__(self, op):
            def run(*args, **kwargs):
                out = getattr(R, op)(*args, **kwargs)
                return tuple(o * 1.01 for o in out) if isinstance(out, tuple) else out * 1.01
            return run

    monkeypatch.setattr(gpu_check, "get_backend", lambda name: Wrong())
    rows, ok = gpu_check.run_correctness("cpu", ["wrong"], quick=True)
    assert not ok
    assert any(r[1] == "sinkhorn_scores" and r[3] == "FAIL" for r in rows)
