"""Triton sinkhorn_scores: entropic OT from 1/N to every class, all iterations in one launch.

method.md section 3 (op). One launch per call: a program owns (image b, a tile of
BLOCK_C classes) and runs every iteration itself, streaming K in [BLOCK_I, BLOCK_J]
tiles (from L2 when K fits: 64 MiB at N = 4096 in float32 does not fit H100's 50 MB,
so large N reads HBM) and multiplying them with ``tl.dot`` against its [N, BLOCK_C]
slices of u and v, which live in a scratch buffer in global memory. The slices are
private to the program, so the only synchronisation is a CTA barrier between the
u-phase and the v-phase. Parallelism is B * ceil(C / BLOCK_C) programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import DENOM_FLOOR as _DENOM_FLOOR
from ._runtime import device_guard, interpreting

#: scratch rows are padded to a multiple of this many classes (the largest BLOCK_C)
SCRATCH_PAD = 64

#: a Triton constexpr so the kernels can read it
DENOM_FLOOR = tl.constexpr(_DENOM_FLOOR)


@triton.jit
def _sinkhorn_scores_kernel(
    q_ptr,  # [B, N, C] targets b = Q[:, c] (any float dtype, any strides)
    k_ptr,  # [B, N, N] Gibbs kernel (any float dtype, any strides)
    out_ptr,  # [B, N, C] float32 out (contiguous)
    u_ptr, v_ptr,  # [B, N, CP] float32 scratch, CP = C padded to SCRATCH_PAD
    B, N, C, CP,
    sqb, sqn, sqc,
    skb, ski, skj,
    a, eps, iters,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """v = 1; iters times: u = a / max(K v, 1e-30); v = q / max(K^T u, 1e-30);
    f = eps log(a / max(K v, 1e-30)); S = mean_i f - f; S = -inf for a dead class (sum_i q = 0).

    method.md section 3, op, with a = 1/N. Matrix products run in IEEE float32 (no tf32):
    50 iterations of tf32 products would miss the 1e-4 contract.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    q_base = q_ptr + pid_b * sqb
    k_base = k_ptr + pid_b * skb
    u_base = u_ptr + pid_b * N * CP
    v_base = v_ptr + pid_b * N * CP
    ri = tl.arange(0, BLOCK_I)
    rj = tl.arange(0, BLOCK_J)

    # v = 1; column sums of q decide the dead classes
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rows = j0 + rj
        mask = (rows < N)[:, None] & cmask[None, :]
        q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
        qsum += tl.sum(q, axis=0)
        tl.store(v_base + rows[:, None] * CP + cls[None, :], tl.full((BLOCK_J, BLOCK_C), 1.0, tl.float32),
                 mask=mask)
    tl.debug_barrier()

    for _ in range(iters):
        # u = a / max(K v, floor)
        for i0 in range(0, N, BLOCK_I):
            rows = i0 + ri
            rmask = rows < N
            acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
            for j0 in range(0, N, BLOCK_J):
                cols = j0 + rj
                jmask = cols < N
                k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                            mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
                v = tl.load(v_base + cols[:, None] * CP + cls[None, :],
                            mask=jmask[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                acc = tl.dot(k, v, acc, input_precision="ieee")
            tl.store(u_base + rows[:, None] * CP + cls[None, :], a / tl.maximum(acc, DENOM_FLOOR),
                     mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()
        # v = q / max(K^T u, floor)
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + rj
            jmask = cols < N
            acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
            for i0 in range(0, N, BLOCK_I):
                rows = i0 + ri
                rmask = rows < N
                k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                            mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
                u = tl.load(u_base + rows[:, None] * CP + cls[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                acc = tl.dot(tl.trans(k), u, acc, input_precision="ieee")
            mask = jmask[:, None] & cmask[None, :]
            q = tl.load(q_base + cols[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
            tl.store(v_base + cols[:, None] * CP + cls[None, :], q / tl.maximum(acc, DENOM_FLOOR), mask=mask)
        tl.debug_barrier()

    # readout: f = eps log(a / max(K v, floor)) kept in the u scratch, then S = mean f - f
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        rmask = rows < N
        acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + rj
            jmask = cols < N
            k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                        mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
            v = tl.load(v_base + cols[:, None] * CP + cls[None, :],
                        mask=jmask[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
            acc = tl.dot(k, v, acc, input_precision="ieee")
        mask = rmask[:, None] & cmask[None, :]
        f = eps * tl.log(a / tl.maximum(acc, DENOM_FLOOR))
        f = tl.where(mask, f, 0.0)
        fsum += tl.sum(f, axis=0)
        tl.store(u_base + rows[:, None] * CP + cls[None, :], f, mask=mask)
    tl.debug_barrier()
    mean = fsum / N
    dead = qsum <= 0
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        mask = (rows < N)[:, None] & cmask[None, :]
        f = tl.load(u_base + rows[:, None] * CP + cls[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        s = tl.where(dead[None, :], float("-inf"), mean[None, :] - f)
        tl.store(out_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :], s, mask=mask)


# fp32 FMA dots: [64, 64] x [64, BLOCK_C] per step. Small BLOCK_C buys programs (parallelism,
# B * C / BLOCK_C of them on 132 SMs) at the price of reading K once more per class tile.
_CONFIGS = [
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_I": 128, "BLOCK_J": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_I": 32, "BLOCK_J": 128, "BLOCK_C": 16}, num_warps=4, num_stages=3),
]
_tuned = triton.autotune(configs=_CONFIGS, key=["B", "N", "C"])(_sinkhorn_scores_kernel)
_INTERPRET = {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_C": 16}


def sinkhorn_scores(q: Tensor, kernel: Tensor, *, eps: float = 0.1, iters: int = 50) -> Tensor:
    """q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C] float32 (see reference.sinkhorn_scores)."""
    B, N, C = q.shape
    out = torch.empty((B, N, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    cp = triton.cdiv(C, SCRATCH_PAD) * SCRATCH_PAD
    u = torch.empty((B, N, cp), dtype=torch.float32, device=q.device)
    v = torch.empty_like(u)
    args = (q, kernel, out, u, v, B, N, C, cp, *q.stride(), *kernel.stride(), 1.0 / N, float(eps), int(iters))
    with device_guard(q):
        if interpreting():
            _sinkhorn_scores_kernel[(B, triton.cdiv(C, _INTERPRET["BLOCK_C"]))](*args, **_INTERPRET)
        else:
            _tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args)
    return out
