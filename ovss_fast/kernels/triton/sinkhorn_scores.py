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
  the option ``schedule="window"`` (or the argument) selects it;
* persistent (large N: 784-4096 for one image), ONE launch: ``_sinkhorn_persistent_kernel``, at most
  one program per SM (so all are resident), each taking tiles of [BLOCK_R rows, BLOCK_C classes] of
  every image in turn for every phase (v = 1; the 2 * iters half-iterations; f; S), with a grid-wide
  barrier (an atomic counter, ``_grid_sync``) between phases instead of a launch; K streamed from L2
  by row block (read K[rows, :] and v[:, classes] per tile: the tile shape balances the re-reads of
  K, C / BLOCK_C per phase, against those of v, N / BLOCK_R), K^T u as K u with ``symmetric=True``;
  the column sums of the readout go through a per row block buffer (no float atomics: the same
  numbers every run). The interpreter runs a grid's programs one after another and cannot wait at a
  barrier, so there each phase is its own launch (or, in the tests, all phases in one program). Not
  yet run on a GPU: the option ``schedule="persistent"`` (or the argument) selects it.

Every schedule runs the same per-tile math (``_op_phase_tile``, ``_center_tile``); the tile helpers and
the schedule machinery they share with markov_scores are in ``_schedules``.

The option ``precision="tf32x3"`` runs every product of these kernels as split-tf32 tensor-core
dots (``input_precision="tf32x3"``, about float32 accuracy) instead of IEEE float32 FMAs; the
default is ieee. Whether tf32x3 holds the 1e-4 contract at N = 4096 is for a GPU run to show
(bench/gpu_check.py runs it; the interpreter computes every dot in float32 whatever it is told).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.common import EPS, ITERS
from ovss_fast.kernels.triton._runtime import TritonOptions, autotune, configs, device_guard, interpreting, resolve
from ovss_fast.kernels.triton._schedules import (
    _INTERPRET_PERSISTENT,
    _WINDOW_CONFIGS,
    _WINDOW_CONFIGS_TF32X3,
    ANY_N,
    DENOM_FLOOR,
    PERSISTENT_CONFIGS,
    PERSISTENT_CONFIGS_TF32X3,
    PERSISTENT_MIN_ROWS,
    SCRATCH_PAD,
    TF32X3_STEP_CONFIGS,
    WINDOW_MAX_N,
    _class_tile,
    _column_sums,
    _k_times_x_window,
    _launch_done,
    _part_sum,
    _phase_done,
    _q_tile,
    _scores_tile,
    _tile_coords,
    choose_schedule,
    launch_persistent,
    persistent_block_n,
    window_block_n,
)

__all__ = ["SCRATCH_PAD", "WINDOW_MAX_N", "choose_schedule", "sinkhorn_scores"]


