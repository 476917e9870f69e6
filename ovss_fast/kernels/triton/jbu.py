"""Triton joint bilateral upsampling and its fused argmax (method.md section 4).

One launch per call each. The host computes, exactly as the reference does, the low-res
positions p' (py [H], px [W], float32) and tap centres floor(p' + 0.5) (cy, cx, from p' in float64), and
Gd = adaptive_avg_pool2d(guide, (h, w)); the kernels never re-derive the tap geometry,
so every backend rounds the centres identically.

``_jbu_upsample_kernel``: a program per (image, BLOCK_P output pixels, BLOCK_C classes)
writes [B, C, H, W]. ``_jbu_argmax_kernel``: a program per (image, BLOCK_P pixels) loops
over class tiles and keeps only the running best class and score: [B, C, H, W] is never
allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.common import RADIUS, SIGMA_RANGE, SIGMA_SPATIAL, lowres_guide, tap_geometry
from ovss_fast.kernels.triton._runtime import autotune, configs, device_guard, interpreting, size_bucket


@triton.jit
def _tap(g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, t, h, w, R, pmask):
    """Tap t (0 <= t < (2R+1)^2) of every pixel: its cell qy, qx, offsets dy = qy - p'y, dx = qx - p'x,
    valid (q on the grid), the cell clamped onto the grid (safe addresses off it), Gd[q] as hi + lo
    (gd [6, h, w]: hi in channels 0-2, lo in 3-5) and a = G[p] - Gd[q] = (G - hi) - lo (float32).
    """
    span = 2 * R + 1
    qy = cyv + (t // span - R)
    qx = cxv + (t % span - R)
    valid = pmask & (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
    qyc = tl.minimum(tl.maximum(qy, 0), h - 1)
    qxc = tl.minimum(tl.maximum(qx, 0), w - 1)
    dy = qy.to(tl.float32) - pyv
    dx = qx.to(tl.float32) - pxv
    cell = qyc * w + qxc
    hw = h * w
    hi0 = tl.load(gd_base + cell, mask=valid, other=0.0)
    hi1 = tl.load(gd_base + hw + cell, mask=valid, other=0.0)
    hi2 = tl.load(gd_base + 2 * hw + cell, mask=valid, other=0.0)
    lo0 = tl.load(gd_base + 3 * hw + cell, mask=valid, other=0.0)
    lo1 = tl.load(gd_base + 4 * hw + cell, mask=valid, other=0.0)
    lo2 = tl.load(gd_base + 5 * hw + cell, mask=valid, other=0.0)
    a0 = (g0 - hi0) - lo0
    a1 = (g1 - hi1) - lo1
    a2 = (g2 - hi2) - lo2
    return qy, qx, dy, dx, valid, qyc, qxc, hi0, hi1, hi2, lo0, lo1, lo2, a0, a1, a2


@triton.jit
def _peak(g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, inv_s, inv_r, BLOCK_P: tl.constexpr):
    """Every pixel's peak tap m: the first tap of the largest exponent
    e = -|q - p'|^2 / (2 ss^2) - |G[p] - Gd[q]|^2 / (2 sr^2); returns its cell, offsets, Gd (hi, lo) and a."""
    emax = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    zf = tl.zeros((BLOCK_P,), dtype=tl.float32)
    mqy = tl.zeros((BLOCK_P,), dtype=tl.int32)
    mqx = tl.zeros((BLOCK_P,), dtype=tl.int32)
    mdy, mdx = zf, zf
    mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2 = zf, zf, zf, zf, zf, zf, zf, zf, zf
    for t in range(0, (2 * R + 1) * (2 * R + 1)):
        qy, qx, dy, dx, valid, qyc, qxc, hi0, hi1, hi2, lo0, lo1, lo2, a0, a1, a2 = _tap(
            g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, t, h, w, R, pmask)
        e = -(dy * dy + dx * dx) * inv_s - (a0 * a0 + a1 * a1 + a2 * a2) * inv_r
        better = valid & (e > emax)
        emax = tl.where(better, e, emax)
        mqy = tl.where(better, qy, mqy)
        mqx = tl.where(better, qx, mqx)
        mdy = tl.where(better, dy, mdy)
        mdx = tl.where(better, dx, mdx)
        mh0 = tl.where(better, hi0, mh0)
        mh1 = tl.where(better, hi1, mh1)
        mh2 = tl.where(better, hi2, mh2)
        ml0 = tl.where(better, lo0, ml0)
        ml1 = tl.where(better, lo1, ml1)
        ml2 = tl.where(better, lo2, ml2)
        ma0 = tl.where(better, a0, ma0)
        ma1 = tl.where(better, a1, ma1)
        ma2 = tl.where(better, a2, ma2)
    return mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2


