"""Clear errors and accepted edge inputs of the public API (issue 14, item 4)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ovss_fast
from ovss_fast.kernels import reference as R
from ovss_fast.models.clip_features import parse_class_names
from ovss_fast.ops import api as ops

BACKEND = "reference"


def inputs(B=2, N=16, C=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(C, D, generator=g),
            torch.rand(B, N, N, generator=g), torch.rand(B, 3, 8, 8, generator=g))


# --------------------------------------------------------------------------- B = 0
@pytest.mark.parametrize("mode", ["kl", "op", "mv"])
@pytest.mark.parametrize("with_guide", [False, True])
def test_segment_features_and_head_accept_an_empty_batch(mode, with_guide):
    feats, text, aff, guide = inputs(B=0)
    g = guide if with_guide else None
    labels, scores = ops.segment_features(feats, text, aff, guide=g, mode=mode, return_scores=True,
                                          backend=BACKEND)
    assert labels.shape == ((0, 8, 8) if with_guide else (0, 4, 4)) and labels.dtype == torch.int64
    assert scores.shape == (0, 3, 4, 4)
    head = ovss_fast.DSLOHead(mode=mode, backend=BACKEND)
    assert head(feats, text, aff, guide=g).shape == labels.shape


# --------------------------------------------------------------------------- D = 0
def test_zero_feature_width_is_a_value_error_naming_the_argument():
    """method.md section 1: D = 0 is bad input (it was an IndexError inside the reference)."""
    feats, text, aff, _ = inputs(D=0)
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"feats has D = 0 feature width \(shape \(2, 16, 0\)\)"):
            ops.class_distributions(feats, text, backend=backend)
        with pytest.raises(ValueError, match="feats has D = 0"):
            ops.segment_features(feats, text, aff, mode="mv", backend=backend)
    with pytest.raises(ValueError, match=r"text has D = 0 feature width \(shape \(3, 0\)\)"):
        ops.class_distributions(torch.randn(2, 16, 4), text)


# --------------------------------------------------------------------------- non-finite scores
def test_non_finite_scores_name_the_affinity(monkeypatch):
    feats, text, aff, _ = inputs()
    q = ops.class_distributions(feats, text, backend=BACKEND)
    monkeypatch.setattr(R, "markov_scores", lambda q, k, **kw: torch.full_like(q, float("nan")))
    with pytest.raises(ValueError, match=r"mode='mv' gave NaN or \+Inf scores for this affinity .*rescale"):
        ops.discrepancy(q, aff, mode="mv", backend=BACKEND)
    with pytest.raises(ValueError, match="affinity"):
        ops.segment_features(feats, text, aff, mode="mv", backend=BACKEND)


# --------------------------------------------------------------------------- integral numbers
def test_numpy_integers_and_floats_are_accepted_as_numbers():
    feats, text, aff, guide = inputs()
    want = ops.segment_features(feats, text, aff, guide=guide, mode="op", iters=3, radius=2, eps=0.25,
                                sigma_range=0.125, backend=BACKEND)
    got = ops.segment_features(feats, text, aff, guide=guide, mode="op", iters=np.int64(3), radius=np.int32(2),
                               grid=(np.int64(4), np.int64(4)), eps=np.float32(0.25), sigma_range=np.float64(0.125),
                               backend=BACKEND)
    assert torch.equal(got, want)
    q = ops.class_distributions(feats, text, backend=BACKEND)
    ops.discrepancy(q, aff, mode="mv", sk_iters=np.int16(2), steps=np.uint8(3), backend=BACKEND)
    with pytest.raises(TypeError, match="iters must be an integer, got float"):
        ops.discrepancy(q, aff, mode="op", iters=3.0, backend=BACKEND)
    with pytest.raises(TypeError, match="steps must be an integer, got bool"):
        ops.discrepancy(q, aff, mode="mv", steps=True, backend=BACKEND)


# --------------------------------------------------------------------------- every parameter checked
@pytest.mark.parametrize("mode, kw, message", [
    ("op", {"steps": 0}, "steps must be >= 1"),
    ("op", {"readout": "fast"}, "readout must be one of"),
    ("mv", {"iters": -5}, "iters must be >= 1"),
    ("kl", {"eps": 0.0}, "eps must be a positive"),
    ("kl", {"tau": -1.0}, "tau must be a positive"),
    ("mv", {"sk_iters": 0}, "sk_iters must be >= 1, got 0 .*overflows float32"),
    ("op", {"sk_iters": 0}, "sk_iters must be >= 1"),
])
def test_every_discrepancy_parameter_is_validated(mode, kw, message):
    feats, text, aff, _ = inputs()
    q = ops.class_distributions(feats, text, backend=BACKEND)
    with pytest.raises(ValueError, match=message):
        ops.discrepancy(q, aff, mode=mode, backend=BACKEND, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"radius": -1}, "radius must be >= 0"),
    ({"sigma_range": 0.0}, "sigma_range must be a positive"),
    ({"sigma_spatial": float("nan")}, "sigma_spatial must be a positive"),
])
def test_jbu_parameters_are_validated_without_a_guide(kw, message):
    feats, text, aff, _ = inputs()
    with pytest.raises(ValueError, match=message):
        ops.segment_features(feats, text, aff, mode="mv", backend=BACKEND, **kw)


def test_kl_validates_a_given_affinity():
    feats, text, aff, _ = inputs()
    q = ops.class_distributions(feats, text, backend=BACKEND)
    with pytest.raises(ValueError, match="affinity must be non-negative"):
        ops.discrepancy(q, -aff, mode="kl", backend=BACKEND)
    assert ops.discrepancy(q, None, mode="kl", backend=BACKEND).shape == q.shape


# --------------------------------------------------------------------------- radius cap
@pytest.mark.parametrize("fn", [ops.jbu_upsample, ops.jbu_argmax])
def test_reference_jbu_caps_the_radius_like_the_compiled_backends(fn):
    scores, guide = torch.randn(1, 2, 3, 3), torch.rand(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"radius must be <= 64 \(4000004000001 taps per pixel\), got 1000000"):
        fn(scores, guide, radius=10**6, backend="reference")
    fn(scores, guide, radius=64, backend="reference")  # the cap itself is allowed


# --------------------------------------------------------------------------- class names
@pytest.mark.parametrize("names, message", [
    (["cat", "dog", "cat"], r"duplicate name 'cat' \(in class_names\[0\] = 'cat' and class_names\[2\] = 'cat'\)"),
    (["dining table; table", "table"], r"duplicate name 'table' \(in class_names\[0\]"),
    ("cat; kitten, Kitten", r"duplicate name 'Kitten'"),
    (["cat;  cat"], r"duplicate name 'cat' \(twice in class_names\[0\]"),
    (["big  dog", "Big dog"], "duplicate name 'Big dog'"),
])
def test_duplicate_class_names_are_rejected_naming_them(names, message):
    with pytest.raises(ValueError, match=message):
        parse_class_names(names)


def test_benchmark_class_name_files_have_no_duplicates():
    from ovss_fast.eval import DATASETS, load_class_names

    for name in DATASETS:
        parse_class_names(load_class_names(name))  # raises on a duplicate


# --------------------------------------------------------------------------- Segmenter
def test_segmenter_rejects_a_bad_backend_before_building_the_model(monkeypatch):
    pytest.importorskip("open_clip")
    import ovss_fast.pipeline.segmenter as seg

    monkeypatch.setattr(seg, "build_open_clip", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'reference', 'cpu', 'cuda', 'triton'; "
                                         r"got 'bogus'"):
        seg.Segmenter(model="ovss-fast-tiny", pretrained=None, device="cpu", backend="bogus")


@pytest.mark.parametrize("kw, message", [
    ({"sk_iters": 0}, "sk_iters must be >= 1"),
    ({"radius": 65}, "radius must be <= 64"),
    ({"iters": np.int64(0)}, "iters must be >= 1"),
])
def test_segmenter_validates_every_parameter_at_construction(monkeypatch, kw, message):
    pytest.importorskip("open_clip")
    import ovss_fast.pipeline.segmenter as seg

    monkeypatch.setattr(seg, "build_open_clip", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=message):
        seg.Segmenter(model="ovss-fast-tiny", pretrained=None, device="cpu", mode="kl", **kw)


def test_segmenter_accepts_numpy_integers():
    pytest.importorskip("open_clip")
    from ovss_fast.pipeline.segmenter import Segmenter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Segmenter(model="ovss-fast-tiny", pretrained=None, device="cpu", backend=BACKEND, mode="kl",
                      iters=np.int64(3), radius=np.int64(1), templates=("{}",))
    assert s.op_params["iters"] == 3 and type(s.op_params["iters"]) is int and s.jbu_params["radius"] == 1
