"""The compiled ops class_distributions, gibbs_kernel, kl_scores, jbu_upsample and jbu_argmax.

CPU kernels against the float64 reference (method.md section 5: float32 rel. error
<= 1e-4; ``rel_err`` from conftest is max |a - e| / max |e| over finite entries, -inf
entries must coincide). Half / bfloat16 inputs are computed in float32, so they are
compared with the float64 reference run on the same rounded values at the float32
tolerance. Labels must be identical except where the reference's top two classes are
within tolerance. Also: awkward shapes, non-contiguous inputs, NMS dead classes,
``torch.library.opcheck`` per op, the C++ argument checks, the backend's
``unsupported_reasons``, and the CUDA kernels (marked ``cuda``, skipped without a GPU).

Without the compiled extension the module is skipped, unless OVSS_FAST_REQUIRE_EXT=1
(CI sets it): then the import error fails the run.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import rel_err

from ovss_fast.kernels import reference as R
from ovss_fast.ops import api as ops

try:
    import ovss_fast.kernels._C  # noqa: F401

    from ovss_fast.kernels.extension import CPU_BACKEND, CUDA_BACKEND, has_kernel
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("OVSS_FAST_REQUIRE_EXT") == "1":
        raise
    pytest.skip(f"ovss_fast.kernels._C is not built: {exc}", allow_module_level=True)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS_MINE = ("class_distributions", "gibbs_kernel", "kl_scores", "jbu_upsample", "jbu_argmax")


def _gen(*key: object) -> torch.Generator:
    """A fresh, reproducible generator per case (seeded by the case's parameters)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _ref64(t: torch.Tensor) -> torch.Tensor:
    """The float64 reference input: the values the kernel sees (half inputs already rounded)."""
    return t.detach().to(torch.float64)


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def assert_labels_match(labels: torch.Tensor, up_ref: torch.Tensor, tol: float) -> None:
    """labels [B, H, W] == argmax of the reference [B, C, H, W], except where its top two are within tol."""
    ref = up_ref.argmax(dim=1)
    differ = labels.cpu() != ref
    if not bool(differ.any()):
        return
    top2 = up_ref.topk(min(2, up_ref.shape[1]), dim=1).values
    scale = up_ref[torch.isfinite(up_ref)].abs().max().clamp_min(1e-30)
    close = (top2[:, 0] - top2[:, -1]).abs() <= tol * scale
    assert bool(close[differ].all()), f"{int((differ & ~close).sum())} labels differ outside the tolerance band"
    # where they differ, the kernel's label must be one of the near-tied classes
    picked = up_ref.gather(1, labels.cpu()[:, None]).squeeze(1)
    assert bool(((top2[:, 0] - picked).abs() <= tol * scale)[differ].all())


# --------------------------------------------------------------------------- the extension itself
def test_extension_loads_and_registers_every_op():
    """Fails (never skips) when the library lacks an op or a CPU kernel."""
    for op in ("class_distributions", "gibbs_kernel", "kl_scores", "sinkhorn_scores", "markov_scores",
               "jbu_upsample", "jbu_argmax", "pamr"):
        assert hasattr(torch.ops.ovss_fast, op), op
    assert has_kernel("pamr", "CPU"), "pamr has no CPU kernel"
    for op in OPS_MINE:
        assert has_kernel(op, "CPU"), f"{op} has no CPU kernel"
    assert not has_kernel("no_such_op", "CPU")


def test_required_extension_is_importable():
    """CI sets OVSS_FAST_REQUIRE_EXT=1: there the extension must load (this module cannot skip)."""
    if os.environ.get("OVSS_FAST_REQUIRE_EXT") != "1":
        pytest.skip("OVSS_FAST_REQUIRE_EXT is not set")
    from ovss_fast.kernels.dispatch import available_backends

    assert available_backends()["cpu"] == "ok"


def test_cpu_kernels_use_torch_threads():
    """Built without OpenMP, at::parallel_for runs on the calling thread only (setup.py adds -fopenmp)."""
    if "backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.ovss_fast._intra_op_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.ovss_fast._intra_op_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_kernels_same_results_on_one_and_two_threads():
    """Rows split across threads must not change a value (no shared scratch, no chunk-dependent sums)."""
    from ovss_fast.kernels.extension import CPU_BACKEND as E

    g = _gen("threads")
    feats, text = torch.randn(2, 300, 16, generator=g), torch.randn(5, 16, generator=g)
    aff = torch.rand(2, 300, 300, generator=g)
    scores, guide = torch.randn(2, 5, 7, 9, generator=g), torch.rand(2, 3, 61, 83, generator=g)
    q = E.class_distributions(feats, text, scale=50.0, nms=0.5)
    kernel = E.gibbs_kernel(aff, eps=0.2)[1]
    calls = {
        "class_distributions": lambda: E.class_distributions(feats, text, scale=50.0, nms=0.5),
        "gibbs_kernel": lambda: E.gibbs_kernel(aff, eps=0.2)[1],
        "kl_scores": lambda: E.kl_scores(q),
        "sinkhorn_scores": lambda: E.sinkhorn_scores(q, kernel, eps=0.2, iters=20),
        "markov_scores": lambda: E.markov_scores(q, kernel, sk_iters=10, steps=20),
        "jbu_upsample": lambda: E.jbu_upsample(scores, guide, sigma_spatial=2.0, sigma_range=0.1, radius=2),
        "jbu_argmax": lambda: E.jbu_argmax(scores, guide, sigma_spatial=2.0, sigma_range=0.1, radius=2),
    }
    before = torch.get_num_threads()
    try:
        for name, call in calls.items():
            torch.set_num_threads(1)
            one = call()
            torch.set_num_threads(2)
            two = call()
            assert torch.equal(one, two), name
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- section 1
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,C", [(1, 1, 8, 1), (2, 37, 24, 5), (1, 49, 64, 21), (2, 13, 3, 171)])
@pytest.mark.parametrize("nms", [0.0, 0.5])
def test_class_distributions_cpu(dtype, B, N, D, C, nms):
    g = _gen("cd", dtype, B, N, D, C, nms)
    feats = torch.randn(B, N, D, generator=g).to(dtype)
    text = torch.randn(C, D, generator=g).to(dtype)
    q = CPU_BACKEND.class_distributions(feats, text, scale=100.0, nms=nms)
    ref = R.class_distributions(_ref64(feats), _ref64(text), scale=100.0, nms=nms)
    assert q.dtype == _out_dtype(feats, text) and q.shape == (B, N, C)
    assert rel_err(q, ref) <= TOL[dtype]
    # each column is a distribution over patches (0 when NMS emptied it; below 1 only where
    # the column's mass fell under the 1e-30 denominator floor, as in the reference)
    assert torch.allclose(q.double().sum(dim=1), ref.sum(dim=1), atol=1e-5)


def test_class_distributions_noncontiguous_and_mixed_dtypes():
    g = _gen("cd-nc")
    feats = torch.randn(2, 40, 31, generator=g, dtype=torch.float64).transpose(1, 2)  # [2, 31, 40]
    text = torch.randn(40, 7, generator=g).t()  # [7, 40] float32, non-contiguous
    assert not feats.is_contiguous() and not text.is_contiguous()
    q = CPU_BACKEND.class_distributions(feats, text, scale=30.0, nms=0.2)
    assert q.dtype == torch.float64
    ref = R.class_distributions(feats, text.double(), scale=30.0, nms=0.2)
    assert rel_err(q, ref) <= 1e-10


def test_class_distributions_nms_dead_class_and_zero_vectors():
    g = _gen("cd-dead")
    D = 16
    base = torch.randn(D, generator=g)
    feats = base + 0.05 * torch.randn(2, 30, D, generator=g)  # every patch close to `base`
    feats[0, 3] = 0.0  # a zero feature: cosine 0 everywhere, not NaN
    text = torch.randn(4, D, generator=g)
    text[1] = base  # always the best class
    text[2] = -base  # never within nms of the best: dead
    for dtype in (torch.float32, torch.float64):
        q = CPU_BACKEND.class_distributions(feats.to(dtype), text.to(dtype), scale=100.0, nms=0.5)
        ref = R.class_distributions(feats.double(), text.double(), scale=100.0, nms=0.5)
        # image 1: class 2 is dead; image 0: it lives only at the zero patch (all classes tie there)
        assert R.dead_classes(ref)[:, 2].tolist() == [False, True]
        assert torch.equal(q[1, :, 2], torch.zeros_like(q[1, :, 2]))
        assert float(q[0, 3, 2]) == 1.0
        assert bool(torch.isfinite(q).all())
        assert rel_err(q, ref) <= TOL[dtype]
        kl = CPU_BACKEND.kl_scores(q)
        assert bool((kl[1, :, 2] == float("-inf")).all())
        assert bool(torch.isfinite(kl[0]).all()) and bool(torch.isfinite(kl[:, :, 1]).all())


# --------------------------------------------------------------------------- section 2
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1), (2, 5), (1, 67), (2, 130)])
def test_gibbs_kernel_cpu(dtype, B, N):
    g = _gen("gibbs", dtype, B, N)
    a = torch.rand(B, N, N, generator=g) ** 3
    a[:, 0, 1 % N] = 0.0  # exact zeros hit the 1e-12 floor
    a = a.to(dtype)
    for eps in (0.1, 0.03):
        cost, kern = CPU_BACKEND.gibbs_kernel(a, eps=eps)
        rc, rk = R.gibbs_kernel(_ref64(a), eps=eps)
        assert cost.dtype == _out_dtype(a) == kern.dtype
        assert rel_err(cost, rc) <= TOL[dtype]
        assert rel_err(kern, rk) <= TOL[dtype]
        assert torch.equal(cost, cost.transpose(1, 2))  # symmetric by construction


