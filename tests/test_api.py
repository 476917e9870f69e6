"""The public API: shapes, dtypes, backend choice and the errors of method.md section 5."""

from __future__ import annotations

import warnings

import pytest
import torch

import ovss_fast
from ovss_fast.kernels import reference as ref
from ovss_fast.kernels.dispatch import AUTO_ORDER, Backend, UnavailableBackend, select

B, N, C, D = 2, 12, 3, 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, N, D, generator=g).to(dtype)
    text = torch.randn(C, D, generator=g).to(dtype)
    aff = torch.rand(B, N, N, generator=g).to(dtype)
    guide = torch.rand(B, 3, 9, 8, generator=g).to(dtype)
    return feats, text, aff, guide


# ----------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("mode", ["kl", "op", "mv"])
def test_segment_features_shapes(mode):
    feats, text, aff, guide = inputs()
    labels = ovss_fast.segment_features(feats, text, aff, grid=(3, 4), mode=mode)
    assert labels.shape == (B, 3, 4) and labels.dtype == torch.int64
    labels, scores = ovss_fast.segment_features(feats, text, aff, grid=(3, 4), guide=guide, mode=mode,
                                                return_scores=True)
    assert labels.shape == (B, 9, 8) and scores.shape == (B, C, 3, 4)
    assert labels.min() >= 0 and labels.max() < C


def test_segment_features_is_the_composition_of_the_ops():
    feats, text, aff, guide = inputs(torch.float64)
    q = ref.class_distributions(feats, text)
    k = ref.markov_transition(aff)  # the default transition: attention (Sym / max Sym)
    s = ref.markov_scores(q, k).transpose(1, 2).reshape(B, C, 3, 4)
    expected = ref.jbu_argmax(s, guide)
    assert torch.equal(ovss_fast.segment_features(feats, text, aff, grid=(3, 4), guide=guide, backend="reference"),
                       expected)


