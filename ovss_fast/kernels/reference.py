"""The method of ``shared/method.md`` in plain PyTorch: the specification, executable.

Every backend (C++ CPU, CUDA, Triton) is tested against these functions run in
float64. They take already-validated tensors (see :mod:`ovss_fast.ops.validate`);
the public API in :mod:`ovss_fast.ops` validates and then dispatches here when
``backend="reference"``.

Computation happens in ``compute_dtype(x)``: float64 stays float64, everything else
(float16, bfloat16, float32) is computed in float32 (method.md: "all reductions
accumulate in float32 at least").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.kernels.common import (
    EPS,
    ITERS,
    NMS_AXES,
    RADIUS,
    SIGMA_RANGE,
    SIGMA_SPATIAL,
    SK_ITERS,
    STEPS,
    TAU,
    TRANSITIONS,
    compute_dtype,
    lowres_guide,
    symmetric_knn_graph,
    tap_geometry,
)

#: Divisions floor their denominators here (method.md section 3; a normal float32).
DENOM_FLOOR = 1e-30
#: Added to Sym / M, the symmetrised affinity over its per-image max, before the log (method.md section 2).
LOG_FLOOR = 1e-12


# --------------------------------------------------------------------------- section 1
def class_distributions(feats: Tensor, text: Tensor, *, scale: float = 100.0, nms: float = 0.0,
                        nms_axis: str = "classes") -> Tensor:
    """Q[b,:,c]: each class's distribution over patches (method.md section 1).

    feats: [B, N, D]; text: [C, D] -> Q: [B, N, C]. NMS (ratio ``nms``, 0 = off) zeroes
    P[b,i,c] below nms times the largest probability of its patch (``nms_axis="classes"``,
    over c') or of its class (``nms_axis="patches"``, over patches i').
    """
    if nms_axis not in NMS_AXES:
        raise InputError(f"nms_axis must be one of {', '.join(map(repr, NMS_AXES))}; got {nms_axis!r}")
    dt = compute_dtype(feats, text)
    # cosine: normalise both sides; a zero vector gets cosine 0 rather than NaN
    x = unit_vectors(feats.to(dt))
    t = unit_vectors(text.to(dt))
    logits = scale * torch.einsum("bnd,cd->bnc", x, t)
    p = torch.softmax(logits, dim=-1)
    if nms > 0:
        p = suppress_weak(p, nms, dim=-1 if nms_axis == "classes" else 1)
    return normalise_columns(p)


def suppress_weak(p: Tensor, nms: float, dim: int) -> Tensor:
    """p with 0 wherever p < nms * (its max along ``dim``): dim=-1 is the "classes" NMS rule, dim=1 "patches"."""
    return torch.where(p < nms * p.amax(dim=dim, keepdim=True), torch.zeros_like(p), p)


def normalise_columns(p: Tensor) -> Tensor:
    """[B, N, C]: each column divided by its sum over patches; a column summing to 0 stays 0."""
    colsum = p.sum(dim=1, keepdim=True)  # [B, 1, C]
    return torch.where(colsum > 0, p / colsum.clamp_min(DENOM_FLOOR), torch.zeros_like(p))


def suppress_patches(q: Tensor, nms: float) -> Tensor:
    """The "patches" NMS applied after the fact to Q = class_distributions(..., nms=0).

    Q[:, c] = P[:, c] / s_c with s_c > 0 (or Q[:, c] = 0 = P[:, c]), so P < nms * max_i P
    exactly where Q < nms * max_i Q, and renormalising the kept part of Q's column gives
    the kept part of P's column over its sum: the result equals
    ``class_distributions(..., nms=nms, nms_axis="patches")`` up to rounding (an entry
    within an ulp of the threshold may fall on either side). Backends without the
    patches rule in their kernel run this post-pass (ops.class_distributions).
    """
    return normalise_columns(suppress_weak(q, nms, dim=1)) if nms > 0 else q


def unit_vectors(v: Tensor) -> Tensor:
    """v / |v| along the last axis, computed on v / max|v| (cos is scale-invariant): the sum of
    squares neither overflows (|v| near 1e30 in float32) nor underflows (near 1e-30). A zero
    vector stays zero (its norm is floored at 1e-30)."""
    m = v.abs().amax(dim=-1, keepdim=True)
    v = v / torch.where(m > 0, m, torch.ones_like(m))
    return v / v.norm(dim=-1, keepdim=True).clamp_min(DENOM_FLOOR)


def dead_classes(q: Tensor) -> Tensor:
    """[B, C] bool: classes whose distribution is all zero (possible only with NMS)."""
    return q.sum(dim=1) <= 0


# --------------------------------------------------------------------------- section 2
def scaled_affinity(affinity: Tensor) -> Tensor:
    """Sym / M (method.md sections 2 and 3): Sym = (A + A^T) / 2, M its max over each image;
    an image whose Sym is all 0 (M = 0) stays all 0. [B, N, N] -> [B, N, N] in [0, 1], symmetric."""
    a = affinity.to(compute_dtype(affinity))
    sym = 0.5 * a + 0.5 * a.transpose(1, 2)  # halved first: (A + A^T) overflows near the float32 maximum
    m = sym.amax(dim=(1, 2), keepdim=True)
    return sym / torch.where(m > 0, m, torch.ones_like(m))


def gibbs_kernel(affinity: Tensor, *, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Cost C in [0, 1] and Gibbs kernel K = exp(-C / eps) (method.md section 2).

    affinity: [B, N, N] (non-negative) -> (cost [B, N, N], kernel [B, N, N]). The cost is
    scale-free: Craw = -log(Sym / M + 1e-12), so A and 7 * A (or 1e-20 * A) give the same C.
    """
    craw = -torch.log(scaled_affinity(affinity) + LOG_FLOOR)
    lo = craw.amin(dim=(1, 2), keepdim=True)
    hi = craw.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    cost = torch.where(span > 0, (craw - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(craw))
    kernel = torch.exp(-cost / eps)
    return cost, kernel


def attention_transition(affinity: Tensor) -> Tensor:
    """W = Sym / M, the matrix ``transition="attention"`` (paper) makes doubly stochastic (method.md section 3).

    affinity: [B, N, N] (non-negative) -> W [B, N, N], symmetric, in [0, 1]. M = 0 (an all-zero
    affinity) gives W = 0: Sinkhorn-Knopp leaves it 0 (its denominators are floored), so the
    chain empties, f(l) = 0 for every l >= 1: "integrated" scores -steps for every live class
    (a tie, which argmax gives to the lowest class) and "velocity" settles at l = 1 or 2.
    A zero row of W (a patch with no affinity at all) likewise drains that patch to 0.
    """
    return scaled_affinity(affinity)


def markov_transition(affinity: Tensor, *, transition: str = "attention", eps: float = EPS) -> Tensor:
    """The matrix mode "mv" makes doubly stochastic: K of :func:`gibbs_kernel` ("gibbs", ours) or
    W of :func:`attention_transition` ("attention", paper). [B, N, N] -> [B, N, N]."""
    if transition == "gibbs":
        return gibbs_kernel(affinity, eps=eps)[1]
    if transition == "attention":
        return attention_transition(affinity)
    raise InputError(f"transition must be one of {', '.join(map(repr, TRANSITIONS))}; got {transition!r}")


# --------------------------------------------------------------------------- section 3
def _mask_dead(scores: Tensor, q: Tensor) -> Tensor:
    dead = dead_classes(q)  # [B, C]
    if bool(dead.any()):
        scores = scores.masked_fill(dead[:, None, :], float("-inf"))
    return scores


def kl_scores(q: Tensor) -> Tensor:
    """Per-patch term of KL(Q || 1/N): Q log(N Q), 0 where Q = 0.  q: [B, N, C] -> [B, N, C]."""
    dt = compute_dtype(q)
    q = q.to(dt)
    n = q.shape[1]
    safe = torch.where(q > 0, q, torch.ones_like(q))
    s = torch.where(q > 0, q * torch.log(n * safe), torch.zeros_like(q))
    return _mask_dead(s, q)


def _sinkhorn_iterate(q: Tensor, kernel: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """The op iteration from v = 1: ``iters`` times u = a / (K v), v = q / (K^T u).

    Returns (q, K, v, a) in the compute dtype; the caller ends with its own u-update."""
    dt = compute_dtype(q, kernel)
    q = q.to(dt)
    k = kernel.to(dt)
    a = 1.0 / q.shape[1]
    v = torch.ones_like(q)
    kt = k.transpose(1, 2)
    for _ in range(iters):
        u = a / torch.bmm(k, v).clamp_min(DENOM_FLOOR)
        v = q / torch.bmm(kt, u).clamp_min(DENOM_FLOOR)
    return q, k, v, a


def sinkhorn_scores(q: Tensor, kernel: Tensor, *, eps: float = EPS, iters: int = ITERS) -> Tensor:
    """Optimal-path scores: entropic OT from 1/N to each class (method.md section 3, op).

    q: [B, N, C] (targets b = Q[:, c]); kernel: [B, N, N] -> S: [B, N, C] with
    S[i, c] = mean_i(f) - f[i], f = eps * log(a / (K v)) the source potential.
    """
    q, k, v, a = _sinkhorn_iterate(q, kernel, iters)
    kv = torch.bmm(k, v).clamp_min(DENOM_FLOOR)
    f = eps * torch.log(a / kv)
    s = f.mean(dim=1, keepdim=True) - f
    return _mask_dead(s, q)


def sinkhorn_plan(q: Tensor, kernel: Tensor, *, iters: int = ITERS) -> Tensor:
    """The analytic solution pi = diag(u) K diag(v) for every class (tests only).

    q: [B, N, C]; kernel: [B, N, N] -> plan: [B, C, N, N]. Uses the same iteration
    as :func:`sinkhorn_scores` and ends with a u-update, so rows sum to 1/N exactly.
    """
    q, k, v, a = _sinkhorn_iterate(q, kernel, iters)
    u = a / torch.bmm(k, v).clamp_min(DENOM_FLOOR)
    # [B, C, N, N]
    return u.transpose(1, 2)[:, :, :, None] * k[:, None] * v.transpose(1, 2)[:, :, None, :]


def doubly_stochastic(kernel: Tensor, *, sk_iters: int = SK_ITERS) -> Tensor:
    """Sinkhorn-Knopp / IPF: normalise rows then columns, sk_iters times.  [B, N, N] -> [B, N, N]."""
    t = kernel.to(compute_dtype(kernel))
    for _ in range(sk_iters):
        t = t / t.sum(dim=2, keepdim=True).clamp_min(DENOM_FLOOR)
        t = t / t.sum(dim=1, keepdim=True).clamp_min(DENOM_FLOOR)
    return t


def markov_scores(q: Tensor, kernel: Tensor, *, sk_iters: int = SK_ITERS, steps: int = STEPS,
                  readout: str = "integrated",
                  tau: float = TAU) -> Tensor:
    """Maximum-velocity scores from the chain f(l) = f(l-1) T (method.md section 3, mv).

    q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C].
    readout "integrated": S = sum_{l=1..steps} (f(l) - 1).
    readout "velocity":   S = lstar + f(0) / (1 + f(0)), lstar the first l >= 1 with
    |f(l) - f(l-1)| <= tau (steps + 1 if never): the class whose chain settles last wins
    (the paper), ties (same lstar) go to the stronger initial evidence f(0) = N q.
    ``kernel`` is the transition before Sinkhorn-Knopp: K (gibbs) or W (attention).
    """
    dt = compute_dtype(q, kernel)
    q = q.to(dt)
    n = q.shape[1]
    # f(l) = T^T f(l-1). Sinkhorn-Knopp runs in float64 whatever the compute dtype: the
    # chain adds T's column-sum drift about `steps` times, and a float32 T cannot see it
    # (float32 SK alone costs ~1e-4 of float64 at N = 2304). The C++ and Triton
    # backends likewise keep their SK scalings in float64.
    tt = doubly_stochastic(kernel.double(), sk_iters=sk_iters).transpose(1, 2).to(dt)
    f0 = n * q
    # The chain is carried as its deviation d = f - 1 from the uniform level:
    # d(l) = T^T d(l-1) + (T^T 1 - 1). The same numbers in exact arithmetic, but f - 1
    # cancels badly in float32 as the chain mixes (past 1e-4 of float64 at N ~ 800).
    drift = (tt.double().sum(dim=2, keepdim=True) - 1.0).to(dt)  # [B, N, 1]: T's column sums - 1
    d = f0 - 1.0
    if readout == "integrated":
        acc = torch.zeros_like(q)
        for _ in range(steps):
            d = torch.bmm(tt, d) + drift
            acc = acc + d
        s = acc
    elif readout == "velocity":
        lstar = torch.full_like(q, float(steps + 1))
        for step in range(1, steps + 1):
            nxt = torch.bmm(tt, d) + drift
            settled = ((nxt - d).abs() <= tau) & (lstar > steps)
            lstar = torch.where(settled, torch.full_like(lstar, float(step)), lstar)
            d = nxt
        s = lstar + f0 / (1.0 + f0)
    else:
        raise InputError(f"readout must be 'integrated' or 'velocity', got {readout!r}")
    return _mask_dead(s, q)


# --------------------------------------------------------------------------- section 4
def _jbu_taps(scores: Tensor, guide: Tensor, radius: int):
    """Per tap, in tap order (dy outer, dx inner): valid [H, W], rows qy [H] and columns qx [W] (unclamped),
    their clamped copies, offsets dy = qy - p'y [H], dx = qx - p'x [W], Gd at the taps [B, 3, H, W] as
    hi and lo, and a = G - Gd = (G - hi) - lo."""
    B, C, h, w = scores.shape
    H, W = guide.shape[-2:]
    dt = compute_dtype(scores, guide)
    g = guide.to(dt)
    gd_hi, gd_lo = lowres_guide(g, h, w, dt)  # [B, 3, h, w] each
    py, px, cy, cx = tap_geometry(h, w, H, W, radius, g.device, dt)
    for dy in range(-radius, radius + 1):
        qy = cy + dy  # [H]
        vy = (qy >= 0) & (qy < h)
        qyc = qy.clamp(0, h - 1)
        for dx in range(-radius, radius + 1):
            qx = cx + dx  # [W]
            vx = (qx >= 0) & (qx < w)
            qxc = qx.clamp(0, w - 1)
            valid = vy[:, None] & vx[None, :]  # [H, W]
            hi = gd_hi[:, :, qyc][:, :, :, qxc]  # [B, 3, H, W]
            lo = gd_lo[:, :, qyc][:, :, :, qxc]
            yield valid, qy, qx, qyc, qxc, qy.to(dt) - py, qx.to(dt) - px, hi, lo, (g - hi) - lo


def _jbu_relative_exponents(scores: Tensor, guide: Tensor, sigma_spatial: float, sigma_range: float, radius: int):
    """Per tap: r = e(q) - e(m) [B, H, W] (-inf off the grid), valid, qyc, qxc; m is the pixel's tap of the
    largest exponent e(q) = -|q - p'|^2 / (2 sigma_s^2) - |G[p] - Gd[q]|^2 / (2 sigma_r^2).

    r is formed from differences of squares written as products, (a^2 - b^2) = (a - b)(a + b),
    whose factors are differences of nearby numbers: subtracting two large exponents in
    float32 (sigma_r = 1e-3 makes them ~1e5) would cancel to a few correct digits.
    """
    dt = compute_dtype(scores, guide)
    g = guide.to(dt)
    inv_s = 1.0 / (2.0 * sigma_spatial**2)
    inv_r = 1.0 / (2.0 * sigma_range**2)
    B, H, W = g.shape[0], g.shape[2], g.shape[3]
    # the peak tap m of every pixel (the first of the largest exponents, in tap order)
    emax = torch.full((B, H, W), float("-inf"), dtype=dt, device=g.device)
    mqy = torch.zeros((B, H, W), dtype=dt, device=g.device)
    mqx, mdy, mdx = torch.zeros_like(mqy), torch.zeros_like(mqy), torch.zeros_like(mqy)
    mhi, mlo, ma = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
    for valid, qy, qx, _, _, dyq, dxq, hi, lo, a in _jbu_taps(scores, guide, radius):
        ds = dyq[:, None] ** 2 + dxq[None, :] ** 2  # [H, W]
        dr = (a**2).sum(dim=1)  # [B, H, W]
        expo = torch.where(valid, -ds * inv_s - dr * inv_r, torch.full_like(dr, float("-inf")))
        better = expo > emax
        emax = torch.where(better, expo, emax)
        mqy = torch.where(better, qy.to(dt)[:, None], mqy)
        mqx = torch.where(better, qx.to(dt)[None, :], mqx)
        mdy = torch.where(better, dyq[:, None], mdy)
        mdx = torch.where(better, dxq[None, :], mdx)
        mhi = torch.where(better[:, None], hi, mhi)
        mlo = torch.where(better[:, None], lo, mlo)
        ma = torch.where(better[:, None], a, ma)
    for valid, qy, qx, qyc, qxc, dyq, dxq, hi, lo, a in _jbu_taps(scores, guide, radius):
        # |q - p'|^2 - |m - p'|^2 = (qy - my)(dyq + dym) + (qx - mx)(dxq + dxm)
        ds = (qy.to(dt)[:, None] - mqy) * (dyq[:, None] + mdy) + (qx.to(dt)[None, :] - mqx) * (dxq[None, :] + mdx)
        # |G - Gd[q]|^2 - |G - Gd[m]|^2 = sum over RGB of (Gd[m] - Gd[q]) (a_q + a_m)
        dr = (((mhi - hi) + (mlo - lo)) * (a + ma)).sum(dim=1)
        r = torch.where(valid, -ds * inv_s - dr * inv_r, torch.full_like(dr, float("-inf")))
        yield r, valid, qyc, qxc


def jbu_upsample(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL,
                 sigma_range: float = SIGMA_RANGE,
                 radius: int = RADIUS) -> Tensor:
    """Joint bilateral upsampling (Kopf et al. 2007; method.md section 4).

    scores: [B, C, h, w]; guide: [B, 3, H, W] in [0, 1] -> [B, C, H, W].
    """
    dt = compute_dtype(scores, guide)
    s = scores.to(dt)
    B, C, h, w = s.shape
    H, W = guide.shape[-2:]
    # the exponents relative to each pixel's peak tap; their max (0 up to rounding) stabilises exp
    args = (s, guide, sigma_spatial, sigma_range, radius)
    rmax = torch.full((B, H, W), float("-inf"), dtype=dt, device=s.device)
    for r, _, _, _ in _jbu_relative_exponents(*args):
        rmax = torch.maximum(rmax, r)
    num = torch.zeros((B, C, H, W), dtype=dt, device=s.device)
    den = torch.zeros((B, H, W), dtype=dt, device=s.device)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=s.device)
    for r, valid, qyc, qxc in _jbu_relative_exponents(*args):
        wgt = torch.exp(r - rmax)  # [B, H, W]; taps off the grid: exp(-inf) = 0
        sq = s[:, :, qyc][:, :, :, qxc]  # [B, C, H, W]
        # a -inf score (a dead class) at any tap on the grid makes the pixel -inf, even
        # where its weight underflowed to 0; taps off the grid contribute nothing
        term = torch.where(valid, wgt[:, None] * sq, torch.zeros_like(sq))
        term = torch.where(valid & (sq == float("-inf")), neg_inf, term)
        num = num + term
        den = den + wgt
    return num / den[:, None]


def jbu_argmax(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL, sigma_range: float = SIGMA_RANGE,
               radius: int = RADIUS) -> Tensor:
    """Labels of the upsampled scores: argmax over classes, ties to the lowest index.

    scores: [B, C, h, w]; guide: [B, 3, H, W] -> labels [B, H, W] int64.
    """
    up = jbu_upsample(scores, guide, sigma_spatial=sigma_spatial, sigma_range=sigma_range, radius=radius)
    return up.argmax(dim=1)


# --------------------------------------------------------------------------- refiners: PAMR
#: PAMR's 8 neighbours of a pixel per dilation d, as (dy, dx) in units of d: the 3 x 3 square minus its centre,
#: row by row (Araslanov and Roth, CVPR 2020; the order does not change the result: a softmax and a sum over them)
PAMR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _replicate_shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x [..., H, W] read at (y + dy, x + dx), clamped to the border (replicate padding)."""
    H, W = x.shape[-2:]
    ys = torch.arange(H, device=x.device).add(dy).clamp_(0, H - 1)
    xs = torch.arange(W, device=x.device).add(dx).clamp_(0, W - 1)
    return x.index_select(-2, ys).index_select(-1, xs)


def pamr_affinity(image: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """PAMR's affinities a [B, P, H, W] (P = 8 len(dilations)), each pixel's summing to 1 over P.

    Per channel k: s_k = the unbiased standard deviation of the 9 len(dilations) values of the pixel's dilated
    3 x 3 neighbourhoods taken together (the centre once per dilation; replicate padding);
    e_kj = -|x_k - x_kj| / (1e-8 + 0.1 s_k); a_j = softmax over the P neighbours j of the mean of e_kj over k.
    """
    dt = compute_dtype(image)
    x = image.to(dt)
    taps = []  # the 9 len(dilations) values of the std, centre first per dilation
    for d in dilations:
        taps.append(x)
        taps.extend(_replicate_shift(x, dy * d, dx * d) for dy, dx in PAMR_OFFSETS)
    std = torch.stack(taps, 2).std(2)  # [B, K, H, W] (unbiased)
    denom = 1e-8 + 0.1 * std
    logits = torch.stack([-(x - t).abs().div(denom).mean(1) for i, t in enumerate(taps) if i % 9], 1)
    return torch.softmax(logits, 1)  # [B, P, H, W]


def pamr(scores: Tensor, image: Tensor, *, iters: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """Pixel-adaptive mask refinement (PAMR), as the peers ship it (NACLIP's and SCLIP's ``PAMR`` module).

    scores [B, C, h, w] (bilinearly resized to the image's H x W with align_corners=True when the sizes
    differ), image [B, K, H, W] (any K; the peers pass the mean/std-normalised image) -> [B, C, H, W]:
    ``iters`` times, every pixel's scores become the affinity-weighted sum of its P = 8 len(dilations)
    neighbours' (the centre itself is not one; neighbours off the image read the border: replicate
    padding), with the affinities of :func:`pamr_affinity` (computed in float64, then rounded to the compute
    dtype). Float64 for float64 inputs, else float32.
    """
    dt = compute_dtype(scores, image)
    H, W = image.shape[-2:]
    m = scores.to(dt)
    if m.shape[-2:] != (H, W):
        m = torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)
    # the affinities in float64, rounded once: float32 ones put 1.4e-5 of relative error into 50 float32 steps
    # with dilations (1, 2, 4, 8, 12, 24) (the kernels do the same: csrc/common/pamr_math.h)
    a = pamr_affinity(image.to(torch.float64), tuple(dilations)).to(dt)  # [B, P, H, W]
    shifts = [(dy * d, dx * d) for d in dilations for dy, dx in PAMR_OFFSETS]
    for _ in range(iters):
        out = torch.zeros_like(m)
        for j, (dy, dx) in enumerate(shifts):
            out += a[:, j : j + 1] * _replicate_shift(m, dy, dx)
        m = out
    return m


# --------------------------------------------------------------------------- refiners: LPOSS / LPOSS+
# Label propagation of LPOSS (Stojnic, Kalantidis, Tolias, CVPR 2025; vladan-stojnic/LPOSS,
# segmentation/evaluation/lposs_eval.py). docs/lposs.md lists each fact taken from their code with its line.


def propagation_cg(apply_s: Callable[[Tensor], Tensor], b: Tensor, *, alpha: float, iters: int, tol: float,
                   dims: tuple[int, ...]) -> Tensor:
    """Solve (I - alpha S) x = b by conjugate gradient, every column at once, each on its own schedule.

    ``apply_s(p)`` returns S p for p shaped like b; a column is the slice of b over ``dims`` (a class of an image).
    Per column, as cupyx.scipy.sparse.linalg.cg with x0 = 0 and M = I: a column with ||b|| = 0 returns b (zeros);
    otherwise at most ``iters`` steps, stopping after the first step whose residual has ||r|| <= tol ||b||. A
    column that stopped is frozen (its step size is 0) while the others go on.
    """
    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(dims, keepdim=True)

    x = torch.zeros_like(b)
    r = b.clone()
    rho = dot(r, r)
    atol = tol * rho.sqrt()
    active = rho > 0
    p = r.clone()
    zero = torch.zeros_like(rho)
    for _ in range(iters):
        if not bool(active.any()):
            break
        q = p - alpha * apply_s(p)
        step = torch.where(active, rho / dot(p, q), zero)  # frozen columns take no step
        x = x + step * p
        r = r - step * q
        rho_new = dot(r, r)
        active = active & ~(rho_new.sqrt() <= atol)
        p = torch.where(active, r + torch.where(active, rho_new / rho, zero) * p, torch.zeros_like(p))
        rho = rho_new
    return x


def lposs_knn(feats: Tensor, k: int, *, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by inner product, row block by row block (never an N x N matrix).

    feats [N, D] -> (sims [N, k], index [N, k]), largest first; equal similarities keep the lower index first
    (a stable sort), so the k-th place goes to the lowest index among ties. Each row lists itself when its
    feature's norm is the largest inner product (L2-normalised features: always, ties aside).
    """
    sims, index = [], []
    for start in range(0, feats.shape[0], block):
        s = feats[start:start + block] @ feats.T  # [b, N]
        s, i = torch.sort(s, dim=1, descending=True, stable=True)
        sims.append(s[:, :k])
        index.append(i[:, :k])
    return torch.cat(sims), torch.cat(index)


