"""PAMR (ovss_fast.pamr; csrc/common/pamr_math.h, csrc/cpu/pamr.cpp, csrc/cuda/pamr*, reference.py).

Every backend that runs here against the float64 reference (float32 within 1e-5 relative, float64
within 1e-12) on awkward shapes: H or W smaller than the largest dilation, K = 1, C = 1, B > 1,
dilations (1, 2, 4, 8, 12, 24) with 50 iterations. The reference itself against an independent
transcription of the peers' module written here (replicate padding + a dilated 3 x 3 unfold: a test
oracle may unfold), and, when OVSS_FAST_NACLIP=/path/to/NACLIP is set, against NACLIP's own ``PAMR``
module imported from that checkout. Validation, opcheck, threads, the memory bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from test_ext import _gen

import ovss_fast
from ovss_fast.kernels import reference as R

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
NACLIP = os.environ.get("OVSS_FAST_NACLIP")

CASES = [
    # id, scores shape, image shape, iters, dilations
    ("default", (2, 5, 9, 12), (2, 3, 37, 45), 10, (8, 16)),  # B > 1, resized, NACLIP's default
    ("small-image", (1, 4, 3, 4), (1, 3, 7, 12), 10, (8, 16)),  # H, W smaller than both dilations
    ("k1-c1", (1, 1, 6, 5), (1, 1, 21, 19), 10, (8, 16)),  # K = 1, C = 1
    ("extended", (1, 3, 8, 10), (1, 3, 33, 41), 50, (1, 2, 4, 8, 12, 24)),  # NACLIP's --pamr extended
    ("same-size", (2, 7, 13, 11), (2, 2, 13, 11), 4, (1, 3)),  # no resize, K = 2
    ("one-row", (1, 2, 1, 6), (1, 5, 1, 17), 3, (2,)),  # H = 1
    ("repeat", (1, 3, 5, 5), (1, 3, 16, 9), 2, (4, 4, 1)),  # a repeated dilation (the peers allow it)
]
IDS = [c[0] for c in CASES]


def _inputs(key, scores_shape, image_shape, dtype=torch.float64):
    g = _gen("pamr", key, scores_shape, image_shape)
    scores = torch.randn(scores_shape, generator=g, dtype=torch.float64)
    image = torch.randn(image_shape, generator=g, dtype=torch.float64)
    return scores.to(dtype), image.to(dtype)


def _oracle(scores, image, iters, dilations):
    """The peers' module transcribed independently (float64): replicate padding, dilated 3 x 3 unfolds."""
    B, K, H, W = image.shape
    m = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=True)
    C = m.shape[1]

    def neighbourhoods(x):  # [N, 1, H, W] -> [N, 9 len(dilations), H W], centre at 4 + 9 i
        return torch.cat([F.unfold(F.pad(x, [d] * 4, mode="replicate"), 3, dilation=d) for d in dilations], 1)

    taps = neighbourhoods(image.reshape(B * K, 1, H, W)).reshape(B, K, 9 * len(dilations), H * W)
    keep = [i for i in range(9 * len(dilations)) if i % 9 != 4]
    centre = image.reshape(B, K, 1, H * W)
    std = taps.std(2, keepdim=True)
    logits = (-(centre - taps[:, :, keep]).abs() / (1e-8 + 0.1 * std)).mean(1)  # [B, P, H W]
    aff = logits.softmax(1).unsqueeze(1)
    for _ in range(iters):
        nb = neighbourhoods(m.reshape(B * C, 1, H, W)).reshape(B, C, -1, H * W)[:, :, keep]
        m = (nb * aff).sum(2).reshape(B, C, H, W)
    return m