def test_gibbs_kernel_noncontiguous_constant_and_per_image_range():
    g = _gen("gibbs-nc")
    a = torch.rand(3, 45, 45, generator=g, dtype=torch.float64)
    a[1] = 0.7  # constant image: max == min, cost 0, kernel 1
    a[2] *= 1e-6  # its own min / max, unaffected by the other images
    at = a.transpose(1, 2)
    assert not at.is_contiguous()
    cost, kern = CPU_BACKEND.gibbs_kernel(at, eps=0.1)
    rc, rk = R.gibbs_kernel(at, eps=0.1)
    assert rel_err(cost, rc) <= 1e-10 and rel_err(kern, rk) <= 1e-10
    assert torch.equal(cost[1], torch.zeros(45, 45, dtype=torch.float64))
    assert torch.equal(kern[1], torch.ones(45, 45, dtype=torch.float64))
    for b in (0, 2):
        assert float(cost[b].min()) == 0.0 and float(cost[b].max()) == 1.0


# --------------------------------------------------------------------------- section 3, kl
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C", [(1, 1, 1), (2, 37, 5), (1, 200, 21)])
def test_kl_scores_cpu(dtype, B, N, C):
    g = _gen("kl", dtype, B, N, C)
    q = torch.rand(B, N, C, generator=g, dtype=torch.float64) ** 3
    q[q < 0.05] = 0.0  # exact zeros: score 0
    if C > 1:
        q[:, :, 1] = 0.0  # a dead class: -inf everywhere
    q = (q / q.sum(dim=1, keepdim=True).clamp_min(1e-300)).to(dtype)
    s = CPU_BACKEND.kl_scores(q)
    ref = R.kl_scores(_ref64(q))
    assert s.dtype == _out_dtype(q)
    assert rel_err(s, ref) <= TOL[dtype]
    if C > 1:
        assert bool((s[:, :, 1] == float("-inf")).all())