def lposs_graph(feats: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0, sigma: float = 0.01,
                dist_pow: float = 1.0) -> Tensor:
    """LPOSS's normalised patch graph S = D^-1/2 W D^-1/2 as a coalesced sparse COO matrix [N, N] (O(N k) entries).

    feats [N, D] (L2-normalised here), positions [N, 2] in pixels. Each node is linked to its min(k, N) nearest
    neighbours by inner product (:func:`lposs_knn`, itself included) with w = max(0, sim)^gamma
    exp(-sigma dist^dist_pow), dist the Euclidean distance of the positions; W + W^T (an edge found from both
    ends counts twice), the diagonal removed, degree d = row sums (0 -> 1).
    """
    N = feats.shape[0]
    f = torch.nn.functional.normalize(feats, dim=1)
    sims, index = lposs_knn(f, min(k, N))
    dist = (positions.unsqueeze(1) - positions[index]).square().sum(-1).sqrt()  # [N, k]
    w = sims.clamp(min=0).pow(gamma) * torch.exp(-sigma * dist.pow(dist_pow))
    return symmetric_knn_graph(index, w)


def label_propagation(scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                      sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95, iters: int = 10,
                      tol: float = 1e-6) -> Tensor:
    """LPOSS's patch stage: scores [B, N, C], feats [B, N, D], positions [B, N, 2] (pixels) -> [B, N, C].

    Per image, x solves (I - alpha S) x = y0 (y0 = the scores, per class) for the graph of :func:`lposs_graph`,
    by :func:`propagation_cg` (all classes at once, each stopping on its own).
    """
    dt = compute_dtype(scores, feats, positions)
    out = []
    for y0, f, pos in zip(scores.to(dt), feats.to(dt), positions.to(dt), strict=True):
        s = lposs_graph(f, pos, k=k, gamma=gamma, sigma=sigma, dist_pow=dist_pow)
        out.append(propagation_cg(lambda p, s=s: s @ p, y0, alpha=alpha, iters=iters, tol=tol, dims=(0,)))
    if not out:
        return scores.to(dt).clone()
    return torch.stack(out)