@triton.jit
def _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rmask, cls, cmask, N, a, eps,
                   kind, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_R rows, BLOCK_C classes] tile of one phase of op (every schedule).

    kind 0: v = 1, returns the tile's column sums of q (dead classes);
    kind 1: u = a / max(K v, 1e-30);  kind 2: v = q / max(K^T u, 1e-30), read as K u when SYMMETRIC (the
    same row-major tiles as K v, never a transposed read);
    kind 3: f = eps log(a / max(K v, 1e-30)) into the u scratch, returns the tile's column sums of f.
    Returns zeros for kinds 1 and 2. ``kind`` may be a runtime value: with SYMMETRIC there is one product
    in the code (fewer registers held across the branches). The products sum over N in columns of
    BLOCK_S (:func:`_k_times_x_window`; BLOCK_N = ANY_N: partial sums of SUM_CHUNK, as the fused and split
    schedules). method.md section 3, op; u, v: [N, CP] float32.
    """
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if kind == 0:
        q, mask = _q_tile(q_base, sqn, sqc, rows, rmask, cls, cmask)
        colsum = tl.sum(q, axis=0)
        tl.store(v_base + rows[:, None] * CP + cls[None, :], tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32), mask=mask)
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
        mask = rmask[:, None] & cmask[None, :]  # after the product: not held in registers across the sum
        offs = rows[:, None] * CP + cls[None, :]
        if kind == 2:
            q, mask = _q_tile(q_base, sqn, sqc, rows, rmask, cls, cmask)
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
    _scores_tile(out_base, C, rows, cls, mask, mean[None, :] - f, dead)


@triton.jit
def _op_phase(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, N, cls, cmask, a, eps, kind,
              SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One phase ``kind`` of op over all N rows in blocks of BLOCK_R (:func:`_op_phase_tile`), in one program
    (the fused and window schedules), then a CTA barrier; returns the column sums of kinds 0 and 3."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_R):
        rows = i0 + tl.arange(0, BLOCK_R)
        colsum = _op_phase_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, rows, rows < N, cls, cmask,
                                N, a, eps, kind, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C)
        if (kind == 0) or (kind == 3):  # kinds 1 and 2 carry no sum through their loop
            total += colsum
    tl.debug_barrier()
    return total


@triton.jit
def _op_class_tile(q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, out_base, N, C, CP, cls, cmask, a, eps,
                   iters, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_U: tl.constexpr, BLOCK_US: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_VS: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Every phase of op for one image and BLOCK_C classes in one program (the fused and window schedules):
    v = 1 (rows in blocks of BLOCK_V); iters times: u = a / max(K v) (rows in blocks of BLOCK_U, the sum over
    N in blocks of BLOCK_US), v = q / max(K^T u) (BLOCK_V, BLOCK_VS); f (BLOCK_U, BLOCK_US); S = mean f - f.
    u, v and f in program-private scratch, a CTA barrier between phases (:func:`_op_phase`)."""
    args = (q_base, sqn, sqc, k_base, ski, skj, u_base, v_base, CP, N, cls, cmask, a, eps)
    qsum = _op_phase(*args, 0, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_V, BLOCK_VS, BLOCK_C)
    for _ in range(iters):
        _op_phase(*args, 1, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_U, BLOCK_US, BLOCK_C)
        _op_phase(*args, 2, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_V, BLOCK_VS, BLOCK_C)
    mean = _op_phase(*args, 3, SYMMETRIC, PRECISION, BLOCK_N, BLOCK_U, BLOCK_US, BLOCK_C) / N
    dead = qsum <= 0
    for i0 in range(0, N, BLOCK_U):
        rows = i0 + tl.arange(0, BLOCK_U)
        _center_tile(u_base, CP, out_base, C, rows, rows < N, cls, cmask, mean, dead)


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

    method.md section 3, op, with a = 1/N (:func:`_op_class_tile`: u and f rows in blocks of BLOCK_I,
    v rows in blocks of BLOCK_J). Matrix products run in IEEE float32 (no tf32): 50 iterations of tf32
    products would miss the 1e-4 contract.
    """
    pid_b, cls, cmask = _class_tile(C, BLOCK_C)
    _op_class_tile(q_ptr + pid_b * sqb, sqn, sqc, k_ptr + pid_b * skb, ski, skj, u_ptr + pid_b * N * CP,
                   v_ptr + pid_b * N * CP, out_ptr + pid_b * N * C, N, C, CP, cls, cmask, a, eps, iters,
                   False, PRECISION, ANY_N, BLOCK_I, BLOCK_J, BLOCK_J, BLOCK_I, BLOCK_C)


# fp32 FMA dots: [64, 64] x [64, BLOCK_C] per step. Small BLOCK_C buys programs (parallelism,
# B * C / BLOCK_C of them on 132 SMs) at the price of reading K once more per class tile.
_CONFIGS = configs("BLOCK_I BLOCK_J BLOCK_C", [
    (64, 64, 16, 4), (64, 64, 32, 4), (64, 64, 64, 8), (128, 64, 32, 8), (32, 128, 16, 4)
], num_stages=3)
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
    MODE 0: u = a / max(K v, 1e-30);  MODE 1: v = q / max(K^T u, 1e-30);  MODE 2: f = eps log(a / max(K v, 1e-30))
    (:func:`_op_phase_tile` kind MODE + 1). method.md section 3, op. IEEE float32 products (no tf32).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_base = x_ptr + pid_b * N * CP
    y_base = y_ptr + pid_b * N * CP
    if MODE == 1:
        u_base, v_base = x_base, y_base
    else:
        u_base, v_base = y_base, x_base
    _op_phase_tile(q_ptr + pid_b * sqb, sqn, sqc, k_ptr + pid_b * skb, ski, skj, u_base, v_base, CP, rows, rows < N,
                   cls, cls < C, N, a, eps, MODE + 1, False, PRECISION, ANY_N, BLOCK_R, BLOCK_S, BLOCK_C)


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
    pid_b, cls, cmask = _class_tile(C, BLOCK_C)
    f_base = f_ptr + pid_b * N * CP
    qsum, fsum = _column_sums(q_ptr + pid_b * sqb, sqn, sqc, f_base, CP, N, cls, cmask, True, BLOCK_N, BLOCK_C)
    mean = fsum / N
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        _center_tile(f_base, CP, out_ptr + pid_b * N * C, C, rows, rows < N, cls, cmask, mean, qsum <= 0)


_STEP_CONFIGS = configs("BLOCK_R BLOCK_S BLOCK_C", [
    (32, 64, 16, 4), (32, 64, 32, 4), (64, 64, 32, 4), (64, 64, 64, 8), (16, 128, 16, 4)
], num_stages=3)
_step_tuned = autotune(configs=_STEP_CONFIGS, key=["N", "C", "MODE"])(_sinkhorn_step_kernel)
_step_tuned_tf32x3 = autotune(configs=TF32X3_STEP_CONFIGS, key=["N", "C", "MODE"])(_sinkhorn_step_kernel)
_INTERPRET_STEP = {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16}


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
    sum when BLOCK_N <= SUM_CHUNK; u, v and f in program-private scratch, a CTA barrier between phases
    (:func:`_op_class_tile`, as the fused schedule).
    """
    pid_b, cls, cmask = _class_tile(C, BLOCK_C)
    _op_class_tile(q_ptr + pid_b * sqb, sqn, sqc, k_ptr + pid_b * skb, ski, skj, u_ptr + pid_b * N * CP,
                   v_ptr + pid_b * N * CP, out_ptr + pid_b * N * C, N, C, CP, cls, cmask, a, eps, iters,
                   SYMMETRIC, PRECISION, BLOCK_N, BLOCK_I, BLOCK_S, BLOCK_I, BLOCK_S, BLOCK_C)


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
    RB = tl.cdiv(N, BLOCK_R)
    CB = tl.cdiv(C, BLOCK_C)
    plane = B * RB * CP
    last = 2 * iters + 2
    for phase in range(phase_lo, phase_hi):
        for t in range(tl.program_id(0), B * RB * CB, tl.num_programs(0)):
            b, rb, rows, rmask, cls, cmask = _tile_coords(t, RB, CB, N, C, BLOCK_R, BLOCK_C)
            u_base = u_ptr + b * N * CP
            part = part_ptr + (b * RB + rb) * CP + cls
            if phase < last:
                # kind 0: init; 1 / 2: the u / v half-iterations; 3: the potential f
                kind = tl.where(phase == 0, 0, tl.where(phase == last - 1, 3, 2 - phase % 2))
                colsum = _op_phase_tile(q_ptr + b * sqb, sqn, sqc, k_ptr + b * skb, ski, skj, u_base,
                                        v_ptr + b * N * CP, CP, rows, rmask, cls, cmask, N, a, eps, kind, SYMMETRIC,
                                        PRECISION, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C)
                if phase == 0:
                    tl.store(part, colsum, mask=cmask)
                elif phase == last - 1:
                    tl.store(part + plane, colsum, mask=cmask)
            else:
                col = part_ptr + b * RB * CP + cls
                qsum = _part_sum(col, CP, RB, cmask, BLOCK_C)
                fsum = _part_sum(col + plane, CP, RB, cmask, BLOCK_C)
                _center_tile(u_base, CP, out_ptr + b * N * C, C, rows, rmask, cls, cmask, fsum / N, qsum <= 0)
        _phase_done(bar_ptr, phase, phase_lo, phase_hi, GRID_SYNC)
    _launch_done(bar_ptr, GRID_SYNC)

