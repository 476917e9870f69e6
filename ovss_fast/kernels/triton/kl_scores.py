"""Triton kl_scores: the per-patch KL term to the uniform distribution (method.md section 3, kl).

Two launches per call: ``_column_sums_kernel`` (sum_i q[b, i, c] with atomics, only its
sign matters: a class whose column sums to 0 is dead) and the elementwise ``_kl_scores_kernel``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.triton._runtime import autotune, configs, device_guard, interpreting


@triton.jit
def _column_sums_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    colsum_ptr,  # [B, C] float32, zero on entry
    N, C,
    sqb, sqn, sqc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """colsum[b, c] += sum over this program's patches i of q[b, i, c] (dead classes: colsum <= 0)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(colsum_ptr + pid_b * C + cls, tl.sum(q, axis=0), mask=cmask)


@triton.jit
def _kl_scores_kernel(
    q_ptr,  # [B, N, C]
    colsum_ptr,  # [B, C] float32
    out_ptr,  # [B, N, C] float32 out (contiguous)
    N, C,
    sqb, sqn, sqc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """S = q log(N q) where q > 0, else 0; S = -inf for a dead class (method.md section 3, kl)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cls < C
    mask = rmask[:, None] & cmask[None, :]
    q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0)
    q = q.to(tl.float32)
    colsum = tl.load(colsum_ptr + pid_b * C + cls, mask=cmask, other=1.0)
    safe = tl.where(q > 0, q, 1.0)
    s = tl.where(q > 0, q * tl.log(N * safe), 0.0)
    s = tl.where(colsum[None, :] <= 0, float("-inf"), s)
    tl.store(out_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :], s, mask=mask)


_CONFIGS = configs("BLOCK_N BLOCK_C", [(32, 32, 4), (64, 32, 4), (64, 64, 8), (128, 32, 8)])
_sums_tuned = autotune(configs=_CONFIGS, key=["N", "C"], reset_to_zero=["colsum_ptr"])(_column_sums_kernel)
_kl_tuned = autotune(configs=_CONFIGS, key=["N", "C"])(_kl_scores_kernel)
_INTERPRET = {"BLOCK_N": 16, "BLOCK_C": 16}


def kl_scores(q: Tensor) -> Tensor:
    """q: [B, N, C] -> S: [B, N, C] float32 (see reference.kl_scores)."""
    B, N, C = q.shape
    out = torch.empty((B, N, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    colsum = torch.zeros((B, C), dtype=torch.float32, device=q.device)
    strides = q.stride()
    with device_guard(q):
        if interpreting():
            bn, bc = _INTERPRET["BLOCK_N"], _INTERPRET["BLOCK_C"]
            _column_sums_kernel[(B, triton.cdiv(N, bn))](q, colsum, N, C, *strides, **_INTERPRET)
            _kl_scores_kernel[(B, triton.cdiv(N, bn), triton.cdiv(C, bc))](q, colsum, out, N, C, *strides,
                                                                           **_INTERPRET)
        else:
            _sums_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_N"]))](q, colsum, N, C, *strides)
            _kl_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(C, m["BLOCK_C"]))](
                q, colsum, out, N, C, *strides)
    return out