@triton.jit
def _tap_relative(g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, t,
                  mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2, inv_s, inv_r):
    """Tap t's exponent relative to the peak, r = e(q) - e(m) (-inf off the grid), from differences of
    squares written as products (common/jbu_math.h, jbu_relative_exponent); valid, clamped cell."""
    qy, qx, dy, dx, valid, qyc, qxc, hi0, hi1, hi2, lo0, lo1, lo2, a0, a1, a2 = _tap(
        g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, t, h, w, R, pmask)
    ds = (qy - mqy).to(tl.float32) * (dy + mdy) + (qx - mqx).to(tl.float32) * (dx + mdx)
    dr = (((mh0 - hi0) + (ml0 - lo0)) * (a0 + ma0) + ((mh1 - hi1) + (ml1 - lo1)) * (a1 + ma1)
          + ((mh2 - hi2) + (ml2 - lo2)) * (a2 + ma2))
    r = tl.where(valid, -ds * inv_s - dr * inv_r, float("-inf"))
    return r, valid, qyc, qxc


@triton.jit
def _pixels(g_ptr, gd_ptr, py_ptr, px_ptr, cy_ptr, cx_ptr, h, w, H, W, R, sgb, sgc, sgh, sgw, inv_s, inv_r,
            BLOCK_P: tl.constexpr):
    """A program's BLOCK_P output pixels p and what every tap needs: (image, p, mask, G[p] (g0-g2), Gd's base,
    p' and the tap centres, the peak tap (:func:`_peak`), rmax = max_q r(q)). Pixel blocks are on grid axis 0,
    the image on axis 1: axes 1 and 2 stop at 65535 blocks (2048 x 2048 px is 65536 of 64)."""
    pid_b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    y = p // W
    x = p % W
    pyv = tl.load(py_ptr + y, mask=pmask, other=0.0)
    pxv = tl.load(px_ptr + x, mask=pmask, other=0.0)
    cyv = tl.load(cy_ptr + y, mask=pmask, other=0)
    cxv = tl.load(cx_ptr + x, mask=pmask, other=0)
    g_base = g_ptr + pid_b * sgb + y * sgh + x * sgw
    g0 = tl.load(g_base, mask=pmask, other=0.0).to(tl.float32)
    g1 = tl.load(g_base + sgc, mask=pmask, other=0.0).to(tl.float32)
    g2 = tl.load(g_base + 2 * sgc, mask=pmask, other=0.0).to(tl.float32)
    gd_base = gd_ptr + pid_b * 6 * h * w
    mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2 = _peak(
        g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, inv_s, inv_r, BLOCK_P)
    rmax = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for t in range(0, (2 * R + 1) * (2 * R + 1)):
        r, valid, qyc, qxc = _tap_relative(g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, t, mqy, mqx, mdy,
                                           mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2, inv_s, inv_r)
        rmax = tl.maximum(rmax, r)
    return (pid_b, p, pmask, g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1,
            ml2, ma0, ma1, ma2, rmax)