_WINDOW_KEY = ["N", "C", "SYMMETRIC", "PRECISION"]
_window_tuned = autotune(configs=_WINDOW_CONFIGS, key=_WINDOW_KEY)(_sinkhorn_window_kernel)
_window_tuned_tf32x3 = autotune(configs=_WINDOW_CONFIGS_TF32X3, key=_WINDOW_KEY)(_sinkhorn_window_kernel)
_INTERPRET_WINDOW = {"BLOCK_I": 32, "BLOCK_S": 16, "BLOCK_C": 16}

_PERSISTENT_KEY = ["B", "N", "C", "SYMMETRIC", "PRECISION"]
_persistent_tuned = autotune(configs=PERSISTENT_CONFIGS, key=_PERSISTENT_KEY)(_sinkhorn_persistent_kernel)
_persistent_tuned_tf32x3 = autotune(configs=PERSISTENT_CONFIGS_TF32X3,
                                    key=_PERSISTENT_KEY)(_sinkhorn_persistent_kernel)

def sinkhorn_scores(q: Tensor, kernel: Tensor, *, eps: float = EPS, iters: int = ITERS,
                    schedule: str = "auto", symmetric: bool = False, options: TritonOptions | None = None) -> Tensor:
    """q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C] float32 (see reference.sinkhorn_scores).

    schedule: "fused" (one launch), "split" (2 * iters + 2 row-parallel launches), "window" (one
    launch, every row of a window per program; N <= WINDOW_MAX_N), "persistent" (one launch of one
    program per SM, grid barriers between phases) or "auto" (:func:`choose_schedule`);
    all give the same numbers up to float32 summation order. ``symmetric=True`` promises K = K^T
    (as gibbs_kernel builds it): the window and persistent schedules then read K^T u as K u. The other
    schedules ignore it; a non-symmetric kernel passed with it gets wrong numbers. ``options``
    (:class:`~ovss_fast.kernels.triton._runtime.TritonOptions`, default
    :func:`~ovss_fast.kernels.triton._runtime.defaults`): the preferred schedule when ``schedule`` is
    "auto", and the products' precision.
    """
    B, N, C = q.shape
    opts = resolve(options)
    chosen = choose_schedule(B, N, C, q.device, schedule, opts.schedule)
    prec = opts.precision
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