def test_kl_scores_elementwise_accuracy_over_magnitudes():
    """The kernels' float32 log (common/hostdevice.h) holds ~1e-6 relative error per entry, subnormals included."""
    exps = torch.linspace(-44.0, 0.0, 400, dtype=torch.float64)
    q = (10.0**exps).to(torch.float32).reshape(1, 400, 1).repeat(1, 1, 3)  # values from 1e-44 (subnormal) to 1
    for n_keep in (400, 1):
        qq = q[:, :n_keep]
        s = CPU_BACKEND.kl_scores(qq).double()
        ref = R.kl_scores(qq.double())
        big = ref.abs() > 1e-30
        assert bool(((s - ref).abs()[big] <= 2e-6 * ref.abs()[big]).all())


def test_gibbs_kernel_elementwise_accuracy_small_eps():
    """exp over a wide range (eps = 0.01: exponents down to -100) stays accurate per entry where not underflowing."""
    a = torch.rand(1, 70, 70, generator=_gen("gibbs-eps")) ** 4
    _, k = CPU_BACKEND.gibbs_kernel(a, eps=0.01)
    _, rk = R.gibbs_kernel(a.double(), eps=0.01)
    normal = rk > 1.2e-38
    assert bool(((k.double() - rk).abs()[normal] <= 2e-4 * rk[normal]).all())  # cost's float32 rounding x 100
    assert bool((k.double()[~normal] <= 1.2e-38).all())


