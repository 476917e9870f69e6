"""Spec v2 (method.md, December 2026) in every backend, through the public ops, against the float64 reference.

- class_distributions ``nms_axis="classes" | "patches"`` (section 1);
- ``discrepancy(mode="mv", transition="gibbs" | "attention")``: K or W = Sym / M made doubly
  stochastic (section 3), with both readouts; the velocity readout S = lstar + f0 / (1 + f0);
- the scale-free cost (section 2) is in tests/test_numeric_edges.py (it runs the Triton kernels
  under the interpreter too); D = 0 errors in tests/test_clear_errors.py and tests/test_ext.py.

Backends: reference and cpu here; cuda and triton where a GPU is (skipped otherwise, with the
backend's reasons). Fresh random inputs per case, awkward shapes (N not a multiple of any block,
C = 1, B > 1), non-contiguous inputs and dead classes. Tolerances (section 5): float32 rel. error
<= 1e-4 against float64 (``rel_err`` from conftest); the velocity readout may settle a step apart
only where the float64 chain's change lies within 1e-4 of tau.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import rel_err, velocity_borderline, velocity_lstar

from ovss_fast.kernels import dispatch as _backends
from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import Backend, get_backend
from ovss_fast.ops import api as ops

BACKENDS = ("reference", "cpu", "cuda", "triton")
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _on(backend: str, op: str, *tensors: torch.Tensor, params: dict | None = None) -> tuple[torch.Tensor, ...]:
    """The tensors on the backend's device; skips the test (with the backend's reasons) where it cannot run."""
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {backend!r} needs CUDA tensors; CUDA is not available")
    moved = tuple(t.to(device) for t in tensors)
    reasons = get_backend(backend).unsupported_reasons(op, moved, params or {})
    if reasons:
        pytest.skip("; ".join(reasons))
    return moved


def _features(B: int, N: int, D: int, C: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 features near one of the classes each (so NMS has something to cut) and the class embeddings."""
    text = torch.randn(C, D, generator=gen, dtype=torch.float64)
    owner = torch.randint(0, C, (B, N), generator=gen)
    feats = 0.5 * text[owner] + torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    return feats, text


