"""The peers people would use instead of ovss_fast, wrapped to compute the same outputs.

Every runner takes the inputs of one benchmark cell and returns what our op returns,
so that it can be checked against the float64 reference before it is timed:

- ``op`` (sinkhorn_scores: S = mean_i f - f, f = eps log(a / (K v)) after ``iters``
  Sinkhorn iterations from v = 1, shared/method.md section 3), inputs q [B, N, C],
  kernel [B, N, N] and cost [B, N, N] (= -eps log kernel), float32:
  - ``reference eager``, ``torch.compile(reference)``, ``cpu`` (the compiled extension);
  - ``POT sinkhorn, C histograms in one call``: ``ot.sinkhorn(a, b=[N, C], M, eps,
    method="sinkhorn")`` (POT's matrix-scaling loop handles several target histograms
    with matrix products), one call per image;
  - ``POT sinkhorn_log, loop over classes``: ``ot.sinkhorn(..., method="sinkhorn_log")``,
    one call per (image, class) (POT's log-domain solver loops over histograms anyway);
  - ``POT ot.batch log-Sinkhorn``: ``ot.batch.bregman_log_projection_batch`` on the
    [B C, N, N] stack (POT's batched API; it materialises a cost per problem);
  - ``GeomLoss ot.solve_batch``: GeomLoss's tensorized solver with an explicit cost.
    It anneals eps and averages symmetric updates, so after ``iters`` iterations it is
    not the same iterate: its error and label agreement are reported, not gated.
  POT gets the warm start u = a / (K 1) (our first u-update), so that its ``iters``
  (v, u) updates give exactly our iterates; POT always starts with a v-update.
- ``jbu`` (jbu_argmax labels [B, H, W] from scores [B, C, h, w] and guide [B, 3, H, W]):
  ``reference`` (jbu_upsample then argmax), ``cpu`` (fused), and ``kornia``: bilinear
  upsampling to [H, W], ``kornia.filters.joint_bilateral_blur`` guided by the image
  (sigma_color = sigma_r, l2 colour distance), argmax; twice: 5 x 5 taps with sigma_space
  1 px (our tap count, a 16 times narrower window), and the JBU's window at full
  resolution (65 x 65 taps, sigma_space 16 px at H / h = 16). A different filter
  (full-resolution taps), so its label agreement is reported, not gated.
- ``mv`` (markov_scores): reference eager, torch.compile(reference), cpu; no peer
  computes this chain.

A peer that is not installed is returned as the string "not installed: pip install ...".
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from collections.abc import Callable

import torch

from ovss_fast.kernels import reference as R
from ovss_fast.kernels.dispatch import UnavailableBackend, get_backend

EPS, ITERS, SK_ITERS, STEPS = 0.1, 50, 15, 50
JBU_KW = {"sigma_spatial": 1.0, "sigma_range": 0.1, "radius": 2}
KORNIA_KERNEL = 5
#: optional peer (its pip name) -> (the module the runner needs, what to install)
PEERS = {"pot": ("ot", "pot"), "geomloss": ("geomloss.ot", "'geomloss>=0.3.1'"), "kornia": ("kornia.filters", "kornia"),
         "matplotlib": ("matplotlib", "matplotlib")}
#: peers to treat as missing (``--without``; also the environment variable OVSS_FAST_BENCH_WITHOUT, comma-separated)
WITHOUT: set[str] = {m for m in os.environ.get("OVSS_FAST_BENCH_WITHOUT", "").split(",") if m}

Runner = Callable[[dict], torch.Tensor]


def missing(peer: str) -> str | None:
    """None when the peer's module imports, else the row text that says how to install it."""
    module, pip = PEERS[peer]
    if peer in WITHOUT:
        return f"not installed: pip install {pip}"
    try:
        importlib.import_module(module)
    except ImportError:
        return f"not installed: pip install {pip}"
    return None


def version_of(label: str) -> str:
    """The version of the library that a row's runner uses."""
    dist = {"POT": "pot", "GeomLoss": "geomloss", "kornia": "kornia"}
    for prefix, name in dist.items():
        if label.startswith(prefix):
            try:
                return f"{name} {importlib.metadata.version(name)}"
            except importlib.metadata.PackageNotFoundError:
                return f"{name} -"
    if label in ("cpu", "cuda", "triton"):
        from bench._ext_bench import commit

        return f"ovss_fast {commit()}"
    return f"torch {torch.__version__.split('+')[0]}"


# ----------------------------------------------------------------------------- inputs

def op_inputs(B: int, N: int, C: int, *, seed: int = 0) -> dict:
    """q [B,N,C], kernel and cost [B,N,N], float64 (the check) and float32 (the runners)."""
    from bench.bench_discrepancy import inputs

    qs, ks = zip(*(inputs(N, C, seed=seed + 7919 * b + N * 1000 + C, device="cpu") for b in range(B)), strict=True)
    q64, k64 = torch.cat(qs), torch.cat(ks)
    cost64 = -EPS * torch.log(k64)  # the normalised cost C of gibbs_kernel: K = exp(-C / eps)
    return {"q64": q64, "k64": k64, "q": q64.float(), "kernel": k64.float(), "cost": cost64.float()}