@triton.jit
def _class_taps(s_base, ssh, ssw, cmask, rmax, g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, mqy, mqx, mdy,
                mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2, inv_s, inv_r,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(num [BLOCK_P, BLOCK_C], den [BLOCK_P]) = (sum_q wt(q) S[c, q], sum_q wt(q)) over the taps,
    wt = exp(r(q) - rmax); a -inf score at an on-grid tap makes num -inf; den = 1 past the image (no taps:
    0 / 0 kept out of the math). s_base: S[b, classes] as a [1, BLOCK_C] pointer row."""
    num = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    den = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in range(0, (2 * R + 1) * (2 * R + 1)):
        r, valid, qyc, qxc = _tap_relative(g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, h, w, R, pmask, t, mqy, mqx, mdy,
                                           mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1, ma2, inv_s, inv_r)
        wgt = tl.exp(tl.where(valid, r - rmax, float("-inf")))
        m2 = valid[:, None] & cmask[None, :]
        sq = tl.load(s_base + (qyc * ssh + qxc * ssw)[:, None], mask=m2, other=0.0).to(tl.float32)
        dead = sq == float("-inf")
        term = tl.where(dead, float("-inf"), wgt[:, None] * tl.where(dead, 0.0, sq))
        num += tl.where(m2, term, 0.0)
        den += wgt
    return num, tl.where(pmask, den, 1.0)


@triton.jit
def _jbu_upsample_kernel(
    s_ptr,  # [B, C, h, w] scores (any float dtype, any strides; -inf allowed)
    g_ptr,  # [B, 3, H, W] guide (any float dtype, any strides)
    gd_ptr,  # [B, 6, h, w] float32 contiguous: Gd = adaptive_avg_pool2d(guide, (h, w)) in float64 as hi + lo
    py_ptr, px_ptr,  # [H], [W] float32 low-res positions p'
    cy_ptr, cx_ptr,  # [H], [W] int32 tap centres floor(p' + 0.5)
    out_ptr,  # [B, C, H, W] float32 out (contiguous)
    C, h, w, H, W, R,
    ssb, ssc, ssh, ssw,
    sgb, sgc, sgh, sgw,
    inv_s, inv_r,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[c, p] = sum_q S[c, q] wt(q) / sum_q wt(q), wt = exp(e(q) - max_q' e(q')),
    e(q) = -|q - p'|^2 / (2 ss^2) - |G[p] - Gd[q]|^2 / (2 sr^2), q over the (2R+1)^2 taps on the grid,
    formed as exp(r - max r) with r = e(q) - e(m) relative to the peak tap m (see _tap_relative);
    a -inf score at an on-grid tap makes out[c, p] = -inf (method.md section 4).
    """
    (pid_b, p, pmask, g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0,
     ma1, ma2, rmax) = _pixels(
        g_ptr, gd_ptr, py_ptr, px_ptr, cy_ptr, cx_ptr, h, w, H, W, R, sgb, sgc, sgh, sgw, inv_s, inv_r, BLOCK_P)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    num, den = _class_taps(s_ptr + pid_b * ssb + cls[None, :] * ssc, ssh, ssw, cmask, rmax, g0, g1, g2, gd_base, pyv,
                           pxv, cyv, cxv, h, w, R, pmask, mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0, ma1,
                           ma2, inv_s,
                           inv_r, BLOCK_P, BLOCK_C)
    o_ptrs = out_ptr + (pid_b * C + cls[None, :]) * H * W + p[:, None]
    tl.store(o_ptrs, num / den[:, None], mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _jbu_argmax_kernel(
    s_ptr,  # [B, C, h, w] scores
    g_ptr,  # [B, 3, H, W] guide
    gd_ptr,  # [B, 6, h, w] float32 contiguous (hi, lo)
    py_ptr, px_ptr,  # [H], [W] float32
    cy_ptr, cx_ptr,  # [H], [W] int32
    label_ptr,  # [B, H, W] int64 out
    C, h, w, H, W, R,
    ssb, ssc, ssh, ssw,
    sgb, sgc, sgh, sgw,
    inv_s, inv_r,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """label[p] = argmax_c out[c, p] of the joint bilateral upsampling (see _jbu_upsample_kernel),
    ties to the lowest class; the running best over class tiles replaces [B, C, H, W] (method.md section 4).
    """
    (pid_b, p, pmask, g0, g1, g2, gd_base, pyv, pxv, cyv, cxv, mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2, ma0,
     ma1, ma2, rmax) = _pixels(
        g_ptr, gd_ptr, py_ptr, px_ptr, cy_ptr, cx_ptr, h, w, H, W, R, sgb, sgc, sgh, sgw, inv_s, inv_r, BLOCK_P)
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    label = tl.zeros((BLOCK_P,), dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        num, den = _class_taps(s_ptr + pid_b * ssb + cls[None, :] * ssc, ssh, ssw, cmask, rmax, g0, g1, g2, gd_base,
                               pyv, pxv, cyv, cxv, h, w, R, pmask, mqy, mqx, mdy, mdx, mh0, mh1, mh2, ml0, ml1, ml2,
                               ma0, ma1, ma2,
                               inv_s, inv_r, BLOCK_P, BLOCK_C)
        val = tl.where(cmask[None, :], num / den[:, None], float("-inf"))
        tile_best = tl.max(val, axis=1)
        tile_arg = tl.argmax(val, axis=1, tie_break_left=True)
        better = tile_best > best  # strict: an equal score in a later tile keeps the lower class
        best = tl.where(better, tile_best, best)
        label = tl.where(better, (c0 + tile_arg).to(tl.int64), label)
    tl.store(label_ptr + pid_b * H * W + p, label, mask=pmask)


_UP_CONFIGS = configs("BLOCK_P BLOCK_C", [(64, 16, 4), (128, 16, 4), (128, 32, 8), (256, 8, 4)])
_ARGMAX_CONFIGS = configs("BLOCK_P BLOCK_C", [(64, 16, 4), (128, 16, 4), (128, 32, 8), (256, 16, 8)])


def jbu_bucket(named: dict) -> dict:
    """The JBU kernels' tuning bucket: classes C and output pixels H x W by size_bucket, the radius R
    exact. The grid is over H x W pixels (and classes); every pixel reads (2R + 1)^2 low-res taps
    whatever h and w are, so the low-res size is left out of the key. Any config is correct for any
    size (pixels and classes are masked)."""
    return {"C": size_bucket(named["C"]), "HW": size_bucket(named["H"] * named["W"]), "R": named["R"]}


_JBU_KEY = ["C", "h", "w", "H", "W", "R"]
_up_tuned = autotune(configs=_UP_CONFIGS, key=_JBU_KEY, bucket=jbu_bucket)(_jbu_upsample_kernel)
_argmax_tuned = autotune(configs=_ARGMAX_CONFIGS, key=_JBU_KEY, bucket=jbu_bucket)(_jbu_argmax_kernel)
_INTERPRET = {"BLOCK_P": 128, "BLOCK_C": 4}


def _prepare(scores: Tensor, guide: Tensor, sigma_spatial: float, sigma_range: float, radius: int) -> tuple:
    """Host side: Gd, the tap geometry (bit-identical to the reference's) and the scalar weights."""
    B, C, h, w = scores.shape
    H, W = guide.shape[-2:]
    g = guide.to(torch.float32)
    gd = torch.cat(lowres_guide(g, h, w, torch.float32), dim=1).contiguous()  # [B, 6, h, w]: hi, lo
    py, px, cy, cx = tap_geometry(h, w, H, W, radius, guide.device, torch.float32)
    inv_s = 1.0 / (2.0 * sigma_spatial**2)
    inv_r = 1.0 / (2.0 * sigma_range**2)
    return (scores, guide, gd, py, px, cy.to(torch.int32), cx.to(torch.int32)), (
        C, h, w, H, W, int(radius), *scores.stride(), *guide.stride(), inv_s, inv_r)


def jbu_upsample(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL,
                 sigma_range: float = SIGMA_RANGE,
                 radius: int = RADIUS) -> Tensor:
    """scores: [B, C, h, w]; guide: [B, 3, H, W] -> [B, C, H, W] float32 (see reference.jbu_upsample)."""
    B, C, h, w = scores.shape
    H, W = guide.shape[-2:]
    out = torch.empty((B, C, H, W), dtype=torch.float32, device=scores.device)
    if out.numel() == 0:
        return out
    ptrs, scalars = _prepare(scores, guide, sigma_spatial, sigma_range, radius)
    with device_guard(scores):
        if interpreting():
            grid = (triton.cdiv(H * W, _INTERPRET["BLOCK_P"]), B, triton.cdiv(C, _INTERPRET["BLOCK_C"]))
            _jbu_upsample_kernel[grid](*ptrs, out, *scalars, **_INTERPRET)
        else:
            _up_tuned[lambda m: (triton.cdiv(H * W, m["BLOCK_P"]), B, triton.cdiv(C, m["BLOCK_C"]))](
                *ptrs, out, *scalars)
    return out


def jbu_argmax(scores: Tensor, guide: Tensor, *, sigma_spatial: float = SIGMA_SPATIAL, sigma_range: float = SIGMA_RANGE,
               radius: int = RADIUS) -> Tensor:
    """scores: [B, C, h, w]; guide: [B, 3, H, W] -> labels [B, H, W] int64 (see reference.jbu_argmax)."""
    B, C, h, w = scores.shape
    H, W = guide.shape[-2:]
    labels = torch.empty((B, H, W), dtype=torch.int64, device=scores.device)
    if labels.numel() == 0:
        return labels
    ptrs, scalars = _prepare(scores, guide, sigma_spatial, sigma_range, radius)
    with device_guard(scores):
        if interpreting():
            _jbu_argmax_kernel[(triton.cdiv(H * W, _INTERPRET["BLOCK_P"]), B)](*ptrs, labels, *scalars, **_INTERPRET)
        else:
            _argmax_tuned[lambda m: (triton.cdiv(H * W, m["BLOCK_P"]), B)](*ptrs, labels, *scalars)
    return labels