#: sRGB -> XYZ (D65) matrix and reference white of kornia's rgb_to_lab (kornia.color.xyz / lab)
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
#: LPOSS divides Lab by these before the pixel distances (lposs_eval.py: "project Lab values to 0-1 range")
LAB_SCALE = (100.0, 128.0, 128.0)


def srgb_to_lab(image: Tensor) -> Tensor:
    """image [..., 3, H, W] sRGB in [0, 1] -> CIE Lab [..., 3, H, W] (L in 0..100), as kornia's rgb_to_lab."""
    lin = torch.where(image > 0.04045, ((image + 0.055).clamp(min=0) / 1.055).pow(2.4), image / 12.92)
    m = torch.tensor(RGB_TO_XYZ, dtype=image.dtype, device=image.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, lin)
    xyz = xyz / torch.tensor(D65_WHITE, dtype=image.dtype, device=image.device)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3), 7.787 * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], -3)


def pixel_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) of a pixel's neighbours: the (2r+1)^2 square minus its centre, row by row."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]


def _shifted(x: Tensor, dy: int, dx: int, radius: int) -> Tensor:
    """x [..., H + 2r, W + 2r] (zero-padded by r = radius) read at (y + dy, x + dx) -> [..., H, W]."""
    H, W = x.shape[-2] - 2 * radius, x.shape[-1] - 2 * radius
    return x[..., radius + dy:radius + dy + H, radius + dx:radius + dx + W]