def _affinity(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """[B, N, N] float64 attention-like affinity: a few groups, row-softmaxed (not symmetric)."""
    z = torch.randn(B, N, 3, generator=gen, dtype=torch.float64)
    return torch.softmax(3 * z @ z.transpose(1, 2) + 0.3 * torch.randn(B, N, N, generator=gen, dtype=torch.float64),
                         dim=-1)


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() or min(x.shape[-2:]) == 1
    return y


# --------------------------------------------------------------------------- section 1: nms_axis
CD_SHAPES = [(1, 1, 8, 1), (2, 37, 24, 5), (3, 67, 17, 1), (2, 130, 33, 21)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CD_SHAPES)
@pytest.mark.parametrize("nms_axis", ["classes", "patches"])
@pytest.mark.parametrize("nms", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_distributions_nms_axes(backend, shape, nms_axis, nms, dtype):
    B, N, D, C = shape
    feats, text = _features(B, N, D, C, _gen("cd", shape, nms_axis, nms, dtype))
    want = R.class_distributions(feats, text, scale=40.0, nms=nms, nms_axis=nms_axis)
    f, t = _on(backend, "class_distributions", feats.to(dtype), text.to(dtype))
    if shape == CD_SHAPES[1]:
        f = _noncontig(f)
    got = ops.class_distributions(f, t, scale=40.0, nms=nms, nms_axis=nms_axis, backend=backend)
    assert got.shape == (B, N, C) and got.dtype == dtype
    assert rel_err(got.cpu(), want) <= TOL[dtype]
    if nms > 0 and nms_axis == "patches":  # the rule keeps every class's best patch
        assert bool((got.amax(dim=1) > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_distributions_patches_rule_differs_from_classes_rule(backend):
    feats, text = _features(2, 50, 16, 6, _gen("axes-differ"))
    f, t = _on(backend, "class_distributions", feats.float(), text.float())
    by_class = ops.class_distributions(f, t, scale=40.0, nms=0.5, nms_axis="classes", backend=backend).cpu()
    by_patch = ops.class_distributions(f, t, scale=40.0, nms=0.5, nms_axis="patches", backend=backend).cpu()
    assert not torch.equal(by_class == 0, by_patch == 0)
    assert rel_err(by_patch, R.class_distributions(feats, text, scale=40.0, nms=0.5, nms_axis="patches")) <= 1e-4


def test_backend_without_the_patches_rule_gets_the_exact_post_pass(monkeypatch):
    """A backend whose kernel knows only the classes rule (today: triton) runs it with nms = 0, then
    reference.suppress_patches on Q (ops.class_distributions); the result is the patches rule."""
    calls = []

    class ClassesOnly(Backend):
        name = "triton"

        def class_distributions(self, feats, text, *, scale=100.0, nms=0.0):
            calls.append(nms)
            return R.class_distributions(feats, text, scale=scale, nms=nms)

    monkeypatch.setitem(_backends._CACHE, "triton", ClassesOnly())
    feats, text = _features(2, 45, 12, 7, _gen("post-pass"))
    for nms_axis in ("classes", "patches"):
        got = ops.class_distributions(feats, text, scale=40.0, nms=0.6, nms_axis=nms_axis, backend="triton")
        want = R.class_distributions(feats, text, scale=40.0, nms=0.6, nms_axis=nms_axis)
        assert rel_err(got, want) <= 1e-12
    assert calls == [0.6, 0.0]


# --------------------------------------------------------------------------- section 3: transition, readout
MV_SHAPES = [(1, 37, 1), (2, 50, 5), (2, 67, 21), (3, 130, 4)]


def _mv_case(shape, key):
    B, N, C = shape
    g = _gen("mv", shape, key)
    feats, text = _features(B, N, 16, max(C, 2), g)
    q = R.class_distributions(feats, text, scale=20.0)[:, :, :C].contiguous()  # C = 1 alone would be uniform
    if C >= 4:
        q[:, :, 2] = 0.0  # a dead class
    return q, _affinity(B, N, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MV_SHAPES)
@pytest.mark.parametrize("transition", ["gibbs", "attention"])
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_markov_transitions_and_readouts(backend, shape, transition, readout, dtype):
    q, aff = _mv_case(shape, (transition, readout, dtype))
    kw = dict(mode="mv", transition=transition, readout=readout, steps=30, tau=0.3)
    want = ops.discrepancy(q, aff, backend="reference", **kw)
    qd, ad = _on(backend, "markov_scores", q.to(dtype), aff.to(dtype), params={"readout": readout})
    if shape == MV_SHAPES[1]:
        qd, ad = _noncontig(qd), _noncontig(ad)
    got = ops.discrepancy(qd, ad, backend=backend, **kw).cpu()
    assert got.shape == q.shape and got.dtype == dtype
    if readout == "velocity" and dtype == torch.float32:
        matrix = R.markov_transition(aff, transition=transition)
        near = velocity_borderline(q, matrix, sk_iters=15, steps=30, tau=0.3)
        fin = torch.isfinite(want)
        bad = fin & (velocity_lstar(got, q).double() != velocity_lstar(want, q)) & ~near
        assert not bool(bad.any()), f"{int(bad.sum())} lstar values differ away from the tau threshold"
        got = torch.where(near, want.to(got.dtype), got)
    assert rel_err(got, want) <= TOL[dtype]
    if q.shape[2] >= 4:
        assert bool(torch.isneginf(got[:, :, 2]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_transition_changes_the_scores_and_op_ignores_it(backend):
    q, aff = _mv_case((1, 40, 3), "differ")
    qd, ad = _on(backend, "markov_scores", q.float(), aff.float())
    gibbs = ops.discrepancy(qd, ad, mode="mv", transition="gibbs", backend=backend)
    attention = ops.discrepancy(qd, ad, mode="mv", transition="attention", backend=backend)
    assert rel_err(attention.cpu(), gibbs.cpu()) > 1e-2
    # the paper's transition is the scaled affinity itself, not the kernel: A and 1e-20 A agree
    tiny = ops.discrepancy(qd, ad * 1e-20, mode="mv", transition="attention", backend=backend)
    assert rel_err(tiny.cpu(), attention.cpu()) <= 1e-4
    if get_backend(backend).unsupported_reasons("sinkhorn_scores", (qd, ad), {}):
        return
    op = ops.discrepancy(qd, ad, mode="op", backend=backend)
    assert torch.equal(ops.discrepancy(qd, ad, mode="op", transition="attention", backend=backend), op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("readout", ["integrated", "velocity"])
def test_attention_with_zero_rows_and_zero_affinity(backend, readout):
    """W with a zero row (a patch without any affinity) and W = 0 (M = 0): the reference's T keeps those
    rows at 0 (its denominators are floored); a scaling-vector Sinkhorn-Knopp must not blow up there."""
    q, aff = _mv_case((2, 33, 4), ("zero", readout))
    aff[0, 5, :] = 0.0
    aff[0, :, 5] = 0.0
    aff[1] = 0.0
    kw = dict(mode="mv", transition="attention", readout=readout, steps=12, tau=0.3)
    want = ops.discrepancy(q, aff, backend="reference", **kw)
    qd, ad = _on(backend, "markov_scores", q.float(), aff.float(), params={"readout": readout})
    got = ops.discrepancy(qd, ad, backend=backend, **kw).cpu()
    assert bool((torch.isfinite(got) | torch.isneginf(want)).all())
    assert rel_err(got, want) <= 1e-4
    live = torch.isfinite(want[1])
    if readout == "integrated":  # the chain on W = 0 empties at step 1: S = -steps for every live class
        assert bool((got[1][live] == -12.0).all())


# --------------------------------------------------------------------------- validation
def test_transition_and_nms_axis_are_validated():
    q, aff = _mv_case((1, 9, 2), "bad")
    for mode in ("kl", "op", "mv"):  # checked in every mode, like every parameter
        with pytest.raises(ValueError, match="transition must be one of 'attention', 'gibbs'; got 'softmax'"):
            ops.discrepancy(q, aff, mode=mode, transition="softmax")
    feats, text = _features(1, 9, 4, 2, _gen("bad-axis"))
    with pytest.raises(ValueError, match="nms_axis must be one of 'classes', 'patches'; got 'rows'"):
        ops.class_distributions(feats, text, nms=0.5, nms_axis="rows")
