"""Triton pixel-adaptive mask refinement (PAMR; reference.pamr, the peers' ``PAMR`` module).

Two kernels, no unfold: every neighbour is read at its clamped index (replicate padding), one
at a time, so neither the [B, K, P, H, W] differences nor a stack of shifted masks is ever made.

``_pamr_affinity_kernel``: a program per (image, BLOCK_P pixels) holds the pixel's K channels
(BLOCK_K >= K) and writes a [B, P, H, W] float32, P = 8 len(dilations):

    s_k  = unbiased std over the 9 len(dilations) values of the dilated 3 x 3 neighbourhoods
           (the centre once per dilation), per channel k
    e_j  = -mean_k |x_k - x_k(j)| / (1e-8 + 0.1 s_k)       for each of the P neighbours j
    a_j  = softmax_j e_j                                     (max and sum online, e recomputed)

in float64, stored as float32: the logits reach tens where the image is locally flat, and float32's
rounding of them was the larger part of the error (max |out - reference| / max |scores| after NACLIP's
50 steps at dilations (1, 2, 4, 8, 12, 24): 1.3e-5 with float32 affinities, 5.5e-6 with these; the
rest is the float32 steps). The affinity kernel runs once per image, the steps in float32.

``_pamr_step_kernel``: one of ``iters`` steps, a program per (image, BLOCK_P pixels, BLOCK_C
classes) reads the ping buffer and writes the pong one: m'[c, p] = sum_j a_j[p] m[c, p + d_j].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.triton._runtime import autotune, configs, device_guard, interpreting, next_pow2


@triton.jit
def _clamped(y, x, dy, dx, H, W):
    """The flat index of (y + dy, x + dx) clamped onto the image (replicate padding)."""
    yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
    xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
    return yy * W + xx


@triton.jit
def _channels_at(x_base, pmask2, kmask2, y, x, dy, dx, H, W, sxh, sxw):
    """The K channels of every pixel's neighbour at (dy, dx), clamped onto the image: [BLOCK_P, BLOCK_K] float64."""
    yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
    xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
    return tl.load(x_base + (yy * sxh + xx * sxw)[:, None], mask=pmask2 & kmask2, other=0.0).to(tl.float64)


@triton.jit
def _logit(x_base, xc, kmask2, denom, pmask2, y, x, dy, dx, H, W, sxh, sxw, K):
    """e_j of the neighbour at (dy, dx): -mean over channels of |x_k - x_k(j)| / denom_k, [BLOCK_P]."""
    xn = _channels_at(x_base, pmask2, kmask2, y, x, dy, dx, H, W, sxh, sxw)
    return -tl.sum(tl.where(kmask2, tl.abs(xc - xn) / denom, 0.0), axis=1) / K  # a float32 1 / K would scale e