def pixel_graph(image: Tensor, *, radius: int = 6, tau: float = 0.01) -> Tensor:
    """LPOSS+'s normalised pixel graph as stencil weights s [B, P, H, W], P = (2r+1)^2 - 1 (:func:`pixel_offsets`).

    w_ij = exp(-||lab_i - lab_j|| / tau) for j in the square around i, inside the image (Lab / LAB_SCALE);
    s_ij = w_ij / sqrt(d_i d_j), d the row sums (0 -> 1). Zero where the neighbour is off the image.
    """
    lab = srgb_to_lab(image) / torch.tensor(LAB_SCALE, dtype=image.dtype, device=image.device)[:, None, None]
    H, W = image.shape[-2:]
    pad = torch.nn.functional.pad
    lab_p = pad(lab, (radius,) * 4)
    inside = pad(torch.ones((1, 1, H, W), dtype=image.dtype, device=image.device), (radius,) * 4)
    offsets = pixel_offsets(radius)
    w = torch.stack([torch.exp(-(lab - _shifted(lab_p, dy, dx, radius)).square().sum(1).sqrt() / tau)
                     * _shifted(inside, dy, dx, radius)[:, 0] for dy, dx in offsets], 1)  # [B, P, H, W]
    degree = w.sum(1, keepdim=True)
    inv = torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()  # [B, 1, H, W]
    inv_p = pad(inv, (radius,) * 4)
    return torch.stack([w[:, o] * inv[:, 0] * _shifted(inv_p, dy, dx, radius)[:, 0]
                        for o, (dy, dx) in enumerate(offsets)], 1)


def pixel_propagation(scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01, alpha: float = 0.95,
                      iters: int = 10, tol: float = 1e-6) -> Tensor:
    """LPOSS+'s pixel stage: scores [B, C, H, W], image [B, 3, H, W] sRGB in [0, 1] -> [B, C, H, W].

    Per image and class, x solves (I - alpha S) x = scores with S the stencil of :func:`pixel_graph`, by
    :func:`propagation_cg` (every class of every image at once, each stopping on its own).
    """
    dt = compute_dtype(scores, image)
    s = pixel_graph(image.to(dt), radius=radius, tau=tau)
    offsets = pixel_offsets(radius)

    def apply_s(p: Tensor) -> Tensor:
        p_pad = torch.nn.functional.pad(p, (radius,) * 4)
        out = torch.zeros_like(p)
        for o, (dy, dx) in enumerate(offsets):
            out += s[:, o:o + 1] * _shifted(p_pad, dy, dx, radius)
        return out

    return propagation_cg(apply_s, scores.to(dt), alpha=alpha, iters=iters, tol=tol, dims=(2, 3))