def test_kl_scores_noncontiguous():
    q = torch.rand(2, 6, 33, generator=_gen("kl-nc"), dtype=torch.float64).transpose(1, 2)
    assert rel_err(CPU_BACKEND.kl_scores(q), R.kl_scores(q)) <= 1e-10


# --------------------------------------------------------------------------- section 4
JBU_SHAPES = [
    # B, C, h, w, H, W, radius
    (1, 1, 1, 1, 5, 3, 2),
    (2, 4, 7, 9, 50, 61, 2),
    (1, 21, 8, 8, 31, 17, 1),
    (1, 3, 6, 5, 6, 5, 0),  # same size, one tap
    (2, 5, 12, 10, 7, 9, 3),  # downsampling
    (1, 2, 4, 6, 23, 29, 5),  # taps far off the grid
]


def _jbu_inputs(key, B, C, h, w, H, W, dtype):
    g = _gen("jbu", key, B, C, h, w, H, W, dtype)
    scores = torch.randn(B, C, h, w, generator=g)
    guide = torch.rand(B, 3, H, W, generator=g)
    return scores.to(dtype), guide.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,h,w,H,W,radius", JBU_SHAPES)
def test_jbu_upsample_and_argmax_cpu(dtype, B, C, h, w, H, W, radius):
    scores, guide = _jbu_inputs("plain", B, C, h, w, H, W, dtype)
    kw = {"sigma_spatial": 1.3, "sigma_range": 0.15, "radius": radius}
    up = CPU_BACKEND.jbu_upsample(scores, guide, **kw)
    ref = R.jbu_upsample(_ref64(scores), _ref64(guide), **kw)
    assert up.dtype == _out_dtype(scores, guide) and up.shape == (B, C, H, W)
    assert rel_err(up, ref) <= TOL[dtype]
    labels = CPU_BACKEND.jbu_argmax(scores, guide, **kw)
    assert labels.dtype == torch.int64 and labels.shape == (B, H, W)
    assert_labels_match(labels, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jbu_neg_inf_rule_and_dead_class(dtype):
    scores, guide = _jbu_inputs("inf", 2, 4, 6, 7, 40, 33, dtype)
    scores[0, 1, 2, 3] = float("-inf")  # poisons class 1 around that cell only
    scores[1, 2] = float("-inf")  # a dead class: -inf everywhere in image 1
    scores[:, 3] = scores[:, 3] + 50.0  # would win everywhere ...
    scores[0, 3, 0, 0] = float("-inf")  # ... but not next to a -inf tap
    up = CPU_BACKEND.jbu_upsample(scores, guide)
    ref = R.jbu_upsample(_ref64(scores), _ref64(guide))
    assert rel_err(up, ref) <= TOL[dtype]
    assert bool((up[1, 2] == float("-inf")).all())
    labels = CPU_BACKEND.jbu_argmax(scores, guide)
    assert_labels_match(labels, ref, TOL[dtype])
    assert bool((labels[1] == 3).all())
    assert bool((labels[0][up[0, 3] == float("-inf")] != 3).all())


def test_jbu_argmax_ties_go_to_the_lowest_class():
    scores, guide = _jbu_inputs("tie", 1, 4, 5, 5, 20, 20, torch.float32)
    scores[:, 1] = scores[:, 0].abs() + 10.0  # above class 0 everywhere
    scores[:, 2] = scores[:, 1]  # classes 1, 2 and 3 tie exactly
    scores[:, 3] = scores[:, 1]
    labels = CPU_BACKEND.jbu_argmax(scores, guide)
    assert bool((labels == 1).all())
    assert torch.equal(labels, R.jbu_argmax(scores, guide))
    # a class that is -inf everywhere never wins, even against all -inf but one
    s2 = torch.full((1, 3, 4, 4), float("-inf"))
    s2[:, 2] = 0.0
    assert bool((CPU_BACKEND.jbu_argmax(s2, torch.rand(1, 3, 9, 9)) == 2).all())


def test_jbu_noncontiguous_inputs():
    g = _gen("jbu-nc")
    scores = torch.randn(2, 9, 11, 5, generator=g).permute(0, 3, 1, 2)  # [2, 5, 9, 11], channels-last memory
    guide = torch.rand(2, 37, 41, 3, generator=g).permute(0, 3, 1, 2)  # [2, 3, 37, 41]
    assert not scores.is_contiguous() and not guide.is_contiguous()
    ref = R.jbu_upsample(scores.double(), guide.double())
    assert rel_err(CPU_BACKEND.jbu_upsample(scores, guide), ref) <= 1e-4
    assert_labels_match(CPU_BACKEND.jbu_argmax(scores, guide), ref, 1e-4)


def test_jbu_float32_labels_match_float32_reference_exactly():
    """float32 kernel vs float32 reference (exponents in double vs float32): same labels off near-ties, here all."""
    scores, guide = _jbu_inputs("exact32", 2, 21, 8, 8, 64, 48, torch.float32)
    assert torch.equal(CPU_BACKEND.jbu_argmax(scores, guide), R.jbu_argmax(scores, guide))


# --------------------------------------------------------------------------- the public API routes here
def test_public_api_backend_cpu():
    g = _gen("api")
    feats = torch.randn(1, 16, 12, generator=g)
    text = torch.randn(3, 12, generator=g)
    q = ops.class_distributions(feats, text, backend="cpu")
    assert rel_err(q, R.class_distributions(feats.double(), text.double())) <= 1e-4
    s = ops.discrepancy(q, None, mode="kl", backend="cpu")
    assert rel_err(s, R.kl_scores(q.double())) <= 1e-4
    labels = ops.segment_features(feats, text, None, mode="kl", guide=torch.rand(1, 3, 20, 20), backend="cpu")
    assert labels.shape == (1, 20, 20)


def test_unsupported_reasons():
    x = torch.rand(1, 4, 4)
    assert CPU_BACKEND.unsupported_reasons("kl_scores", [x], {}) == []
    assert CPU_BACKEND.unsupported_reasons("no_such_op", [x], {})
    assert CPU_BACKEND.unsupported_reasons("kl_scores", [x.to(torch.int32)], {})
    big = {"sigma_spatial": 1.0, "sigma_range": 0.1, "radius": 65}
    assert any("radius" in r for r in CPU_BACKEND.unsupported_reasons("jbu_argmax", [x, x], big))
    assert CPU_BACKEND.unsupported_reasons("jbu_argmax", [x, x], dict(big, radius=64)) == []
    cuda_reasons = CUDA_BACKEND.unsupported_reasons("kl_scores", [x], {})
    assert any("cuda" in r.lower() for r in cuda_reasons)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in cuda_reasons


# --------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    g = _gen("opcheck")
    return {
        "class_distributions": (torch.randn(2, 9, 6, generator=g), torch.randn(4, 6, generator=g), 100.0, 0.3),
        "gibbs_kernel": (torch.rand(2, 7, 7, generator=g), 0.1),
        "kl_scores": (torch.rand(2, 9, 4, generator=g),),
        "jbu_upsample": (torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, 11, 13, generator=g), 1.0, 0.1, 2),
        "jbu_argmax": (torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, 11, 13, generator=g), 1.0, 0.1, 2),
    }


