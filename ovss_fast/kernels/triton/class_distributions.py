"""Triton class_distributions: cosine GEMM + softmax over classes + NMS, then column normalisation.

method.md section 1. Two launches per call:
  1. ``_class_distributions_kernel``: a program owns BLOCK_N patches and *all* classes
     (BLOCK_C = next_pow2(C) >= 16, masked), computes the logits with ``tl.dot`` over D,
     the softmax and the NMS in registers, writes P and adds its partial column sums
     into ``colsum`` [B, C] with atomics;
  2. ``_normalize_columns_kernel``: Q = P / colsum in place (0 for an emptied column).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.triton._runtime import DENOM_FLOOR as _DENOM_FLOOR
from ovss_fast.kernels.triton._runtime import (
    MAX_CLASSES,
    autotune,
    configs,
    device_guard,
    interpreting,
    next_pow2,
)

__all__ = ["MAX_CLASSES", "class_distributions"]

#: a Triton constexpr so the kernels can read it
DENOM_FLOOR = tl.constexpr(_DENOM_FLOOR)


@triton.jit
def _feature_tiles(x_base, sxn, sxd, t_ptr, std, stc, rows, rmask, cls, cmask, d0, D, BLOCK_D: tl.constexpr):
    """Features d0..d0 + BLOCK_D - 1 as float32 (0 outside): x [BLOCK_N rows, BLOCK_D] and t [BLOCK_D, BLOCK_C]."""
    dd = d0 + tl.arange(0, BLOCK_D)
    dmask = dd < D
    x = tl.load(x_base + rows[:, None] * sxn + dd[None, :] * sxd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    t = tl.load(t_ptr + dd[:, None] * std + cls[None, :] * stc,
                mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return x, t


@triton.jit
def _class_distributions_kernel(
    x_ptr,  # [B, N, D] patch features (any float dtype, any strides)
    t_ptr,  # [C, D] text embeddings
    p_ptr,  # [B, N, C] float32 out: P after softmax and NMS (contiguous)
    colsum_ptr,  # [B, C] float32, zero on entry: sum_i P[b, i, c]
    N, C, D,
    sxb, sxn, sxd,
    stc, std,
    scale, nms,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """L = scale * <x, t> / (max(|x|, 1e-30) max(|t|, 1e-30)); P = softmax_c(L);
    NMS: P = 0 where P < nms * max_c P; colsum[b, c] += sum over this block's patches.

    method.md section 1. The dot runs in IEEE float32 (no tf32): scale = 100 turns a
    1e-3 cosine error into a 10 % probability error. Two passes over D: the max |entry| of
    every row of x and of t first, then the dot and the sums of squares of the rows divided
    by it (cos is scale-invariant; norms near 1e30 / 1e-30 neither overflow nor underflow).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    x_base = x_ptr + pid_b * sxb
    xmax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tmax = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, t = _feature_tiles(x_base, sxn, sxd, t_ptr, std, stc, rows, rmask, cls, cmask, d0, D, BLOCK_D)
        xmax = tl.maximum(xmax, tl.max(tl.abs(x), axis=1))
        tmax = tl.maximum(tmax, tl.max(tl.abs(t), axis=0))
    xsc = tl.where(xmax > 0, xmax, 1.0)
    tsc = tl.where(tmax > 0, tmax, 1.0)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    xsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, t = _feature_tiles(x_base, sxn, sxd, t_ptr, std, stc, rows, rmask, cls, cmask, d0, D, BLOCK_D)
        x = x / xsc[:, None]
        t = t / tsc[None, :]
        acc = tl.dot(x, t, acc, input_precision="ieee")
        xsq += tl.sum(x * x, axis=1)
        tsq += tl.sum(t * t, axis=0)
    # a zero vector gets cosine 0 (as in the reference), never NaN
    xn = tl.maximum(tl.sqrt(xsq), DENOM_FLOOR)
    tn = tl.maximum(tl.sqrt(tsq), DENOM_FLOOR)
    logits = scale * (acc / xn[:, None] / tn[None, :])
    logits = tl.where(cmask[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    e = tl.exp(logits - m[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    if nms > 0:
        pmax = tl.max(p, axis=1)
        p = tl.where(p < nms * pmax[:, None], 0.0, p)
    p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
    tl.store(p_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :], p,
             mask=rmask[:, None] & cmask[None, :])
    tl.atomic_add(colsum_ptr + pid_b * C + cls, tl.sum(p, axis=0), mask=cmask)


@triton.jit
def _normalize_columns_kernel(
    p_ptr,  # [B, N, C] float32, P in, Q out (in place)
    colsum_ptr,  # [B, C] float32
    N, C,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Q[b, i, c] = P[b, i, c] / max(colsum[b, c], 1e-30) where colsum > 0, else 0 (method.md section 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    mask = (rows < N)[:, None] & cmask[None, :]
    s = tl.load(colsum_ptr + pid_b * C + cls, mask=cmask, other=0.0)
    ptrs = p_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :]
    p = tl.load(ptrs, mask=mask, other=0.0)
    q = tl.where(s[None, :] > 0, p / tl.maximum(s, DENOM_FLOOR)[None, :], 0.0)
    tl.store(ptrs, q, mask=mask)


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep the register tiles of one program under 16K floats (BLOCK_C is fixed by C)."""
    bc = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    ok = [c for c in configs
          if c.kwargs["BLOCK_N"] * bc <= 16384 and c.kwargs["BLOCK_D"] * bc <= 16384]
    return ok or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"])]


# H100 / H200: 132 SMs; a [64, 256] float32 accumulator is 64 registers per thread at 8 warps
_CONFIGS = configs("BLOCK_N BLOCK_D", [
    (16, 16, 4, 2), (16, 32, 8, 2), (32, 32, 4), (32, 64, 8), (64, 32, 4), (64, 32, 8), (64, 64, 8, 2), (128, 32, 8)
], num_stages=3)
_tuned = autotune(configs=_CONFIGS, key=["N", "C", "D"], reset_to_zero=["colsum_ptr"],
                         prune_configs_by={"early_config_prune": _prune})(_class_distributions_kernel)
#: the interpreter runs one small configuration (several blocks and masks on tiny tests)
_INTERPRET = {"BLOCK_N": 16, "BLOCK_D": 16}


def class_distributions(feats: Tensor, text: Tensor, *, scale: float = 100.0, nms: float = 0.0) -> Tensor:
    """feats: [B, N, D]; text: [C, D] -> Q: [B, N, C] float32 (see reference.class_distributions)."""
    B, N, D = feats.shape
    C = text.shape[0]
    out = torch.empty((B, N, C), dtype=torch.float32, device=feats.device)
    if out.numel() == 0:
        return out
    colsum = torch.zeros((B, C), dtype=torch.float32, device=feats.device)
    block_c = max(16, next_pow2(C))
    args = (feats, text, out, colsum, N, C, D, *feats.stride(), *text.stride(), float(scale), float(nms))
    with device_guard(feats):
        if interpreting():
            grid = (B, triton.cdiv(N, _INTERPRET["BLOCK_N"]))
            _class_distributions_kernel[grid](*args, BLOCK_C=block_c, **_INTERPRET)
        else:
            _tuned[lambda meta: (B, triton.cdiv(N, meta["BLOCK_N"]))](*args, BLOCK_C=block_c)
        block_n = 16 if interpreting() else max(1, 4096 // block_c)
        _normalize_columns_kernel[(B, triton.cdiv(N, block_n))](out, colsum, N, C, BLOCK_N=block_n,
                                                                 BLOCK_C=block_c)
    return out