def _backend_or_skip(name, scores, image, params):
    from ovss_fast.kernels.dispatch import get_backend

    backend = get_backend(name)
    reasons = backend.unsupported_reasons("pamr", (scores, image), params)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    return backend


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda: CUDA is not available")
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_an_independent_transcription(case):
    _, ss, ish, iters, dil = case
    iters = min(iters, 12)  # the oracle's unfolds are slow; 12 steps show the same steps
    scores, image = _inputs("oracle", ss, ish)
    assert rel_err(R.pamr(scores, image, iters=iters, dilations=dil), _oracle(scores, image, iters, dil)) <= 1e-13


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
def test_backends_against_float64(backend, dtype, case):
    _, ss, ish, iters, dil = case
    scores, image = _inputs((backend, dtype), ss, ish, dtype)
    dev = _device(backend)
    scores, image = scores.to(dev), image.to(dev)
    params = {"iters": iters, "dilations": dil}
    _backend_or_skip(backend, scores, image, params)
    ref = R.pamr(scores.double().cpu(), image.double().cpu(), iters=iters, dilations=dil)
    out = ovss_fast.pamr(scores, image, iters=iters, dilations=dil, backend=backend)
    assert out.shape == ref.shape and out.dtype == dtype and out.device.type == dev
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_half_inputs_are_computed_in_float32(backend):
    dev = _device(backend)
    for dtype in (torch.float16, torch.bfloat16):
        scores, image = (t.to(dev) for t in _inputs(("half", dtype), (1, 3, 5, 6), (1, 3, 20, 18), dtype))
        _backend_or_skip(backend, scores, image, {"iters": 10, "dilations": (8, 16)})
        out = ovss_fast.pamr(scores, image, backend=backend)
        assert out.dtype == torch.float32
        assert rel_err(out, R.pamr(scores.double().cpu(), image.double().cpu())) <= 1e-5


@pytest.mark.skipif(not NACLIP, reason="set OVSS_FAST_NACLIP=/path/to/NACLIP to compare with NACLIP's PAMR module")
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
def test_backends_against_naclip_module(backend, case):
    """NACLIP's ``PAMR`` run in float64 (its affinity buffer takes the default dtype, so it is set to float64)."""
    sys.path.insert(0, NACLIP)
    try:
        from pamr import PAMR
    finally:
        sys.path.remove(NACLIP)
    _, ss, ish, iters, dil = case
    scores, image = _inputs(("naclip", backend), ss, ish)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = PAMR(iters, list(dil))(image, scores)
    finally:
        torch.set_default_dtype(before)
    dev = _device(backend)
    for dtype in (torch.float32, torch.float64):
        s, im = scores.to(dev, dtype), image.to(dev, dtype)
        if _backend_or_skip_soft(backend, s, im, {"iters": iters, "dilations": dil}):
            continue
        assert rel_err(ovss_fast.pamr(s, im, iters=iters, dilations=dil, backend=backend), theirs) <= TOL[dtype]


def _backend_or_skip_soft(name, scores, image, params) -> bool:
    from ovss_fast.kernels.dispatch import get_backend

    reasons = get_backend(name).unsupported_reasons("pamr", (scores, image), params)
    if reasons and name in ("reference", "cpu"):
        raise AssertionError(reasons)
    return bool(reasons)


