"""Triton gibbs_kernel: cost and Gibbs kernel from a patch affinity (method.md section 2).

Two launches per call:
  1. ``_cost_range_kernel``: per (image, strip of RANGE_ROWS rows) the min and max of
     Craw = -log((A + A^T) / 2 + 1e-12) over the strip, into partials [B, n_strips];
  2. ``_gibbs_kernel_kernel``: per (image, tile) reduces the image's partials to the
     global min / max and writes cost = (Craw - min) / (max - min) (0 if max == min)
     and K = exp(-cost / eps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import LOG_FLOOR as _LOG_FLOOR
from ._runtime import autotune, device_guard, interpreting, next_pow2

#: rows per program of the range pass (fixes the number of partials per image)
RANGE_ROWS = 32

#: a Triton constexpr so the kernels can read it
LOG_FLOOR = tl.constexpr(_LOG_FLOOR)


@triton.jit
def _cost_range_kernel(
    a_ptr,  # [B, N, N] affinity (any float dtype, any strides)
    lo_ptr, hi_ptr,  # [B, n_strips] float32 out
    N, n_strips,
    sab, sai, saj,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """lo/hi[b, s] = min/max over rows i of strip s and all j of Craw[i, j] = -log((A[i,j] + A[j,i]) / 2 + 1e-12).

    method.md section 2 (first pass). A[j, i] is loaded as a row-contiguous tile and transposed.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    base = a_ptr + pid_b * sab
    rows = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lo = tl.full((BLOCK_M, BLOCK_N), float("inf"), tl.float32)
    hi = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        a = tl.load(base + rows[:, None] * sai + cols[None, :] * saj, mask=mask, other=0.0).to(tl.float32)
        at = tl.load(base + cols[:, None] * sai + rows[None, :] * saj,
                     mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        craw = -tl.log((0.5 * a + 0.5 * tl.trans(at)) + LOG_FLOOR)  # halved first: no overflow
        lo = tl.minimum(lo, tl.where(mask, craw, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, craw, float("-inf")))
    tl.store(lo_ptr + pid_b * n_strips + pid_s, tl.min(tl.min(lo, axis=1), axis=0))
    tl.store(hi_ptr + pid_b * n_strips + pid_s, tl.max(tl.max(hi, axis=1), axis=0))


@triton.jit
def _gibbs_kernel_kernel(
    a_ptr,  # [B, N, N] affinity
    lo_ptr, hi_ptr,  # [B, n_strips] float32 partial min / max of Craw
    cost_ptr, k_ptr,  # [B, N, N] float32 out (contiguous)
    N, n_strips,
    sab, sai, saj,
    inv_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """cost = (Craw - min Craw) / (max Craw - min Craw) (0 where max == min); K = exp(-cost / eps).

    method.md section 2 (second pass); min and max over the whole image from the partials.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    s = tl.arange(0, BLOCK_S)
    smask = s < n_strips
    lo = tl.min(tl.load(lo_ptr + pid_b * n_strips + s, mask=smask, other=float("inf")), axis=0)
    hi = tl.max(tl.load(hi_ptr + pid_b * n_strips + s, mask=smask, other=float("-inf")), axis=0)
    span = hi - lo
    base = a_ptr + pid_b * sab
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    a = tl.load(base + rows[:, None] * sai + cols[None, :] * saj, mask=mask, other=0.0).to(tl.float32)
    at = tl.load(base + cols[:, None] * sai + rows[None, :] * saj,
                 mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    craw = -tl.log((0.5 * a + 0.5 * tl.trans(at)) + LOG_FLOOR)  # halved first: no overflow
    cost = tl.where(span > 0, (craw - lo) / tl.where(span > 0, span, 1.0), 0.0)
    kern = tl.exp(-cost * inv_eps)
    out = pid_b * N * N + rows[:, None] * N + cols[None, :]
    tl.store(cost_ptr + out, cost, mask=mask)
    tl.store(k_ptr + out, kern, mask=mask)


_RANGE_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 128}, num_warps=8),
    triton.Config({"BLOCK_N": 256}, num_warps=8),
]
# elementwise over [N, N]: 64x64 tiles give 4096 programs per image at N = 4096 (132 SMs)
_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8),
]
_range_tuned = autotune(configs=_RANGE_CONFIGS, key=["N"])(_cost_range_kernel)
_tile_tuned = autotune(configs=_TILE_CONFIGS, key=["N"])(_gibbs_kernel_kernel)


def gibbs_kernel(affinity: Tensor, *, eps: float = 0.1) -> tuple[Tensor, Tensor]:
    """affinity: [B, N, N] -> (cost [B, N, N], kernel [B, N, N]) float32 (see reference.gibbs_kernel)."""
    B, N, _ = affinity.shape
    cost = torch.empty((B, N, N), dtype=torch.float32, device=affinity.device)
    kern = torch.empty_like(cost)
    if cost.numel() == 0:
        return cost, kern
    rows = 16 if interpreting() else RANGE_ROWS
    n_strips = triton.cdiv(N, rows)
    lo = torch.empty((B, n_strips), dtype=torch.float32, device=affinity.device)
    hi = torch.empty_like(lo)
    strides = affinity.stride()
    block_s = next_pow2(n_strips)
    with device_guard(affinity):
        if interpreting():
            _cost_range_kernel[(B, n_strips)](affinity, lo, hi, N, n_strips, *strides, BLOCK_M=rows, BLOCK_N=16)
            grid = (B, triton.cdiv(N, 16), triton.cdiv(N, 16))
            _gibbs_kernel_kernel[grid](affinity, lo, hi, cost, kern, N, n_strips, *strides, 1.0 / eps,
                                       BLOCK_M=16, BLOCK_N=16, BLOCK_S=block_s)
        else:
            _range_tuned[(B, n_strips)](affinity, lo, hi, N, n_strips, *strides, BLOCK_M=rows)
            _tile_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](
                affinity, lo, hi, cost, kern, N, n_strips, *strides, 1.0 / eps, BLOCK_S=block_s)
    return cost, kern