def jbu_inputs(B: int, C: int, H: int, *, patch: int = 16) -> dict:
    """scores [B, C, H/16, H/16] (a ViT/16 grid) and guide [B, 3, H, H], float32."""
    from bench.bench_jbu_argmax import make_inputs

    h = max(1, H // patch)
    scores, guide = make_inputs({"B": B, "C": C, "h": h, "w": h, "H": H, "W": H})
    return {"scores": scores, "guide": guide}


# ----------------------------------------------------------------------------- op runners

def _scores_from_u(u: torch.Tensor) -> torch.Tensor:
    """Our readout from the last source scaling u [B, N, C]: S = mean_i f - f, f = eps log u."""
    f = EPS * torch.log(u.clamp_min(1e-30))
    return f.mean(dim=1, keepdim=True) - f


def _pot_matrix(x: dict) -> torch.Tensor:
    import ot

    q, k, cost = x["q"], x["kernel"], x["cost"]
    B, N, C = q.shape
    a = torch.full((N,), 1.0 / N)
    out = []
    for b in range(B):
        u0 = (a / k[b].sum(1))[:, None].expand(N, C)
        _, log = ot.sinkhorn(a, q[b], cost[b], EPS, method="sinkhorn", numItermax=ITERS, stopThr=0.0, warn=False,
                             log=True, warmstart=(torch.log(u0), torch.zeros(N, C)))
        out.append(log["u"])
    return _scores_from_u(torch.stack(out))


def _pot_log_loop(x: dict) -> torch.Tensor:
    import ot

    q, k, cost = x["q"], x["kernel"], x["cost"]
    B, N, C = q.shape
    a = torch.full((N,), 1.0 / N)
    zeros = torch.zeros(N)
    out = torch.empty(B, N, C)
    for b in range(B):
        log_u0 = torch.log(a / k[b].sum(1))
        for c in range(C):
            _, log = ot.sinkhorn(a, q[b, :, c], cost[b], EPS, method="sinkhorn_log", numItermax=ITERS, stopThr=0.0,
                                 warn=False, log=True, warmstart=(log_u0, zeros))
            out[b, :, c] = log["log_u"]
    return _scores_from_u(out.exp())


def _pot_batch(x: dict) -> torch.Tensor:
    from ot.batch import bregman_log_projection_batch

    q, cost = x["q"], x["cost"]
    B, N, C = q.shape
    logk = (-cost / EPS)[:, None].expand(B, C, N, N).reshape(B * C, N, N)
    a = torch.full((B * C, N), 1.0 / N)
    res = bregman_log_projection_batch(logk, a, q.transpose(1, 2).reshape(B * C, N), max_iter=ITERS, tol=0.0)
    _, v = res["potentials"]
    log_u = torch.log(a) - torch.logsumexp(logk + v[:, None, :], dim=2)  # our final u-update
    return _scores_from_u(log_u.reshape(B, C, N).transpose(1, 2).exp())


def _geomloss(x: dict) -> torch.Tensor:
    from geomloss import ot as got

    q, cost = x["q"], x["cost"]
    B, N, C = q.shape
    res = got.solve_batch(cost[:, None].expand(B, C, N, N).reshape(B * C, N, N), reg=EPS,
                          a=torch.full((B * C, N), 1.0 / N), b=q.transpose(1, 2).reshape(B * C, N).contiguous(),
                          max_iter=ITERS)
    f = res.potential_a.reshape(B, C, N).transpose(1, 2)
    return f.mean(dim=1, keepdim=True) - f  # the same readout: the source potential minus its mean


_COMPILED: dict[str, Callable] = {}


def _compiled(mode: str) -> Callable:
    if mode not in _COMPILED:
        if mode == "op":
            _COMPILED[mode] = torch.compile(lambda q, k: R.sinkhorn_scores(q, k, eps=EPS, iters=ITERS))
        else:
            _COMPILED[mode] = torch.compile(lambda q, k: R.markov_scores(q, k, sk_iters=SK_ITERS, steps=STEPS))
    return _COMPILED[mode]


def _ours(mode: str, name: str) -> Runner | str:
    b = get_backend(name)
    if isinstance(b, UnavailableBackend):
        return f"not available: {b.reason}"
    if mode == "op":
        return lambda x: b.sinkhorn_scores(x["q"], x["kernel"], eps=EPS, iters=ITERS)
    if mode == "mv":
        return lambda x: b.markov_scores(x["q"], x["kernel"], sk_iters=SK_ITERS, steps=STEPS)
    return lambda x: b.jbu_argmax(x["scores"], x["guide"], **JBU_KW)


def _kornia(x: dict, *, same_support: bool = False) -> torch.Tensor:
    """Bilinear upsampling, kornia's joint bilateral filter guided by the image, argmax.

    5 x 5 taps with sigma_space 1 px (as many taps as our 25, a much narrower window), or
    ``same_support``: the JBU's window in full-resolution pixels, (2 r s + 1)^2 taps with
    sigma_space = sigma_s s, s = H / h (65 x 65, sigma 16 px for a ViT/16 grid)."""
    import kornia

    scores, guide = x["scores"], x["guide"]
    up = torch.nn.functional.interpolate(scores, size=guide.shape[-2:], mode="bilinear", align_corners=False)
    s = guide.shape[-1] / scores.shape[-1] if same_support else 1.0
    kernel = 2 * round(JBU_KW["radius"] * s) + 1 if same_support else KORNIA_KERNEL
    sigma = JBU_KW["sigma_spatial"] * s
    out = kornia.filters.joint_bilateral_blur(up, guide, kernel, JBU_KW["sigma_range"], (sigma, sigma),
                                              color_distance_type="l2")
    return out.argmax(dim=1)


def runners(mode: str, device: str = "cpu") -> dict[str, Runner | str]:
    """label -> runner(inputs) for one op, or the reason it cannot run here (a row says so)."""
    out: dict[str, Runner | str] = {}
    if mode in ("op", "mv"):
        ref = R.sinkhorn_scores if mode == "op" else R.markov_scores
        kw = {"eps": EPS, "iters": ITERS} if mode == "op" else {"sk_iters": SK_ITERS, "steps": STEPS}
        out["reference eager"] = lambda x: ref(x["q"], x["kernel"], **kw)
        out["torch.compile(reference)"] = lambda x: _compiled(mode)(x["q"], x["kernel"])
    else:
        out["reference"] = lambda x: R.jbu_argmax(x["scores"], x["guide"], **JBU_KW)
    out["cpu" if device == "cpu" else "cuda"] = _ours(mode, "cpu" if device == "cpu" else "cuda")
    if device != "cpu":
        out["triton"] = _ours(mode, "triton")
    if mode == "op":
        pot = missing("pot")
        out["POT sinkhorn, C histograms in one call"] = pot or _pot_matrix
        out["POT sinkhorn_log, loop over classes"] = pot or _pot_log_loop
        if pot is None:
            try:
                importlib.import_module("ot.batch")
            except ImportError:
                pot = f"POT {importlib.metadata.version('pot')} has no ot.batch (POT >= 0.9.6)"
        out["POT ot.batch log-Sinkhorn"] = pot or _pot_batch
        out["GeomLoss ot.solve_batch (tensorized)"] = missing("geomloss") or _geomloss
        out["flash-sinkhorn"] = ("not applicable: squared-Euclidean cost between point clouds (no cost-matrix "
                                 "input) and GPU only; our cost is the affinity's")
    if mode == "jbu":
        out["kornia: bilinear + joint_bilateral_blur, 5x5"] = missing("kornia") or _kornia
        out["kornia: bilinear + joint_bilateral_blur, the JBU's window"] = missing("kornia") or functools.partial(
            _kornia, same_support=True)
    return out


#: peers that compute a different iterate or filter: their error is reported, not gated
APPROXIMATE = ("GeomLoss", "kornia")


def est_bytes(mode: str, label: str, case: dict) -> float:
    """Rough peak memory of one call, so that a cell that cannot fit is reported instead of run."""
    B, C = case["B"], case["C"]
    if mode == "jbu":
        image = 4.0 * B * C * case["H"] ** 2
        return {"reference": 6.5, "cpu": 0.0}.get(label, 6.0) * image
    N = case["N"]
    if label.startswith(("POT ot.batch", "GeomLoss")):
        return 5.0 * 4 * B * C * N * N
    return 4.0 * 4 * B * N * N + 16.0 * B * N * C


def make_inputs(case: dict) -> dict:
    """The inputs of one cell (for bench._ext_bench.peak_mem_mb, a fresh process per row)."""
    torch.set_num_threads(case.get("threads", 2))
    if case["mode"] == "jbu":
        x = jbu_inputs(case["B"], case["C"], case["H"])
    else:
        x = op_inputs(case["B"], case["N"], case["C"])
        x = {k: v for k, v in x.items() if not k.endswith("64")}
    fns = _RUNNERS.setdefault(case["mode"], runners(case["mode"]))  # imports and extension loading happen here
    for name, fn in fns.items():  # and the peers' own lazy imports, outside the measured call
        if not isinstance(fn, str) and name.startswith(("POT", "GeomLoss", "kornia")):
            importlib.import_module({"P": "ot.batch", "G": "geomloss.ot", "k": "kornia.filters"}[name[0]])
    if case.get("warm"):  # torch.compile: compile before the measured call
        fns[case["warm"]](x)
    x["mode"] = case["mode"]
    return x


_RUNNERS: dict[str, dict[str, Runner | str]] = {}


def run(inputs: dict, backend: str) -> torch.Tensor:
    """One call of ``backend`` on the inputs of make_inputs (the runner table is built there)."""
    fn = _RUNNERS.setdefault(inputs["mode"], runners(inputs["mode"]))[backend]
    assert not isinstance(fn, str), fn
    return fn(inputs)
