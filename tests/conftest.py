"""Shared fixtures and markers. Tests never touch the network."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| over finite entries; -inf entries must coincide."""
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e), "infinite entries differ"
    assert torch.equal(a[inf_a], e[inf_e]), "infinite entries differ in sign"
    fin = ~inf_e
    if not bool(fin.any()):
        return 0.0
    scale = e[fin].abs().max().clamp_min(1e-30)
    return float((a[fin] - e[fin]).abs().max() / scale)


def compile_for_sm90(kernel, constexprs: dict, num_warps: int, pointers: dict | None = None,
                     floats: set | frozenset = frozenset()):
    """Lower a Triton kernel to sm_90 code (ptxas included; no GPU needed): ``*_ptr`` arguments are ``*fp32``
    unless ``pointers`` names their type, arguments in ``floats`` fp32, the rest i32. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = pointers or {}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 3})


#: |f(l) - f(l-1)| this close to tau may settle a step apart in float32 (velocity readout)
TAU_BAND = 1e-4


def velocity_borderline(q: torch.Tensor, kernel: torch.Tensor, *, sk_iters: int, steps: int, tau: float):
    """[B, N, C] bool: where some step's float64 change |f(l) - f(l-1)| lies within TAU_BAND of tau
    (``kernel``: the matrix mode "mv" makes doubly stochastic, K or W)."""
    from ovss_fast.kernels import reference as R

    q = q.double().cpu()
    tt = R.doubly_stochastic(kernel.double().cpu(), sk_iters=sk_iters).transpose(1, 2)
    f = q.shape[1] * q
    near = torch.zeros_like(q, dtype=torch.bool)
    for _ in range(steps):
        nxt = torch.bmm(tt, f)
        near |= ((nxt - f).abs() - tau).abs() <= TAU_BAND
        f = nxt
    return near


def velocity_lstar(scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The settling step lstar of velocity scores S = lstar + f0 / (1 + f0), f0 = N q (method.md section 3)."""
    f0 = q.shape[1] * q.to(scores.dtype)
    return (scores - f0 / (1 + f0)).round()


def tiny_open_clip(seed: int = 0) -> tuple:
    """The tiny random-weight open_clip model (eval mode) and its tokenizer, built after torch.manual_seed(seed).

    For the pipeline tests' module-scoped fixtures; the caller has already imported open_clip
    (pytest.importorskip), so a machine without it skips those modules.
    """
    import warnings

    import open_clip

    from ovss_fast.models.clip_features import TINY_MODEL, register_tiny_config

    register_tiny_config()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights" warnings
        model = open_clip.create_model(TINY_MODEL, pretrained=None)
    return model.eval(), open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    """tiny_open_clip(0), built once per test module (a module using it has importorskip'ed open_clip)."""
    return tiny_open_clip(0)


def tiny_segmenter(tiny: tuple, templates: tuple, **kw):
    """Segmenter.from_model on a tiny_open_clip() pair, on the CPU, backend "reference" unless given."""
    from ovss_fast.pipeline.segmenter import Segmenter

    model, tok = tiny
    kw.setdefault("backend", "reference")
    return Segmenter.from_model(model, tok, templates=templates, device="cpu", **kw)