@pytest.mark.parametrize("op", OPS_MINE)
def test_opcheck(op):
    args = _opcheck_cases()[op]
    torch.library.opcheck(getattr(torch.ops.ovss_fast, op).default, args)
    doubles = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.ovss_fast, op).default, doubles)


@pytest.mark.parametrize("nms_axis", ["classes", "patches"])
def test_opcheck_class_distributions_nms_axis(nms_axis):
    feats, text, scale, nms = _opcheck_cases()["class_distributions"]
    torch.library.opcheck(torch.ops.ovss_fast.class_distributions.default, (feats, text, scale, nms, nms_axis))


def test_torch_compile_traces_the_ops():
    f = torch.compile(lambda a: torch.ops.ovss_fast.gibbs_kernel(a, 0.1)[1], backend="eager", fullgraph=True)
    a = torch.rand(1, 8, 8)
    assert torch.equal(f(a), CPU_BACKEND.gibbs_kernel(a, eps=0.1)[1])


# --------------------------------------------------------------------------- C++ argument checks
BAD_CALLS = [
    ("class_distributions", (torch.rand(4, 8), torch.rand(3, 8), 100.0, 0.0), r"feats should be a 3D tensor.*got 2D"),
    ("class_distributions", (torch.rand(1, 4, 8), torch.rand(3, 8, 1), 100.0, 0.0), r"text should be a 2D tensor"),
    ("class_distributions", (torch.rand(1, 4, 8), torch.rand(3, 7), 100.0, 0.0), r"feature width D"),
    ("class_distributions", (torch.rand(1, 4, 0), torch.rand(3, 0), 100.0, 0.0), r"feats has D = 0 feature width"),
    ("class_distributions", (torch.rand(1, 4, 3), torch.rand(3, 0), 100.0, 0.0), r"text has D = 0 feature width"),
    ("class_distributions", (torch.rand(1, 4, 8), torch.rand(3, 8), 100.0, 0.5, "rows"),
     r"nms_axis must be 'classes' or 'patches', got 'rows'"),
    ("class_distributions", (torch.ones(1, 4, 8, dtype=torch.int32), torch.rand(3, 8), 1.0, 0.0),
     r"feats has unsupported dtype"),
    ("gibbs_kernel", (torch.rand(4, 4), 0.1), r"affinity should be a 3D tensor.*got 2D"),
    ("gibbs_kernel", (torch.rand(1, 4, 5), 0.1), r"affinity must be square.*\[1, 4, 5\]"),
    ("gibbs_kernel", (torch.rand(1, 4, 4), 0.0), r"eps must be positive"),
    ("kl_scores", (torch.rand(4, 4),), r"q should be a 3D tensor.*got 2D"),
    ("jbu_upsample", (torch.rand(3, 4, 4), torch.rand(1, 3, 8, 8), 1.0, 0.1, 2), r"scores should be a 4D tensor"),
    ("jbu_upsample", (torch.rand(1, 3, 4, 4), torch.rand(1, 4, 8, 8), 1.0, 0.1, 2), r"guide must be an RGB image"),
    ("jbu_upsample", (torch.rand(1, 3, 4, 4), torch.rand(2, 3, 8, 8), 1.0, 0.1, 2), r"guide has B = 2"),
    ("jbu_argmax", (torch.rand(1, 3, 4, 4), torch.rand(1, 3, 8), 1.0, 0.1, 2), r"guide should be a 4D tensor"),
    ("jbu_argmax", (torch.rand(1, 3, 4, 4), torch.rand(1, 3, 8, 8), 1.0, 0.1, -1), r"radius must be >= 0"),
    ("jbu_argmax", (torch.rand(1, 3, 4, 4), torch.rand(1, 3, 8, 8), 0.0, 0.1, 2), r"sigma_spatial must be positive"),
    ("jbu_argmax", (torch.rand(1, 0, 4, 4), torch.rand(1, 3, 8, 8), 1.0, 0.1, 2), r"C = 0 classes"),
]