@triton.jit
def _pamr_affinity_kernel(
    x_ptr,  # [B, K, H, W] image (any float dtype, any strides)
    dil_ptr,  # [ND] int32 dilations
    a_ptr,  # [B, P, H, W] float32 out (contiguous), P = 8 ND
    K, H, W, ND,
    sxb, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a[j, p] = softmax_j -mean_k |x_k[p] - x_k[p + d_j]| / (1e-8 + 0.1 s_k[p]), s_k the unbiased std of the
    9 ND values of p's dilated 3 x 3 neighbourhoods (the centre once per dilation); neighbours clamped."""
    pid_b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    y = p // W
    x = p % W
    ks = tl.arange(0, BLOCK_K)
    kmask2 = (ks < K)[None, :]
    pmask2 = pmask[:, None]
    x_base = x_ptr + pid_b * sxb + ks[None, :].to(tl.int64) * sxc
    xc = _channels_at(x_base, pmask2, kmask2, y, x, 0, 0, H, W, sxh, sxw)
    # the std, in two passes over the taps (mean, then squared deviations), per channel
    total = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float64)
    for i in range(0, ND):
        d = tl.load(dil_ptr + i)
        for t in tl.static_range(9):
            total += _channels_at(x_base, pmask2, kmask2, y, x, (t // 3 - 1) * d, (t % 3 - 1) * d, H, W, sxh, sxw)
    n = 9 * ND
    mean = total / n
    sq = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float64)
    for i in range(0, ND):
        d = tl.load(dil_ptr + i)
        for t in tl.static_range(9):
            v = _channels_at(x_base, pmask2, kmask2, y, x, (t // 3 - 1) * d, (t % 3 - 1) * d, H, W, sxh, sxw)
            sq += (v - mean) * (v - mean)
    denom = 1e-8 + 0.1 * tl.sqrt(sq / (n - 1))
    denom = tl.where(kmask2, denom, 1.0)
    # softmax over the P neighbours: running max and sum, then the logits again, normalised
    emax = tl.full((BLOCK_P,), float("-inf"), tl.float64)
    esum = tl.zeros((BLOCK_P,), dtype=tl.float64)
    for i in range(0, ND):
        d = tl.load(dil_ptr + i)
        for t in tl.static_range(9):
            if t != 4:  # the centre is no neighbour
                e = _logit(x_base, xc, kmask2, denom, pmask2, y, x, (t // 3 - 1) * d, (t % 3 - 1) * d, H, W, sxh, sxw,
                           K)
                new_max = tl.maximum(emax, e)
                esum = esum * tl.exp(emax - new_max) + tl.exp(e - new_max)
                emax = new_max
    HW = H * W
    a_base = a_ptr + pid_b * 8 * ND * HW + p
    for i in range(0, ND):
        d = tl.load(dil_ptr + i)
        for t in tl.static_range(9):
            if t != 4:
                e = _logit(x_base, xc, kmask2, denom, pmask2, y, x, (t // 3 - 1) * d, (t % 3 - 1) * d, H, W, sxh, sxw,
                           K)
                j = 8 * i + t - t // 5  # t skips the centre (4)
                tl.store(a_base + j * HW, (tl.exp(e - emax) / esum).to(tl.float32), mask=pmask)


@triton.jit
def _pamr_step_kernel(
    m_ptr,  # [B, C, H, W] float32 ping (contiguous)
    a_ptr,  # [B, P, H, W] float32 affinities (contiguous), P = 8 ND
    dil_ptr,  # [ND] int32 dilations
    out_ptr,  # [B, C, H, W] float32 pong (contiguous)
    C, H, W, ND,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[c, p] = sum_j a[j, p] m[c, p + d_j] over the P = 8 ND neighbours, clamped onto the image."""
    pid_b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    y = p // W
    x = p % W
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask2 = pmask[:, None] & (cls < C)[None, :]
    HW = H * W
    m_base = m_ptr + (pid_b * C + cls[None, :].to(tl.int64)) * HW
    a_base = a_ptr + pid_b * 8 * ND * HW + p
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in range(0, ND):
        d = tl.load(dil_ptr + i)
        for t in tl.static_range(9):
            if t != 4:
                q = _clamped(y, x, (t // 3 - 1) * d, (t % 3 - 1) * d, H, W)
                j = 8 * i + t - t // 5  # t skips the centre (4)
                a = tl.load(a_base + j * HW, mask=pmask, other=0.0)
                acc += a[:, None] * tl.load(m_base + q[:, None], mask=mask2, other=0.0)
    tl.store(out_ptr + (pid_b * C + cls[None, :].to(tl.int64)) * HW + p[:, None], acc, mask=mask2)


_AFF_CONFIGS = configs("BLOCK_P", [(128, 4), (256, 4), (512, 8)])
_STEP_CONFIGS = configs("BLOCK_P BLOCK_C", [(128, 8, 4), (256, 4, 4), (64, 16, 4), (128, 16, 8)])
# coarse keys: the image size varies per image, the channels and dilations per dataset at most
_aff_tuned = autotune(configs=_AFF_CONFIGS, key=["K", "ND"])(_pamr_affinity_kernel)
_step_tuned = autotune(configs=_STEP_CONFIGS, key=["C", "ND"])(_pamr_step_kernel)


def _interpret_blocks(H: int, W: int, C: int = 1) -> tuple[int, int]:
    """The interpreter's blocks: few programs, since it runs them one after another (each op a numpy call)."""
    return min(next_pow2(H * W), 1024), min(next_pow2(C), 16)


def pamr_affinity(image: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """image: [B, K, H, W] -> affinities [B, 8 len(dilations), H, W] float32 (see reference.pamr_affinity)."""
    B, K, H, W = image.shape
    ND = len(dilations)
    a = torch.empty((B, 8 * ND, H, W), dtype=torch.float32, device=image.device)
    if a.numel() == 0:
        return a
    dil = torch.tensor(dilations, dtype=torch.int32, device=image.device)
    block_k = next_pow2(K)
    with device_guard(image):
        if interpreting():
            bp = _interpret_blocks(H, W)[0]
            _pamr_affinity_kernel[(triton.cdiv(H * W, bp), B)](
                image, dil, a, K, H, W, ND, *image.stride(), BLOCK_P=bp, BLOCK_K=block_k)
        else:
            _aff_tuned[lambda m: (triton.cdiv(H * W, m["BLOCK_P"]), B)](
                image, dil, a, K, H, W, ND, *image.stride(), BLOCK_K=block_k)
    return a


def pamr(scores: Tensor, image: Tensor, *, iters: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """scores: [B, C, h, w]; image: [B, K, H, W] -> [B, C, H, W] float32 (see reference.pamr): the scores
    bilinearly resized to H x W (align_corners=True) when the sizes differ, then ``iters`` steps."""
    B, C = scores.shape[:2]
    H, W = image.shape[-2:]
    m = scores.to(torch.float32)
    if m.shape[-2:] != (H, W):
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)
    m = m.contiguous()
    if iters == 0 or m.numel() == 0:
        return m.clone() if m.data_ptr() == scores.data_ptr() else m
    dilations = tuple(int(d) for d in dilations)
    a = pamr_affinity(image, dilations)
    dil = torch.tensor(dilations, dtype=torch.int32, device=image.device)
    ping, pong = m, torch.empty_like(m)
    if ping.data_ptr() == scores.data_ptr():  # never write into the caller's tensor
        ping = ping.clone()
    ND = len(dilations)
    with device_guard(image):
        for _ in range(iters):
            if interpreting():
                bp, bc = _interpret_blocks(H, W, C)
                grid = (triton.cdiv(H * W, bp), B, triton.cdiv(C, bc))
                _pamr_step_kernel[grid](ping, a, dil, pong, C, H, W, ND, BLOCK_P=bp, BLOCK_C=bc)
            else:
                _step_tuned[lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B, triton.cdiv(C, meta["BLOCK_C"]))](
                    ping, a, dil, pong, C, H, W, ND)
            ping, pong = pong, ping
    return ping