@pytest.mark.parametrize("dtype,out", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_output_dtypes(dtype, out):
    feats, text, aff, guide = inputs(dtype)
    q = ovss_fast.class_distributions(feats, text)
    assert q.dtype == out
    assert ovss_fast.discrepancy(q, aff.to(dtype), mode="op").dtype == out
    assert ovss_fast.gibbs_kernel(aff)[1].dtype == out
    assert ovss_fast.jbu_upsample(torch.randn(B, C, 3, 4).to(dtype), guide).dtype == out


def test_non_contiguous_inputs_give_the_same_result():
    feats, text, aff, guide = inputs(torch.float64)
    ft = feats.transpose(1, 2).contiguous().transpose(1, 2)
    at = aff.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ft.is_contiguous() and not at.is_contiguous()
    a = ovss_fast.segment_features(feats, text, aff, grid=(3, 4), guide=guide, return_scores=True)
    b = ovss_fast.segment_features(ft, text[:, :], at, grid=(3, 4), guide=guide[..., :], return_scores=True)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_dslo_head_detaches_and_matches_segment_features():
    feats, text, aff, guide = inputs()
    head = ovss_fast.DSLOHead(mode="op", iters=20)
    assert "mode='op'" in repr(head) and "iters=20" in repr(head)
    got = head(feats.clone().requires_grad_(True), text, aff, grid=(3, 4), guide=guide)
    assert torch.equal(got, ovss_fast.segment_features(feats, text, aff, grid=(3, 4), guide=guide, mode="op", iters=20))
    with pytest.raises(TypeError, match="unknown parameters"):
        ovss_fast.DSLOHead(mode="mv", itres=3)
    with pytest.raises(ValueError, match="mode"):
        ovss_fast.DSLOHead(mode="fast")


# ----------------------------------------------------------------------------- backends
def test_reference_backend_always_available():
    assert ovss_fast.available_backends()["reference"] == "ok"
    assert AUTO_ORDER[-1] == "reference"


def test_unknown_backend_is_named():
    feats, text, _, _ = inputs()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ovss_fast.class_distributions(feats, text, backend="fortran")


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    from ovss_fast.kernels import dispatch as _backends

    monkeypatch.setitem(_backends._CACHE, "cuda", UnavailableBackend("cuda", "cuda backend unavailable: test"))
    feats, text, _, _ = inputs()
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run class_distributions: .*test"):
        ovss_fast.class_distributions(feats, text, backend="cuda")


def test_auto_takes_the_first_backend_without_reasons(monkeypatch):
    from ovss_fast.kernels import dispatch as _backends

    class Refuses(Backend):
        name = "cuda"

        def unsupported_reasons(self, op, tensors, params):
            return ["not today"]

    class Accepts(Backend):
        name = "triton"

    monkeypatch.setitem(_backends._CACHE, "cuda", Refuses())
    monkeypatch.setitem(_backends._CACHE, "triton", Accepts())
    assert select("jbu_argmax", "auto", (), {}).name == "triton"


def test_auto_prefers_triton_for_the_iterative_ops(monkeypatch):
    from ovss_fast.kernels import dispatch as _backends

    class Accepts(Backend):
        def __init__(self, name):
            self.name = name

    monkeypatch.setitem(_backends._CACHE, "cuda", Accepts("cuda"))
    monkeypatch.setitem(_backends._CACHE, "triton", Accepts("triton"))
    for op in _backends.OPS:
        want = "triton" if op in ("sinkhorn_scores", "markov_scores") else "cuda"
        if op in REFINER_OPS:  # never run on a GPU: the CPU kernel, else the reference
            want = "cpu"
        assert select(op, "auto", (), {}).name == want, op
        assert _backends.auto_order(op)[-1] == "reference"


REFINER_OPS = ("pamr", "label_propagation", "pixel_propagation")


def test_auto_never_picks_gpu_paths_nobody_ran_for_the_refiners(monkeypatch):
    """The refiners' CUDA / Triton paths have never run on a GPU: auto gives CUDA tensors to the reference;
    a forced backend still runs them."""
    from ovss_fast.kernels import dispatch as _backends

    class Accepts(Backend):
        def __init__(self, name):
            self.name = name

    class Refuses(Backend):
        name = "cpu"

        def unsupported_reasons(self, op, tensors, params):
            return ["no"]

    monkeypatch.setitem(_backends._CACHE, "cuda", Accepts("cuda"))
    monkeypatch.setitem(_backends._CACHE, "triton", Accepts("triton"))
    monkeypatch.setitem(_backends._CACHE, "cpu", Refuses())
    for op in REFINER_OPS:
        assert not {"cuda", "triton"} & set(_backends.auto_order(op)), op
        assert select(op, "auto", (), {}).name == "reference", op
        assert select(op, "cuda", (), {}).name == "cuda", op


def test_auto_never_picks_cuda_for_op_and_mv(monkeypatch):
    """The CUDA extension's op / mv was slower than the reference on an H100: auto passes it over
    (triton first, then the reference), while backend="cuda" still runs it."""
    from ovss_fast.kernels import dispatch as _backends

    class Accepts(Backend):
        def __init__(self, name):
            self.name = name

    class Refuses(Backend):
        name = "triton"

        def unsupported_reasons(self, op, tensors, params):
            return ["no"]

    monkeypatch.setitem(_backends._CACHE, "cuda", Accepts("cuda"))
    monkeypatch.setitem(_backends._CACHE, "cpu", Refuses())
    monkeypatch.setitem(_backends._CACHE, "triton", Refuses())
    for op in ("sinkhorn_scores", "markov_scores"):
        assert "cuda" not in _backends.auto_order(op)
        assert select(op, "auto", (), {}).name == "reference", op
        assert select(op, "cuda", (), {}).name == "cuda", op
    assert select("gibbs_kernel", "auto", (), {}).name == "cuda"


# ----------------------------------------------------------------------------- errors (method.md section 5)
def expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_wrong_rank_names_the_argument():
    feats, text, aff, guide = inputs()
    expect(ValueError, r"feats should be a 3D tensor, got 2D", ovss_fast.class_distributions, feats[0], text)
    expect(ValueError, r"text should be a 2D tensor, got 3D", ovss_fast.class_distributions, feats, text[None])
    expect(ValueError, r"affinity should be a 3D tensor", ovss_fast.gibbs_kernel, aff[0])
    expect(ValueError, r"q should be a 3D tensor", ovss_fast.discrepancy, aff[0], aff)
    expect(ValueError, r"scores should be a 4D tensor", ovss_fast.jbu_argmax, aff, guide)
    expect(ValueError, r"guide should be a 4D tensor", ovss_fast.jbu_argmax, aff[None], guide[0])


def test_shape_mismatches_name_the_argument():
    feats, text, aff, guide = inputs()
    q = ovss_fast.class_distributions(feats, text)
    expect(ValueError, r"feature width D.*feats .* D = 8.*text .* D = 5", ovss_fast.class_distributions, feats,
           text[:, :5])
    expect(ValueError, r"affinity has N = 11 .* N = 12", ovss_fast.discrepancy, q, aff[:, :11, :11])
    expect(ValueError, r"affinity must be square", ovss_fast.gibbs_kernel, aff[:, :, :5])
    expect(ValueError, r"affinity has B = 1", ovss_fast.discrepancy, q, aff[:1])
    expect(ValueError, r"grid \(3, 5\) does not match N = 12", ovss_fast.segment_features, feats, text, aff,
           grid=(3, 5))
    expect(ValueError, r"square patch count, got N = 12", ovss_fast.segment_features, feats, text, aff)
    expect(ValueError, r"guide has B = 1", ovss_fast.jbu_argmax, torch.randn(B, C, 3, 4), guide[:1])
    expect(ValueError, r"guide must be an RGB image", ovss_fast.jbu_argmax, torch.randn(B, C, 3, 4), guide[:, :2])


def test_empty_class_list():
    feats, _, aff, _ = inputs()
    expect(ValueError, r"text has C = 0 classes", ovss_fast.class_distributions, feats, torch.zeros(0, D))
    # D = 0 (no feature width) is bad input too, named before the width comparison (method.md section 1)
    expect(ValueError, r"feats has D = 0 feature width \(shape \(2, 12, 0\)\)", ovss_fast.class_distributions,
           feats[..., :0], torch.zeros(C, 0))
    expect(ValueError, r"text has D = 0 feature width \(shape \(3, 0\)\)", ovss_fast.class_distributions, feats,
           torch.zeros(C, 0))
    expect(ValueError, r"q has C = 0 classes", ovss_fast.discrepancy, torch.zeros(B, N, 0), aff)
    expect(ValueError, r"scores has C = 0 classes", ovss_fast.jbu_argmax, torch.zeros(B, 0, 3, 4),
           torch.rand(B, 3, 5, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected(bad):
    feats, text, aff, guide = inputs()
    f2 = feats.clone()
    f2[1, 3, 2] = bad
    expect(ValueError, r"feats contains NaN or Inf", ovss_fast.class_distributions, f2, text)
    a2 = aff.clone()
    a2[0, 1, 1] = bad
    expect(ValueError, r"affinity contains NaN or Inf", ovss_fast.gibbs_kernel, a2)
    g2 = guide.clone()
    g2[0, 0, 0, 0] = bad
    expect(ValueError, r"guide contains NaN or Inf", ovss_fast.jbu_argmax, torch.randn(B, C, 3, 4), g2)


def test_scores_may_carry_dead_classes_but_not_nan():
    guide = torch.rand(1, 3, 6, 6)
    s = torch.randn(1, 2, 3, 3)
    s[:, 0] = float("-inf")
    assert (ovss_fast.jbu_argmax(s, guide) == 1).all()
    s[0, 1, 0, 0] = float("nan")
    expect(ValueError, r"scores contains NaN or \+Inf", ovss_fast.jbu_argmax, s, guide)


def test_values_out_of_range():
    feats, text, aff, guide = inputs()
    expect(ValueError, r"affinity must be non-negative", ovss_fast.gibbs_kernel, aff - 0.5)
    expect(ValueError, r"q must be non-negative", ovss_fast.discrepancy, -aff[:, :, :3], aff)
    expect(ValueError, r"guide values must lie in \[0, 1\].*255", ovss_fast.jbu_argmax, torch.randn(B, C, 3, 4),
           guide * 255)
    expect(ValueError, r"eps must be a positive finite number, got 0", ovss_fast.gibbs_kernel, aff, eps=0)
    expect(ValueError, r"nms must lie in \[0, 1\]", ovss_fast.class_distributions, feats, text, nms=1.5)
    expect(ValueError, r"iters must be >= 1, got 0", ovss_fast.discrepancy, aff[:, :, :3], aff, mode="op", iters=0)
    expect(TypeError, r"steps must be an int", ovss_fast.discrepancy, aff[:, :, :3], aff, steps=2.5)
    expect(ValueError, r"mode must be one of 'kl', 'op', 'mv'; got 'mx'", ovss_fast.discrepancy, aff[:, :, :3], aff,
           mode="mx")
    expect(ValueError, r"readout must be one of", ovss_fast.discrepancy, aff[:, :, :3], aff, readout="speed")
    expect(ValueError, r"mode='mv' needs an affinity", ovss_fast.discrepancy, aff[:, :, :3], None)


def test_unsupported_dtype_and_non_tensor():
    feats, text, _, _ = inputs()
    expect(TypeError, r"feats has unsupported dtype torch.int64", ovss_fast.class_distributions, feats.long(), text)
    expect(TypeError, r"text must be a torch.Tensor, got list", ovss_fast.class_distributions, feats, [[1.0]])


def test_requires_grad_is_rejected():
    feats, text, aff, _ = inputs()
    expect(ValueError, r"feats requires grad; ovss_fast is autograd-free", ovss_fast.class_distributions,
           feats.requires_grad_(True), text)
    expect(ValueError, r"affinity requires grad", ovss_fast.gibbs_kernel, aff.requires_grad_(True))


def test_mixed_devices_are_named():
    feats, text, aff, _ = inputs()
    expect(ValueError, r"one device, got feats on cpu, text on meta", ovss_fast.class_distributions, feats,
           text.to("meta"))
    q = ovss_fast.class_distributions(feats, text)
    expect(ValueError, r"q on cpu, affinity on meta", ovss_fast.discrepancy, q, aff.to("meta"))
