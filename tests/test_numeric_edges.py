"""Numeric edge cases in every backend (float32) against the float64 reference (issue 14).

- class_distributions with feature / text norms near 1e30 or 1e-30 (each vector is divided by
  its max |entry| before the sum of squares; cos is scale-invariant);
- gibbs_kernel with an affinity near the float32 maximum (Sym = A/2 + A^T/2 never overflows), and a
  batch whose images' affinities differ by 1e20 in scale (the cost divides Sym by its per-image max:
  each image gets the kernel and the op / mv scores of its unit-scale affinity, and of itself alone);
- jbu_upsample with a tiny sigma_range (the tap exponents are taken relative to the
  pixel's largest one as a difference of squares, so float32 does not cancel).

The reference (float32), cpu (compiled extension) and cuda backends run here; the Triton
kernels run in ONE child pytest with TRITON_INTERPRET=1 (the pattern of tests/test_triton.py;
the variable must not leak into this process).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from ovss_fast.kernels import reference as R
from ovss_fast.ops import api as ops

CHILD = os.environ.get("OVSS_FAST_NUMERIC_CHILD") == "1"
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _has_ext() -> bool:
    try:
        from ovss_fast.kernels import extension as _ext_backend

        return bool(_ext_backend.available()) if hasattr(_ext_backend, "available") else True
    except Exception:
        return False


def _backends() -> list:
    if CHILD:
        return ["triton"]
    no_ext = importlib.util.find_spec("ovss_fast.kernels._C") is None
    out = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(no_ext, reason="compiled extension not built"))]
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")))
    return out


BACKENDS = _backends()


def _call(op: str, backend: str, *args, **kw):
    if backend == "triton":
        from ovss_fast.kernels.triton import TRITON_BACKEND

        return getattr(TRITON_BACKEND, op)(*args, **kw)
    if backend == "cuda":
        args = tuple(a.cuda() for a in args)
    return getattr(ops, op)(*args, backend=backend, **kw)


# --------------------------------------------------------------------------- class_distributions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feat_scale, text_scale", [(1e30, 1.0), (1e-30, 1.0), (1.0, 1e30), (1.0, 1e-30),
                                                     (1e-30, 1e30)])
def test_class_distributions_scale_free(backend, feat_scale, text_scale):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 19, 24, generator=g)
    text = torch.randn(5, 24, generator=g)
    feats[1, 3] = 0  # a zero vector still gets cosine 0
    want = R.class_distributions(feats.double(), text.double(), scale=30.0)  # cos does not see the scale
    got = _call("class_distributions", backend, feats * feat_scale, text * text_scale, scale=30.0)
    assert bool(torch.isfinite(got).all())
    assert rel_err(got.cpu(), want) <= TOL


# --------------------------------------------------------------------------- gibbs_kernel
@pytest.mark.parametrize("backend", BACKENDS)
def test_gibbs_kernel_near_float32_max(backend):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 17, 17, generator=g) * 3.0e38  # (A + A^T) would overflow to inf
    cost_ref, kern_ref = R.gibbs_kernel(a.double(), eps=0.1)
    cost, kern = _call("gibbs_kernel", backend, a, eps=0.1)
    assert bool(torch.isfinite(cost).all()) and bool(torch.isfinite(kern).all())
    assert rel_err(cost.cpu(), cost_ref) <= TOL and rel_err(kern.cpu(), kern_ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_gibbs_kernel_and_scores_are_scale_free(backend):
    g = torch.Generator().manual_seed(3)
    unit = torch.softmax(4 * torch.randn(2, 13, 13, generator=g), dim=-1)  # float32, attention-like
    batch = unit * torch.tensor([1e-10, 1e10])[:, None, None]  # images 1e20 apart in scale
    q = R.class_distributions(torch.randn(2, 13, 6, generator=g), torch.randn(3, 6, generator=g), scale=20.0)
    cost_ref, kern_ref = R.gibbs_kernel(unit.double(), eps=0.1)
    cost, kern = _call("gibbs_kernel", backend, batch, eps=0.1)
    for b in range(2):
        assert rel_err(cost[b].cpu(), cost_ref[b]) <= TOL and rel_err(kern[b].cpu(), kern_ref[b]) <= TOL
        alone = _call("gibbs_kernel", backend, batch[b:b + 1], eps=0.1)[1]
        assert rel_err(alone[0].cpu(), kern[b].cpu().double()) <= 1e-6
    dev = "cuda" if backend == "cuda" else "cpu"
    for kw in (dict(mode="op"), dict(mode="mv"), dict(mode="mv", transition="attention"),
               dict(mode="mv", transition="attention", readout="velocity", tau=0.05)):
        want = ops.discrepancy(q.double(), unit.double(), backend="reference", **kw)
        got = ops.discrepancy(q.to(dev), batch.to(dev), backend=backend, **kw).cpu()
        for b in range(2):
            assert rel_err(got[b], want[b]) <= TOL, (kw, b)
            alone = ops.discrepancy(q[b:b + 1].to(dev), batch[b:b + 1].to(dev), backend=backend, **kw).cpu()
            assert rel_err(alone[0], got[b].double()) <= TOL, (kw, b)


@pytest.mark.skipif(CHILD, reason="public API, not a kernel")
def test_segment_features_without_guide_near_float32_max():
    g = torch.Generator().manual_seed(2)
    feats, text = torch.randn(1, 16, 8, generator=g), torch.randn(3, 8, generator=g)
    a = torch.rand(1, 16, 16, generator=g)
    want = ops.segment_features(feats, text, a, mode="mv", backend="reference")
    for mode in ("op", "mv"):
        got = ops.segment_features(feats, text, a * 3.0e38, mode=mode, backend="reference")
        assert torch.equal(got, ops.segment_features(feats, text, a, mode=mode, backend="reference"))
    assert want.shape == (1, 4, 4)


# --------------------------------------------------------------------------- jbu
def _jbu_inputs(seed: int = 0, kind: str = "rand"):
    """Scores [1, 4, 8, 8] and a guide [1, 3, 32, 32]: uniform noise, or a smooth ramp (many taps
    at similar colour distances, where the float32 cancellation of large exponents showed)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, 4, 8, 8, generator=g)
    if kind == "rand":
        return scores, torch.rand(1, 3, 32, 32, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    guide = torch.stack([yy, xx, 0.5 * (yy + xx)])[None] * 0.5 + 0.25 + 0.01 * torch.rand(1, 3, 32, 32, generator=g)
    return scores, guide


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed, kind, sigma_range", [(0, "smooth", 1e-3), (2, "smooth", 1e-3), (0, "rand", 3e-3)]
                         + ([] if CHILD else [(0, "rand", 1e-3), (0, "smooth", 0.1)]))  # the interpreter is slow
def test_jbu_tiny_sigma_range(backend, seed, kind, sigma_range):
    scores, guide = _jbu_inputs(seed, kind)
    kw = dict(sigma_spatial=1.0, sigma_range=sigma_range, radius=2)
    want = R.jbu_upsample(scores.double(), guide.double(), **kw)
    got = _call("jbu_upsample", backend, scores, guide, **kw)
    assert rel_err(got.cpu(), want) <= TOL
    labels = _call("jbu_argmax", backend, scores, guide, **kw).cpu()
    top = want.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-3 * want.abs().amax()
    assert torch.equal(labels[clear], want.argmax(dim=1)[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_jbu_tiny_sigma_spatial(backend):
    scores, guide = _jbu_inputs(4, "smooth")
    kw = dict(sigma_spatial=2e-2, sigma_range=0.1, radius=2)
    want = R.jbu_upsample(scores.double(), guide.double(), **kw)
    assert rel_err(_call("jbu_upsample", backend, scores, guide, **kw).cpu(), want) <= TOL


# --------------------------------------------------------------------------- the Triton child
@pytest.mark.skipif(CHILD, reason="the child itself")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OVSS_FAST_NUMERIC_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
                           "-k", "triton"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-5000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