@pytest.mark.parametrize("op,args,match", BAD_CALLS)
def test_cpp_checks_name_the_argument(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.ovss_fast, op)(*args)


def test_empty_inputs_give_empty_outputs():
    assert CPU_BACKEND.class_distributions(torch.rand(0, 5, 4), torch.rand(3, 4)).shape == (0, 5, 3)
    assert CPU_BACKEND.kl_scores(torch.rand(2, 0, 3)).shape == (2, 0, 3)
    cost, kern = CPU_BACKEND.gibbs_kernel(torch.rand(0, 4, 4))
    assert cost.shape == kern.shape == (0, 4, 4)
    assert CPU_BACKEND.jbu_upsample(torch.rand(1, 2, 3, 3), torch.rand(1, 3, 0, 5)).shape == (1, 2, 0, 5)
    assert CPU_BACKEND.jbu_argmax(torch.rand(0, 2, 3, 3), torch.rand(0, 3, 6, 5)).shape == (0, 6, 5)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_matches_reference(dtype):
    dev = "cuda"
    g = _gen("cuda", dtype)
    feats = torch.randn(2, 37, 40, generator=g).to(dtype)
    text = torch.randn(21, 40, generator=g).to(dtype)
    for nms in (0.0, 0.5):
        q = CUDA_BACKEND.class_distributions(feats.to(dev), text.to(dev), scale=100.0, nms=nms)
        ref = R.class_distributions(_ref64(feats), _ref64(text), scale=100.0, nms=nms)
        assert rel_err(q, ref) <= TOL[dtype]
        assert rel_err(CUDA_BACKEND.kl_scores(q), R.kl_scores(q.double().cpu())) <= TOL[dtype]
    for N in (1, 33, 130):
        a = (torch.rand(2, N, N, generator=g) ** 3).to(dtype)
        cost, kern = CUDA_BACKEND.gibbs_kernel(a.to(dev), eps=0.1)
        rc, rk = R.gibbs_kernel(_ref64(a), eps=0.1)
        assert rel_err(cost, rc) <= TOL[dtype] and rel_err(kern, rk) <= TOL[dtype]
    for B, C, h, w, H, W, radius in JBU_SHAPES:
        scores, guide = _jbu_inputs("cuda", B, C, h, w, H, W, dtype)
        scores[0, 0, 0, 0] = float("-inf")
        kw = {"sigma_spatial": 1.3, "sigma_range": 0.15, "radius": radius}
        ref = R.jbu_upsample(_ref64(scores), _ref64(guide), **kw)
        assert rel_err(CUDA_BACKEND.jbu_upsample(scores.to(dev), guide.to(dev), **kw), ref) <= TOL[dtype]
        assert_labels_match(CUDA_BACKEND.jbu_argmax(scores.to(dev), guide.to(dev), **kw), ref, TOL[dtype])


@pytest.mark.cuda
def test_cuda_jbu_large_radius_recomputes_weights():
    """radius 12 in float64: the taps do not fit in shared memory, weights are recomputed per class."""
    scores, guide = _jbu_inputs("cuda-r12", 1, 5, 30, 30, 64, 64, torch.float64)
    kw = {"sigma_spatial": 4.0, "sigma_range": 0.2, "radius": 12}
    ref = R.jbu_upsample(scores, guide, **kw)
    assert rel_err(CUDA_BACKEND.jbu_upsample(scores.cuda(), guide.cuda(), **kw), ref) <= 1e-10
    assert_labels_match(CUDA_BACKEND.jbu_argmax(scores.cuda(), guide.cuda(), **kw), ref, 1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS_MINE)
def test_cuda_opcheck(op):
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_cases()[op])
    torch.library.opcheck(getattr(torch.ops.ovss_fast, op).default, args)
