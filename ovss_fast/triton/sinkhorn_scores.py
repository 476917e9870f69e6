"""Triton sinkhorn_scores: entropic OT from 1/N to every class (method.md section 3, op).

Three schedules, chosen by :func:`choose_schedule` (or forced with ``schedule=``):

* fused, ONE launch per call: ``_sinkhorn_scores_kernel``, a program per (image b, tile of
  BLOCK_C classes) running every iteration itself. It streams K in [BLOCK_I, BLOCK_J] tiles
  (from L2 while K fits: N = 2048 is 16 MiB; N = 4096 is 64 MiB, more than H100's 50 MB L2)
  and multiplies them with ``tl.dot`` against its [N, BLOCK_C] slices of u and v, which live
  in a scratch buffer in global memory. The slices are private to the program, so the only
  synchronisation is a CTA barrier between the u-phase and the v-phase. Its parallelism is
  B * ceil(C / BLOCK_C) programs, which leaves most of 132 SMs idle for one image and few classes;
* split, 2 * iters + 2 launches: ``_sinkhorn_step_kernel`` over (image, row block, class block)
  for every half-iteration (all SMs busy, one launch overhead each), then
  ``_center_potential_kernel`` for the mean and the dead classes;
* window (small N, at most WINDOW_MAX_N: the pipeline's 224 px windows are N = 196), ONE launch
  for the whole batch: ``_sinkhorn_window_kernel``, a program per (window b, tile of BLOCK_C
  classes) running every iteration, rows in blocks of BLOCK_I (up to all 256 rows of a padded
  window at once), K (150 KiB at N = 196) read from L1/L2 every half-iteration, the sum over N in
  one partial sum while N <= 256; with ``symmetric=True`` (the discrepancy path: gibbs_kernel's K
  is built from (A + A^T) / 2) K^T u is computed as K u, the same row-major tiles as K v, never a
  transposed read. Its configs (``_WINDOW_CONFIGS``, ``_WINDOW_CONFIGS_TF32X3``) compile for
  sm_90 without register spills. Not yet run on a GPU, so never chosen by auto:
  OVSS_FAST_TRITON_SCHEDULE=window (or ``schedule="window"``) selects it;
* persistent (large N: 784-4096 for one image), ONE launch: ``_sinkhorn_persistent_kernel``, at most
  one program per SM (so all are resident), each taking tiles of [BLOCK_R rows, BLOCK_C classes] of
  every image in turn for every phase (v = 1; the 2 * iters half-iterations; f; S), with a grid-wide
  barrier (an atomic counter, ``_grid_sync``) between phases instead of a launch; K streamed from L2
  by row block (read K[rows, :] and v[:, classes] per tile: the tile shape balances the re-reads of
  K, C / BLOCK_C per phase, against those of v, N / BLOCK_R), K^T u as K u with ``symmetric=True``;
  the column sums of the readout go through a per row block buffer (no float atomics: the same
  numbers every run). The interpreter runs a grid's programs one after another and cannot wait at a
  barrier, so there each phase is its own launch (or, in the tests, all phases in one program). Not
  yet run on a GPU: OVSS_FAST_TRITON_SCHEDULE=persistent (or ``schedule="persistent"``) selects it.

OVSS_FAST_TRITON_PRECISION=tf32x3 runs every product of these kernels as split-tf32 tensor-core
dots (``input_precision="tf32x3"``, about float32 accuracy) instead of IEEE float32 FMAs; the
default is ieee. Whether tf32x3 holds the 1e-4 contract at N = 4096 is for a GPU run to show
(bench/gpu_check.py runs it; the interpreter computes every dot in float32 whatever it is told).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import DENOM_FLOOR as _DENOM_FLOOR
from ._runtime import autotune, device_guard, interpreting, next_pow2

#: scratch rows are padded to a multiple of this many classes (the largest BLOCK_C)
SCRATCH_PAD = 64
#: the largest N the window schedule takes (a small-N schedule: K of a window is read from L1/L2)
WINDOW_MAX_N = 512
#: the schedules a caller (or OVSS_FAST_TRITON_SCHEDULE) can name
SCHEDULES = ("auto", "fused", "split", "window", "persistent")
PRECISIONS = ("ieee", "tf32x3")

#: a Triton constexpr so the kernels can read it
DENOM_FLOOR = tl.constexpr(_DENOM_FLOOR)
#: products over N are summed in partial sums of this many terms, then added: the float32
#: rounding error then grows with SUM_CHUNK + N / SUM_CHUNK terms, not N (one running
#: tl.dot accumulator over N = 4096 missed the 1e-4 contract on an H100: 1.2e-4)
SUM_CHUNK = tl.constexpr(256)


@triton.jit
def _k_times_x(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
               TRANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
               PRECISION: tl.constexpr = "ieee"):
    """[BLOCK_R, BLOCK_C] tile of K x (TRANS false) or K^T x for output rows ``rows`` and classes ``cls``;
    x: [N, CP] float32 scratch at x_base. Products in PRECISION ("ieee": IEEE float32 FMAs, the default;
    "tf32x3" when OVSS_FAST_TRITON_PRECISION asks for split tf32), in partial sums of SUM_CHUNK."""
    rs = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, N, SUM_CHUNK):
        part = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for s0 in range(c0, tl.minimum(c0 + SUM_CHUNK, N), BLOCK_S):
            cols = s0 + rs
            smask = cols < N
            if TRANS:
                k = tl.load(k_base + cols[:, None] * ski + rows[None, :] * skj,
                            mask=smask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
                k = tl.trans(k)
            else:
                k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                            mask=rmask[:, None] & smask[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_base + cols[:, None] * CP + cls[None, :], mask=smask[:, None] & cmask[None, :], other=0.0,
                        cache_modifier=".cg")
            part = tl.dot(k, x, part, input_precision=PRECISION)
        acc += part
    return acc


@triton.jit
def _k_times_x_window(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                      TRANS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`_k_times_x` for the window schedule, whose N is at most BLOCK_N (a constexpr): when
    BLOCK_N <= SUM_CHUNK the sum over N is a single partial sum, so one accumulator is kept, not two."""
    if BLOCK_N <= SUM_CHUNK:
        rs = tl.arange(0, BLOCK_S)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for s0 in range(0, N, BLOCK_S):
            cols = s0 + rs
            smask = cols < N
            if TRANS:
                k = tl.load(k_base + cols[:, None] * ski + rows[None, :] * skj,
                            mask=smask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
                k = tl.trans(k)
            else:
                k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                            mask=rmask[:, None] & smask[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_base + cols[:, None] * CP + cls[None, :], mask=smask[:, None] & cmask[None, :], other=0.0,
                        cache_modifier=".cg")
            acc = tl.dot(k, x, acc, input_precision=PRECISION)
    else:
        acc = _k_times_x(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                         TRANS, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
    return acc


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
    PRECISION: tl.constexpr = "ieee",
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
            acc = _k_times_x(k_base, ski, skj, v_base, CP, rows, rmask, cls, cmask, N,
                             False, BLOCK_I, BLOCK_J, BLOCK_C, PRECISION)
            tl.store(u_base + rows[:, None] * CP + cls[None, :], a / tl.maximum(acc, DENOM_FLOOR),
                     mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()
        # v = q / max(K^T u, floor)
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + rj
            jmask = cols < N
            acc = _k_times_x(k_base, ski, skj, u_base, CP, cols, jmask, cls, cmask, N,
                             True, BLOCK_J, BLOCK_I, BLOCK_C, PRECISION)
            mask = jmask[:, None] & cmask[None, :]
            q = tl.load(q_base + cols[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
            tl.store(v_base + cols[:, None] * CP + cls[None, :], q / tl.maximum(acc, DENOM_FLOOR), mask=mask)
        tl.debug_barrier()

    # readout: f = eps log(a / max(K v, floor)) kept in the u scratch, then S = mean f - f
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        rmask = rows < N
        acc = _k_times_x(k_base, ski, skj, v_base, CP, rows, rmask, cls, cmask, N,
                         False, BLOCK_I, BLOCK_J, BLOCK_C, PRECISION)
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
_tuned = autotune(configs=_CONFIGS, key=["B", "N", "C"])(_sinkhorn_scores_kernel)
_INTERPRET = {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_C": 16}


@triton.jit
def _sinkhorn_step_kernel(
    q_ptr,  # [B, N, C] targets (any float dtype, any strides)
    k_ptr,  # [B, N, N] Gibbs kernel
    x_ptr,  # [B, N, CP] float32 scratch: v (MODE 0, 2) or u (MODE 1)
    y_ptr,  # [B, N, CP] float32 scratch out: u (MODE 0), v (MODE 1) or f (MODE 2)
    N, C, CP,
    sqb, sqn, sqc,
    skb, ski, skj,
    a, eps,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
):
    """One half-iteration for BLOCK_R rows and BLOCK_C classes of one image (the split schedule):
    MODE 0: u = a / max(K v, 1e-30);  MODE 1: v = q / max(K^T u, 1e-30);  MODE 2: f = eps log(a / max(K v, 1e-30)).

    method.md section 3, op. IEEE float32 products (no tf32).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cls < C
    k_base = k_ptr + pid_b * skb
    x_base = x_ptr + pid_b * N * CP
    acc = _k_times_x(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                     MODE == 1, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
    mask = rmask[:, None] & cmask[None, :]
    if MODE == 0:
        y = a / tl.maximum(acc, DENOM_FLOOR)
    elif MODE == 1:
        q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0)
        y = q.to(tl.float32) / tl.maximum(acc, DENOM_FLOOR)
    else:
        y = eps * tl.log(a / tl.maximum(acc, DENOM_FLOOR))
    tl.store(y_ptr + pid_b * N * CP + rows[:, None] * CP + cls[None, :], y, mask=mask)


@triton.jit
def _center_potential_kernel(
    q_ptr,  # [B, N, C] targets
    f_ptr,  # [B, N, CP] float32 source potentials
    out_ptr,  # [B, N, C] float32 out
    N, C, CP,
    sqb, sqn, sqc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """S = mean_i f - f; S = -inf for a dead class (sum_i q = 0). method.md section 3, op (split schedule)."""
    pid_b = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        fsum += tl.sum(tl.load(f_ptr + pid_b * N * CP + rows[:, None] * CP + cls[None, :], mask=mask, other=0.0),
                       axis=0)
        q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0)
        qsum += tl.sum(q.to(tl.float32), axis=0)
    mean = fsum / N
    dead = qsum <= 0
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        f = tl.load(f_ptr + pid_b * N * CP + rows[:, None] * CP + cls[None, :], mask=mask, other=0.0)
        s = tl.where(dead[None, :], float("-inf"), mean[None, :] - f)
        tl.store(out_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :], s, mask=mask)


_STEP_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 16, "BLOCK_S": 128, "BLOCK_C": 16}, num_warps=4, num_stages=3),
]
_step_tuned = autotune(configs=_STEP_CONFIGS, key=["N", "C", "MODE"])(_sinkhorn_step_kernel)
#: the split step's configs for tf32x3 (tensor-core dots want larger tiles; untimed guesses, its own
#: autotuner so that the default ieee path keeps the configs checked on the H100)
TF32X3_STEP_CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 32, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 64, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 128, "BLOCK_S": 32, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 32, "BLOCK_C": 16}, num_warps=4, num_stages=4),
]
_step_tuned_tf32x3 = autotune(configs=TF32X3_STEP_CONFIGS, key=["N", "C", "MODE"])(_sinkhorn_step_kernel)
_INTERPRET_STEP = {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16}


@triton.jit
def _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rmask, cls, cmask, N, a, eps,
                   kind, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_R rows, BLOCK_C classes] tile of one phase of op (the window and persistent schedules).

    kind 0: v = 1, returns the tile's column sums of q (dead classes);
    kind 1: u = a / max(K v, 1e-30);  kind 2: v = q / max(K^T u, 1e-30), read as K u when SYMMETRIC (the
    same row-major tiles as K v, never a transposed read);
    kind 3: f = eps log(a / max(K v, 1e-30)) into the u scratch, returns the tile's column sums of f.
    Returns zeros for kinds 1 and 2. ``kind`` may be a runtime value: with SYMMETRIC there is one product
    in the code (fewer registers held across the branches). method.md section 3, op; u, v: [N, CP] float32.
    """
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * CP + cls[None, :]
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if kind == 0:
        q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
        colsum = tl.sum(q, axis=0)
        tl.store(v_base + offs, tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32), mask=mask)
    else:
        if SYMMETRIC:
            x_base = v_base
            if kind == 2:
                x_base = u_base
            acc = _k_times_x_window(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                                    False, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
        elif kind == 2:
            acc = _k_times_x_window(k_base, ski, skj, u_base, CP, rows, rmask, cls, cmask, N,
                                    True, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
        else:
            acc = _k_times_x_window(k_base, ski, skj, v_base, CP, rows, rmask, cls, cmask, N,
                                    False, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
        den = tl.maximum(acc, DENOM_FLOOR)
        if kind == 2:
            q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
            tl.store(v_base + offs, q / den, mask=mask)
        elif kind == 1:
            tl.store(u_base + offs, a / den, mask=mask)
        else:
            f = tl.where(mask, eps * tl.log(a / den), 0.0)
            colsum = tl.sum(f, axis=0)
            tl.store(u_base + offs, f, mask=mask)
    return colsum


@triton.jit
def _center_tile(f_base, CP, out_base, C, rows, rmask, cls, cmask, mean, dead):
    """S = mean - f for a tile (f in the u scratch); S = -inf for a dead class (method.md section 3, op)."""
    mask = rmask[:, None] & cmask[None, :]
    f = tl.load(f_base + rows[:, None] * CP + cls[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    s = tl.where(dead[None, :], float("-inf"), mean[None, :] - f)
    tl.store(out_base + rows[:, None] * C + cls[None, :], s, mask=mask)


@triton.jit
def _sinkhorn_window_kernel(
    q_ptr,  # [B, N, C] targets b = Q[:, c] (any float dtype, any strides)
    k_ptr,  # [B, N, N] Gibbs kernel (any float dtype, any strides)
    out_ptr,  # [B, N, C] float32 out (contiguous)
    u_ptr, v_ptr,  # [B, N, CP] float32 scratch, CP = C padded to SCRATCH_PAD
    N, C, CP,
    sqb, sqn, sqc,
    skb, ski, skj,
    a, eps, iters,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The window schedule: every iteration of one window (N <= BLOCK_N) for BLOCK_C classes.

    v = 1; iters times: u = a / max(K v, 1e-30); v = q / max(K^T u, 1e-30) (K u when SYMMETRIC:
    the same row-major tiles of K as K v, never a transposed read); f = eps log(a / max(K v, 1e-30));
    S = mean_i f - f; S = -inf for a dead class (sum_i q = 0). method.md section 3, op, a = 1/N.
    Rows in blocks of BLOCK_I (BLOCK_I = BLOCK_N: all rows at once), the sum over N in one partial
    sum when BLOCK_N <= SUM_CHUNK; u, v and f in program-private scratch, a CTA barrier between phases.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    k_base = k_ptr + pid_b * skb
    q_base = q_ptr + pid_b * sqb
    u_base = u_ptr + pid_b * N * CP
    v_base = v_ptr + pid_b * N * CP
    ri = tl.arange(0, BLOCK_I)
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        qsum += _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rows < N, cls, cmask,
                               N, a, eps, 0, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_I, BLOCK_S, BLOCK_C)
    tl.debug_barrier()
    for _ in range(iters):
        for kind in tl.static_range(1, 3):
            for i0 in range(0, N, BLOCK_I):
                rows = i0 + ri
                _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rows < N, cls, cmask,
                               N, a, eps, kind, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_I, BLOCK_S, BLOCK_C)
            tl.debug_barrier()
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        fsum += _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rows < N, cls, cmask,
                               N, a, eps, 3, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_I, BLOCK_S, BLOCK_C)
    tl.debug_barrier()
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        _center_tile(u_base, CP, out_ptr + pid_b * N * C, C, rows, rows < N, cls, cmask, fsum / N, qsum <= 0)


#: spins of a grid barrier before a persistent kernel gives up (sets its error flag, leaves the loop):
#: an atomic read is ~1 us, so about 4 s; a legitimate wait is one phase (<= ~1 ms at N = 4096)
BARRIER_SPIN_LIMIT = tl.constexpr(1 << 22)


@triton.jit
def _grid_sync(bar_ptr, target):
    """Grid-wide barrier of a persistent launch: every program adds 1 to the counter at bar_ptr[0] and
    waits until it reaches ``target`` (phase number x programs: the counter only grows within a
    launch). Release / acquire atomics at GPU scope order the phase's stores (made visible to the CTA by
    the barrier before) before the next phase's loads (which read scratch with .cg, past L1). A wait
    of more than BARRIER_SPIN_LIMIT reads sets bar_ptr[2] = 1 (not every program was resident) and
    returns; the launcher raises then. Scalar atomics run once per program."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < BARRIER_SPIN_LIMIT):
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_xchg(bar_ptr + 2, 1)
    tl.debug_barrier()


@triton.jit
def _grid_exit(bar_ptr):
    """After its last phase, each program adds 1 to bar_ptr[1]; the last one resets both counters to 0,
    so the next launch (an autotuner rerun, a graph replay) starts from 0. Safe: every program has left
    every barrier before the last one arrives here."""
    done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        tl.atomic_xchg(bar_ptr, 0)
        tl.atomic_xchg(bar_ptr + 1, 0)


@triton.jit
def _tile_coords(t, RB, CB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile t of a persistent phase -> (image, row block, rows, classes); classes fastest, so the
    programs that run at the same time share K's row block."""
    cb = t % CB
    rest = t // CB
    rb = rest % RB
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return (rest // RB).to(tl.int64), rb, rows, cls


@triton.jit(do_not_specialize=["iters", "phase_lo", "phase_hi"])
def _sinkhorn_persistent_kernel(
    q_ptr,  # [B, N, C] targets b = Q[:, c] (any float dtype, any strides)
    k_ptr,  # [B, N, N] Gibbs kernel (any float dtype, any strides)
    out_ptr,  # [B, N, C] float32 out (contiguous)
    u_ptr, v_ptr,  # [B, N, CP] float32 scratch, CP = C padded to SCRATCH_PAD
    part_ptr,  # [2, B, RB, CP] float32 (RB = cdiv(N, BLOCK_R)): per row block column sums of q, f
    bar_ptr,  # [3] int32 zeros: barrier counter, exit counter, error flag
    B, N, C, CP,
    sqb, sqn, sqc,
    skb, ski, skj,
    a, eps, iters, phase_lo, phase_hi,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The persistent schedule (large N): phases phase_lo..phase_hi - 1 of op, each over all
    B * RB * CB tiles of [BLOCK_R rows, BLOCK_C classes], tiles striped over the programs (at most one
    per SM, so that all are resident), a grid barrier between phases when GRID_SYNC.

    Phase 0: v = 1 and q's column sums; phases 1..2 iters: u = a / max(K v), v = q / max(K^T u) in
    turn (K u when SYMMETRIC); phase 2 iters + 1: f = eps log(a / max(K v)) and its column sums;
    phase 2 iters + 2: S = mean f - f, -inf for a dead class. method.md section 3, op, a = 1/N.
    The column sums go through part_ptr by row block (a fixed order: no float atomics).
    Without GRID_SYNC the caller launches one phase at a time (the interpreter, which runs programs
    one after another, and so cannot wait at a barrier for programs it has not started).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    RB = tl.cdiv(N, BLOCK_R)
    CB = tl.cdiv(C, BLOCK_C)
    n_tiles = B * RB * CB
    plane = B * RB * CP
    last = 2 * iters + 2
    for phase in range(phase_lo, phase_hi):
        for t in range(pid, n_tiles, nprog):
            b, rb, rows, cls = _tile_coords(t, RB, CB, BLOCK_R, BLOCK_C)
            rmask = rows < N
            cmask = cls < C
            q_base = q_ptr + b * sqb
            k_base = k_ptr + b * skb
            u_base = u_ptr + b * N * CP
            v_base = v_ptr + b * N * CP
            part = part_ptr + (b * RB + rb) * CP + cls
            if phase < last:
                # kind 0: init; 1 / 2: the u / v half-iterations; 3: the potential f
                kind = tl.where(phase == 0, 0, tl.where(phase == last - 1, 3, 2 - phase % 2))
                colsum = _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rmask, cls,
                                        cmask, N, a, eps, kind, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_R, BLOCK_S,
                                        BLOCK_C)
                if phase == 0:
                    tl.store(part, colsum, mask=cmask)
                elif phase == last - 1:
                    tl.store(part + plane, colsum, mask=cmask)
            else:
                col = part_ptr + b * RB * CP + cls
                qsum = _part_sum(col, CP, RB, cmask, BLOCK_C)
                fsum = _part_sum(col + plane, CP, RB, cmask, BLOCK_C)
                _center_tile(u_base, CP, out_ptr + b * N * C, C, rows, rmask, cls, cmask, fsum / N, qsum <= 0)
        if GRID_SYNC:
            if phase < phase_hi - 1:
                _grid_sync(bar_ptr, (phase - phase_lo + 1) * nprog)
    if GRID_SYNC:
        _grid_exit(bar_ptr)


@triton.jit
def _part_sum(col_ptr, CP, RB, cmask, BLOCK_C: tl.constexpr):
    """Column sums of a [RB, CP] partials plane at col_ptr (a tile's classes), added in row-block order
    (read with .cg: written by other programs before a grid barrier)."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for rb in range(0, RB):
        total += tl.load(col_ptr + rb * CP, mask=cmask, other=0.0, cache_modifier=".cg")
    return total


# The window schedule's configs (untimed; chosen so that ptxas reports no spills for sm_90 with
# the ieee FMA dots: an FMA tl.dot holds its operand slices in registers, so BLOCK_I x BLOCK_S and
# BLOCK_S x BLOCK_C stay small). BLOCK_I = 256: every row of a 224 px window (N = 196) at once.
_WINDOW_CONFIGS = [
    triton.Config({"BLOCK_I": 256, "BLOCK_S": 16, "BLOCK_C": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_I": 64, "BLOCK_S": 32, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_S": 32, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 128, "BLOCK_S": 32, "BLOCK_C": 32}, num_warps=8, num_stages=3),
]
#: tf32x3 (tensor-core dots: wgmma wants 64-row blocks per warpgroup); no spills either
_WINDOW_CONFIGS_TF32X3 = [
    triton.Config({"BLOCK_I": 64, "BLOCK_S": 32, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_S": 32, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 128, "BLOCK_S": 32, "BLOCK_C": 32}, num_warps=8, num_stages=3),
]
_WINDOW_KEY = ["N", "C", "SYMMETRIC", "PRECISION"]
_window_tuned = autotune(configs=_WINDOW_CONFIGS, key=_WINDOW_KEY)(_sinkhorn_window_kernel)
_window_tuned_tf32x3 = autotune(configs=_WINDOW_CONFIGS_TF32X3, key=_WINDOW_KEY)(_sinkhorn_window_kernel)
_INTERPRET_WINDOW = {"BLOCK_I": 32, "BLOCK_S": 16, "BLOCK_C": 16}

# The persistent schedule's configs: the window schedule's tile shapes but its 256-row one (the same
# product helper, so about the same register budget for sm_90), a tile = BLOCK_R rows x BLOCK_C classes.
# Untimed.
def _as_tiles(configs: list) -> list:
    """The window configs as [BLOCK_R, BLOCK_C] tiles, but the 256-row one (too few tiles at large N)."""
    return [triton.Config({"BLOCK_R": c.kwargs["BLOCK_I"], **{k: c.kwargs[k] for k in ("BLOCK_S", "BLOCK_C")}},
                          num_warps=c.num_warps, num_stages=c.num_stages)
            for c in configs if c.kwargs["BLOCK_I"] < 256]


PERSISTENT_CONFIGS = _as_tiles(_WINDOW_CONFIGS)
PERSISTENT_CONFIGS_TF32X3 = _as_tiles(_WINDOW_CONFIGS_TF32X3)
#: the smallest BLOCK_R of the configs (sizes the partial-sums buffer for any of them)
PERSISTENT_MIN_ROWS = min(c.kwargs["BLOCK_R"] for c in PERSISTENT_CONFIGS + PERSISTENT_CONFIGS_TF32X3)
_PERSISTENT_KEY = ["B", "N", "C", "SYMMETRIC", "PRECISION"]
_persistent_tuned = autotune(configs=PERSISTENT_CONFIGS, key=_PERSISTENT_KEY)(_sinkhorn_persistent_kernel)
_persistent_tuned_tf32x3 = autotune(configs=PERSISTENT_CONFIGS_TF32X3,
                                    key=_PERSISTENT_KEY)(_sinkhorn_persistent_kernel)
_INTERPRET_PERSISTENT = {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16}
#: the interpreter runs a grid's programs one after another, so it cannot wait at a grid barrier for
#: programs it has not started: it launches one phase at a time with this many programs (tiles
#: striped over them), or, when ``INTERPRET_ONE_LAUNCH`` (the tests set it), all phases in ONE launch of
#: one program through the barrier code
INTERPRET_PROGRAMS = 3
INTERPRET_ONE_LAUNCH = False


def persistent_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of a persistent launch: one per SM at most (a CTA of any config fits on an SM alone, so
    all are resident and the grid barrier cannot wait for a program that never starts), no more than
    tiles."""
    return max(1, min(n_tiles, torch.cuda.get_device_properties(device).multi_processor_count))


def persistent_block_n(N: int) -> int:
    """The product helper's BLOCK_N for the persistent schedule: only whether it is <= SUM_CHUNK matters
    (one partial sum over N, or partial sums of SUM_CHUNK terms), so two values, two compilations."""
    return 256 if N <= 256 else 512


def launch_persistent(kernel_fn, tuned, args: tuple, consts: dict, tiles, phases: int, bar: Tensor,
                      device: torch.device, interpret_blocks: dict) -> None:
    """Launch a persistent kernel (op or mv): ``tiles(meta)`` -> the largest tile count of a phase;
    its trailing arguments are (phase_lo, phase_hi). On a GPU one launch runs every phase with grid
    barriers and, unless a CUDA graph is being captured, the error flag is checked (RuntimeError
    when a barrier timed out). In the interpreter: see INTERPRET_ONE_LAUNCH."""
    if interpreting():
        if INTERPRET_ONE_LAUNCH:
            kernel_fn[(1,)](*args, 0, phases, **consts, GRID_SYNC=True, **interpret_blocks)
            if int(bar[0]) or int(bar[1]) or int(bar[2]):
                raise RuntimeError(f"persistent barrier counters not reset: {bar.tolist()}")
            return
        grid = (max(1, min(tiles(interpret_blocks), INTERPRET_PROGRAMS)),)
        for ph in range(phases):
            kernel_fn[grid](*args, ph, ph + 1, **consts, GRID_SYNC=False, **interpret_blocks)
        return
    tuned[lambda m: (persistent_programs(tiles(m), device),)](*args, 0, phases, **consts, GRID_SYNC=True)
    if not torch.cuda.is_current_stream_capturing() and int(bar[2]):
        raise RuntimeError("the persistent schedule's grid barrier timed out: not every program was resident "
                           "(another process holding SMs, MPS limits?); use OVSS_FAST_TRITON_SCHEDULE=split")


def window_block_n(N: int) -> int:
    """BLOCK_N of the window schedule: every row of a window in one tile (tl.dot needs >= 16)."""
    return max(16, next_pow2(N))


def precision() -> str:
    """The products' input_precision: OVSS_FAST_TRITON_PRECISION (ieee, the default, or tf32x3)."""
    value = os.environ.get("OVSS_FAST_TRITON_PRECISION", "").strip().lower() or "ieee"
    if value not in PRECISIONS:
        raise ValueError(f"OVSS_FAST_TRITON_PRECISION must be one of {', '.join(PRECISIONS)}; got {value!r}")
    return value


def choose_schedule(B: int, N: int, C: int, device: torch.device, schedule: str = "auto") -> str:
    """"fused", "split", "window" or "persistent" for this call. ``schedule`` (or, when it is "auto",
    OVSS_FAST_TRITON_SCHEDULE) names one; a named "window" falls back to the auto choice of fused /
    split when N > WINDOW_MAX_N from the environment, and raises when asked for by argument.
    Auto never picks "window" or "persistent" (no GPU run has checked them yet): it is
    :func:`fused_is_better`'s choice.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if schedule == "window" and N > WINDOW_MAX_N:
        raise ValueError(f"schedule='window' takes N <= {WINDOW_MAX_N} patches, got N = {N}")
    if schedule != "auto":
        return schedule
    forced = os.environ.get("OVSS_FAST_TRITON_SCHEDULE", "").strip().lower()
    if forced == "window" and N <= WINDOW_MAX_N:
        return "window"
    if forced == "persistent":
        return "persistent"
    return "fused" if fused_is_better(B, N, C, device) else "split"


def fused_is_better(B: int, N: int, C: int, device: torch.device) -> bool:
    """Choose the schedule: one launch (B * ceil(C / 32) programs, each running every iteration)
    when that keeps at least half the SMs busy or N is small enough that launch overhead
    dominates; otherwise one row-parallel launch per half-iteration. Untuned guess, not measured;
    OVSS_FAST_TRITON_SCHEDULE=fused|split overrides it (for benchmarks).
    """
    forced = os.environ.get("OVSS_FAST_TRITON_SCHEDULE", "").strip().lower()
    if forced in ("fused", "split"):
        return forced == "fused"
    if device.type != "cuda" or N <= 256:
        return True
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * B * triton.cdiv(C, 32) >= sms


def sinkhorn_scores(q: Tensor, kernel: Tensor, *, eps: float = 0.1, iters: int = 50,
                    schedule: str = "auto", symmetric: bool = False) -> Tensor:
    """q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C] float32 (see reference.sinkhorn_scores).

    schedule: "fused" (one launch), "split" (2 * iters + 2 row-parallel launches), "window" (one
    launch, every row of a window per program; N <= WINDOW_MAX_N), "persistent" (one launch of one
    program per SM, grid barriers between phases) or "auto" (:func:`choose_schedule`);
    all give the same numbers up to float32 summation order. ``symmetric=True`` promises K = K^T
    (as gibbs_kernel builds it): the window and persistent schedules then read K^T u as K u. The other
    schedules ignore it; a non-symmetric kernel passed with it gets wrong numbers.
    """
    B, N, C = q.shape
    chosen = choose_schedule(B, N, C, q.device, schedule)
    prec = precision()
    out = torch.empty((B, N, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    cp = triton.cdiv(C, SCRATCH_PAD) * SCRATCH_PAD
    u = torch.empty((B, N, cp), dtype=torch.float32, device=q.device)
    v = torch.empty_like(u)
    if chosen == "split":
        return _sinkhorn_split(q, kernel, out, u, v, eps, iters, prec)
    if chosen == "persistent":
        return _sinkhorn_persistent(q, kernel, out, u, v, eps, iters, bool(symmetric), prec)
    with device_guard(q):
        if chosen == "window":
            args = (q, kernel, out, u, v, N, C, cp, *q.stride(), *kernel.stride(), 1.0 / N, float(eps), int(iters))
            consts = {"SYMMETRIC": bool(symmetric), "PRECISION": prec, "BLOCK_N": window_block_n(N)}
            if interpreting():
                grid = (B, triton.cdiv(C, _INTERPRET_WINDOW["BLOCK_C"]))
                _sinkhorn_window_kernel[grid](*args, **consts, **_INTERPRET_WINDOW)
            else:
                tuned = _window_tuned_tf32x3 if prec == "tf32x3" else _window_tuned
                tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args, **consts)
            return out
        args = (q, kernel, out, u, v, B, N, C, cp, *q.stride(), *kernel.stride(), 1.0 / N, float(eps), int(iters))
        if interpreting():
            _sinkhorn_scores_kernel[(B, triton.cdiv(C, _INTERPRET["BLOCK_C"]))](*args, PRECISION=prec, **_INTERPRET)
        else:
            _tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args, PRECISION=prec)
    return out


def _sinkhorn_split(q: Tensor, kernel: Tensor, out: Tensor, u: Tensor, v: Tensor, eps: float, iters: int,
                    prec: str = "ieee") -> Tensor:
    """The row-parallel schedule: every half-iteration is one launch over (image, rows, classes)."""
    B, N, C = q.shape
    cp = u.shape[2]
    v.fill_(1.0)
    common = (N, C, cp, *q.stride(), *kernel.stride(), 1.0 / N, float(eps))
    interp = interpreting()

    def step(x: Tensor, y: Tensor, mode: int) -> None:
        if interp:
            grid = (B, triton.cdiv(N, _INTERPRET_STEP["BLOCK_R"]), triton.cdiv(C, _INTERPRET_STEP["BLOCK_C"]))
            _sinkhorn_step_kernel[grid](q, kernel, x, y, *common, MODE=mode, PRECISION=prec, **_INTERPRET_STEP)
        else:
            tuned = _step_tuned_tf32x3 if prec == "tf32x3" else _step_tuned
            tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_R"]), triton.cdiv(C, m["BLOCK_C"]))](
                q, kernel, x, y, *common, MODE=mode, PRECISION=prec)

    with device_guard(q):
        for _ in range(iters):
            step(v, u, 0)
            step(u, v, 1)
        step(v, u, 2)  # f into the u scratch
        block_c = 16 if interp else 32
        _center_potential_kernel[(B, triton.cdiv(C, block_c))](q, u, out, N, C, cp, *q.stride(),
                                                              BLOCK_N=16 if interp else 64, BLOCK_C=block_c)
    return out


def _sinkhorn_persistent(q: Tensor, kernel: Tensor, out: Tensor, u: Tensor, v: Tensor, eps: float, iters: int,
                         symmetric: bool, prec: str) -> Tensor:
    """The persistent schedule: every phase in one launch of at most one program per SM."""
    B, N, C = q.shape
    cp = u.shape[2]
    rows = _INTERPRET_PERSISTENT["BLOCK_R"] if interpreting() else PERSISTENT_MIN_ROWS
    part = torch.empty((2, B, triton.cdiv(N, rows), cp), dtype=torch.float32, device=q.device)
    bar = torch.zeros(3, dtype=torch.int32, device=q.device)
    args = (q, kernel, out, u, v, part, bar, B, N, C, cp, *q.stride(), *kernel.stride(), 1.0 / N, float(eps),
            int(iters))
    consts = {"SYMMETRIC": symmetric, "PRECISION": prec, "BLOCK_N": persistent_block_n(N)}
    tuned = _persistent_tuned_tf32x3 if prec == "tf32x3" else _persistent_tuned

    def tiles(m: dict) -> int:
        return B * triton.cdiv(N, m["BLOCK_R"]) * triton.cdiv(C, m["BLOCK_C"])

    with device_guard(q):
        launch_persistent(_sinkhorn_persistent_kernel, tuned, args, consts, tiles, 2 * int(iters) + 3, bar,
                          q.device, _INTERPRET_PERSISTENT)
    return out