def test_non_contiguous_inputs():
    scores, image = _inputs("strided", (2, 4, 7, 9), (2, 3, 19, 23))
    s = scores.transpose(2, 3).contiguous().transpose(2, 3)
    im = torch.cat([image, image], 1)[:, ::2]  # a channel-strided view
    assert not s.is_contiguous() and not im.is_contiguous()
    ref = R.pamr(scores, im.contiguous(), iters=5)
    for dtype in (torch.float32, torch.float64):
        out = ovss_fast.pamr(s.to(dtype), im.to(dtype), iters=5, backend="cpu")
        assert rel_err(out, ref) <= TOL[dtype]
    same = torch.randn(2, 4, 23, 19, dtype=torch.float64).transpose(2, 3)  # same size, non-contiguous
    assert rel_err(ovss_fast.pamr(same, im, iters=3, backend="cpu"), R.pamr(same, im, iters=3)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_iterations_return_the_resized_scores(dtype):
    scores, image = _inputs("iters0", (2, 3, 4, 5), (2, 3, 11, 13), dtype)
    out = ovss_fast.pamr(scores, image, iters=0, backend="cpu")
    assert torch.equal(out, F.interpolate(scores, size=(11, 13), mode="bilinear", align_corners=True))
    same, _ = _inputs("iters0-same", (2, 3, 11, 13), (1,), dtype)
    out = ovss_fast.pamr(same, image, iters=0, backend="cpu")
    assert torch.equal(out, same) and out.data_ptr() != same.data_ptr()  # a copy, never the caller's tensor


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_same_size_scores_are_not_modified(iters):
    scores, image = _inputs(("keep", iters), (1, 4, 12, 10), (1, 3, 12, 10), torch.float32)
    kept = scores.clone()
    out = ovss_fast.pamr(scores, image, iters=iters, backend="cpu")
    assert torch.equal(scores, kept) and out.data_ptr() != scores.data_ptr()
    assert rel_err(out, R.pamr(scores.double(), image.double(), iters=iters)) <= 1e-5


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    from ovss_fast.kernels.dispatch import select

    scores, image = _inputs("auto", (1, 2, 3, 3), (1, 3, 8, 8), torch.float32)
    assert select("pamr", "auto", (scores, image), {"iters": 1, "dilations": (1,)}).name == "cpu"


def test_validation_errors():
    scores, image = _inputs("errors", (1, 3, 4, 5), (1, 3, 10, 12), torch.float32)
    cases = [
        ((scores[0], image), {}, ValueError, r"scores"),
        ((scores, image[0]), {}, ValueError, r"image"),
        ((scores, torch.cat([image, image])), {}, ValueError, r"image has B = 2 .* scores has B = 1"),
        ((scores, image[:, :0]), {}, ValueError, r"image has K = 0"),
        ((scores, image), {"dilations": ()}, ValueError, r"dilations must hold at least one"),
        ((scores, image), {"dilations": (8, 0)}, ValueError, r"dilations\[1\]"),
        ((scores, image), {"dilations": (8, 2.5)}, TypeError, r"dilations\[1\]"),
        ((scores, image), {"dilations": 8}, TypeError, r"dilations must be a sequence"),
        ((scores, image), {"dilations": "8"}, TypeError, r"dilations must be a sequence"),
        ((scores, image), {"iters": -1}, ValueError, r"iters"),
        ((scores, image), {"iters": 2.0}, TypeError, r"iters"),
        ((scores.clone().index_fill_(3, torch.tensor([1]), float("nan")), image), {}, ValueError, r"scores"),
        ((scores, image.clone().index_fill_(2, torch.tensor([0]), float("inf"))), {}, ValueError, r"image"),
        ((scores.clone().requires_grad_(True), image), {}, ValueError, r"scores requires grad"),
        ((scores, image.clone().requires_grad_(True)), {}, ValueError, r"image requires grad"),
        ((scores, image), {"backend": "nope"}, ValueError, r"backend"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            ovss_fast.pamr(*args, **kwargs)


def test_kernel_checks_name_the_argument():
    op = torch.ops.ovss_fast.pamr
    scores, image = _inputs("cpp", (1, 3, 4, 5), (1, 3, 10, 12), torch.float32)
    cases = [
        ((scores[0], image, 1, [1]), r"scores should be a 4D tensor"),
        ((scores, image.int(), 1, [1]), r"image has unsupported dtype"),
        ((scores, torch.cat([image, image]), 1, [1]), r"image has B = 2"),
        ((scores, image, -1, [1]), r"iters must be >= 0, got -1"),
        ((scores, image, 1, []), r"dilations must hold at least one"),
        ((scores, image, 1, [3, 0]), r"dilations\[1\] must be a positive integer"),
        ((scores[:, :, :0], image, 1, [1]), r"scores has an empty grid"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    assert op(scores[:0], image[:0], 2, [1]).shape == (0, 3, 10, 12)


def test_opcheck():
    scores, image = _inputs("opcheck", (2, 3, 4, 5), (2, 2, 9, 7), torch.float32)
    torch.library.opcheck(torch.ops.ovss_fast.pamr.default, (scores, image, 3, [1, 4]))
    torch.library.opcheck(torch.ops.ovss_fast.pamr.default, (scores.double(), image.double(), 2, [2]))
    same = torch.randn(2, 3, 9, 7)
    torch.library.opcheck(torch.ops.ovss_fast.pamr.default, (same, image, 0, [1]))


def test_same_results_on_one_and_two_threads():
    scores, image = _inputs("threads", (2, 5, 9, 11), (2, 3, 61, 47), torch.float32)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append([ovss_fast.pamr(s, i, backend="cpu") for s, i in ((scores, image), (scores.double(),
                                                                                             image.double()))])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one, two)


_MEMORY_CHILD = textwrap.dedent("""
    import sys, torch, ovss_fast
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    B, C, K, H, W = 1, 64, 3, 256, 256
    scores, image = torch.randn(B, C, H, W), torch.randn(B, K, H, W)
    ovss_fast.pamr(scores[:, :, :8, :8], image[:, :, :8, :8], backend="cpu")  # load everything first
    base = hwm()
    out = ovss_fast.pamr(scores, image, iters=10, dilations=(8, 16), backend="cpu")
    print(hwm() - base, out.numel() * 4)
""")


def test_peak_memory_is_two_buffers_plus_affinities():
    """The unfold the peers build ([B, C, P, H, W] float32, 268 MB here) would break the bound by far."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    growth, out_bytes = map(int, res.stdout.split())
    P, HW, K = 16, 256 * 256, 3
    bound = 3 * out_bytes + P * HW * (8 + 4) + K * HW * 8 + (16 << 20)
    assert growth <= bound, (growth, bound)

