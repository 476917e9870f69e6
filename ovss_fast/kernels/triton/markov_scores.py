"""Triton markov_scores: doubly stochastic transition and the Markov chain (method.md section 3, mv).

T is never materialised: T = diag(r) K diag(c), with the scale vectors r, c [B, N] updated by
Sinkhorn-Knopp, which is exactly "normalise the rows of T, then its columns" of the reference:
the row sums of T are r_i (K c)_i and its column sums c_j (K^T r)_j.

The chain is carried as its deviation d = f - 1 from the uniform level, as in the reference:
d(0) = N q - 1, d(l) = T^T d(l-1) + e with e_j = c_j (K^T r)_j - 1 (T's column sums - 1, ~0
after SK), S = sum_l d(l). Carrying f itself loses accuracy in float32 (f - 1 cancels as the
chain mixes: 2.2e-4 of float64 at N = 192, C = 2 under the interpreter, ~1.5e-3 at N = 2304,
C = 21 in a PyTorch emulation). The scale vectors and e are computed in float64: the drift
enters S about l times over, and float32 column sums (rounding noise ~1e-7; c itself off by
~3e-6 at N = 2304) would put 1.4e-4 back in at N = 2304. The chain runs in float32 with r, c
rounded to float32 once (the e of the float64 scales stands in for theirs).

Launches per call: 2 * sk_iters small ones (``_sk_step_kernel`` KIND 0 and 1; each
parallel over row / column blocks of every image), one for the drift (KIND 2), then the chain in
one of two schedules
(as for sinkhorn_scores, chosen by ``fused_is_better`` or forced with ``schedule=``):

* fused: ONE ``_markov_scores_kernel`` launch runs all ``steps`` chain steps, a program per
  (image, tile of BLOCK_C classes), f ping-ponging between two program-private scratch
  slices in global memory, a CTA barrier between steps;
* split: one ``_markov_step_kernel`` launch per step over (image, row block, class block),
  then ``_markov_finish_kernel`` (velocity readout, dead classes);
* window (N <= WINDOW_MAX_N, the pipeline's batches of 224 px windows): TWO launches for the
  whole batch. ``_sk_window_kernel``, one program per window, runs every Sinkhorn-Knopp
  iteration and the drift (float64, as above) instead of 2 * sk_iters + 1 launches;
  ``_markov_window_kernel``, one program per (window, class tile), runs the chain with rows in
  blocks of BLOCK_I (sinkhorn_scores' window configs), the scratch holding r * d(l) already
  scaled for the next product (and d itself for the velocity readout). With ``symmetric=True``
  (gibbs_kernel's K) K^T y is read as K y, and the SK column sums as row sums. Not yet run on
  a GPU, so auto never picks it: the option or argument ``schedule="window"``;
* persistent (large N), ONE launch for everything: ``_markov_persistent_kernel`` (sinkhorn_scores'
  persistent schedule: one program per SM at most, grid barriers between phases) runs r = c = 1,
  the 2 * sk_iters Sinkhorn-Knopp steps and the drift (float64, blocks of SK_BLOCK_I patches), then
  the chain steps over [BLOCK_R, BLOCK_C] tiles and the readout: 2 * sk_iters + steps + 4 phases,
  2 * sk_iters + steps + 3 barriers, instead of 2 * sk_iters + steps + 2 launches. Not yet run on a
  GPU: the option or argument ``schedule="persistent"``.

The option ``precision="tf32x3"`` makes the chain's products split-tf32 tensor-core dots (see
sinkhorn_scores); Sinkhorn-Knopp stays float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.kernels.common import SK_ITERS, STEPS, TAU
from ovss_fast.kernels.triton import _schedules as sched
from ovss_fast.kernels.triton._runtime import TritonOptions, autotune, configs, device_guard, interpreting, resolve
from ovss_fast.kernels.triton._schedules import SCRATCH_PAD, WINDOW_MAX_N

__all__ = ["SCRATCH_PAD", "WINDOW_MAX_N", "column_drift", "doubly_stochastic_scales", "markov_scores"]


# ------------------------------------------------------------------ Sinkhorn-Knopp (float64)
@triton.jit
def _sk_sums(k_base, ski, skj, w_base, idx, imask, N, ROWS: tl.constexpr, CACHE: tl.constexpr,
             BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """float64 sums of Sinkhorn-Knopp (method.md section 3, mv); w: [N] float64 at w_base, read with the
    cache modifier CACHE (".cg" where other programs or threads wrote it before a barrier).
    ROWS: sum_j K[idx, j] w_j for BLOCK_I patches idx (tiles [idx, j] of K, j in blocks of BLOCK_J);
    else: sum_i w_i K[i, idx] for BLOCK_J patches idx (tiles [i, idx], i in blocks of BLOCK_I)."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    if ROWS:
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            k = tl.load(k_base + idx[:, None] * ski + cols[None, :] * skj,
                        mask=imask[:, None] & (cols < N)[None, :], other=0.0).to(tl.float64)
            acc += k * tl.load(w_base + cols, mask=cols < N, other=0.0, cache_modifier=CACHE)[None, :]
        sums = tl.sum(acc, axis=1)
    else:
        for i0 in range(0, N, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            k = tl.load(k_base + rows[:, None] * ski + idx[None, :] * skj,
                        mask=(rows < N)[:, None] & imask[None, :], other=0.0).to(tl.float64)
            acc += k * tl.load(w_base + rows, mask=rows < N, other=0.0, cache_modifier=CACHE)[:, None]
        sums = tl.sum(acc, axis=0)
    return sums


@triton.jit
def _sk_rescale(x_base, idx, imask, sums, CACHE: tl.constexpr):
    """A Sinkhorn-Knopp step for the patches idx: x_i <- x_i / max(x_i sums_i, 1e-30), float64 (x = r or c);
    x_i kept where sums_i = 0 (a zero row / column of K, as W = Sym / M may have: T's row stays 0, as in the
    reference, instead of x growing by 1e30 a step to inf and 0 * inf = NaN)."""
    x = tl.load(x_base + idx, mask=imask, other=1.0, cache_modifier=CACHE)
    tl.store(x_base + idx, tl.where(sums > 0, x / tl.maximum(x * sums, sched.DENOM_FLOOR), x), mask=imask)


@triton.jit
def _sk_drift(c_base, e_base, idx, imask, sums, CACHE: tl.constexpr):
    """e_j = c_j sums_j - 1 as float32 (T's column sums - 1, sums_j = sum_i r_i K_ij)."""
    c = tl.load(c_base + idx, mask=imask, other=1.0, cache_modifier=CACHE)
    tl.store(e_base + idx, (c * sums - 1.0).to(tl.float32), mask=imask)


@triton.jit
def _sk_phase_tile(k_base, ski, skj, r_base, c_base, e_base, idx, imask, N, kind,
                   SYMMETRIC: tl.constexpr, CACHE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """One block ``idx`` of BLOCK_I patches of one Sinkhorn-Knopp phase, in float64 (every schedule; the sum
    over N in blocks of BLOCK_J; r, c read with the cache modifier CACHE):
    kind 0: r_i <- r_i / max(r_i sum_j K_ij c_j, 1e-30);  kind 1: c_j <- c_j / max(c_j sum_i r_i K_ij, 1e-30);
    kind 2: e_j = c_j sum_i r_i K_ij - 1 (float32). The column sums are read as row sums (sum_i K_ji r_i)
    when SYMMETRIC. method.md section 3, mv."""
    if kind == 0:
        sums = _sk_sums(k_base, ski, skj, c_base, idx, imask, N, True, CACHE, BLOCK_I, BLOCK_J)
        _sk_rescale(r_base, idx, imask, sums, CACHE)
    else:
        if SYMMETRIC:
            sums = _sk_sums(k_base, ski, skj, r_base, idx, imask, N, True, CACHE, BLOCK_I, BLOCK_J)
        else:
            sums = _sk_sums(k_base, ski, skj, r_base, idx, imask, N, False, CACHE, BLOCK_J, BLOCK_I)
        if kind == 1:
            _sk_rescale(c_base, idx, imask, sums, CACHE)
        else:
            _sk_drift(c_base, e_base, idx, imask, sums, CACHE)


@triton.jit
def _sk_step_kernel(
    k_ptr,  # [B, N, N] kernel (any float dtype, any strides)
    r_ptr, c_ptr,  # [B, N] float64 scale vectors; r (KIND 0) or c (KIND 1) updated in place
    e_ptr,  # [B, N] float32 out (KIND 2): e_j = c_j sum_i r_i K_ij - 1
    N,
    skb, ski, skj,
    KIND: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One Sinkhorn-Knopp step of every image, in float64 (the fused and split schedules; method.md section 3,
    mv; :func:`_sk_phase_tile`): KIND 0, the row step r_i <- r_i / max(r_i * sum_j K_ij c_j, 1e-30), a program
    per BLOCK_I rows (the sum in blocks of BLOCK_J); KIND 1, the column step c_j <- c_j / max(c_j * sum_i
    r_i K_ij, 1e-30), and KIND 2, T's column sums minus 1 (the chain's drift d(l) = T^T d(l-1) + e), a
    program per BLOCK_J columns (the sum in blocks of BLOCK_I)."""
    pid_b = tl.program_id(0).to(tl.int64)
    k_base = k_ptr + pid_b * skb
    if KIND == 0:
        idx = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        _sk_phase_tile(k_base, ski, skj, r_ptr + pid_b * N, c_ptr + pid_b * N, e_ptr + pid_b * N, idx, idx < N, N,
                       KIND, False, "", BLOCK_I, BLOCK_J)
    else:
        idx = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        _sk_phase_tile(k_base, ski, skj, r_ptr + pid_b * N, c_ptr + pid_b * N, e_ptr + pid_b * N, idx, idx < N, N,
                       KIND, False, "", BLOCK_J, BLOCK_I)


@triton.jit(do_not_specialize=["sk_iters"])
def _sk_window_kernel(
    k_ptr,  # [B, N, N] kernel (any float dtype, any strides)
    r_ptr, c_ptr,  # [B, N] float64 scale vectors, 1 on entry; updated in place
    e_ptr,  # [B, N] float32 out: e_j = c_j sum_i r_i K_ij - 1
    N, sk_iters,
    skb, ski, skj,
    SYMMETRIC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Every Sinkhorn-Knopp iteration of one window and its drift, in float64 (the window schedule):
    sk_iters times r_i <- r_i / max(r_i sum_j K_ij c_j, 1e-30), then c_j <- c_j / max(c_j sum_i r_i K_ij,
    1e-30); then e_j = c_j sum_i r_i K_ij - 1. With SYMMETRIC the column sums are read as row sums
    (sum_i K_ji r_i). method.md section 3, mv. CTA barriers between the steps."""
    pid_b = tl.program_id(0).to(tl.int64)
    k_base = k_ptr + pid_b * skb
    r_base = r_ptr + pid_b * N
    c_base = c_ptr + pid_b * N
    e_base = e_ptr + pid_b * N
    for phase in range(0, 2 * sk_iters + 1):
        kind = tl.where(phase == 2 * sk_iters, 2, phase % 2)
        for i0 in range(0, N, BLOCK_I):
            idx = i0 + tl.arange(0, BLOCK_I)
            _sk_phase_tile(k_base, ski, skj, r_base, c_base, e_base, idx, idx < N, N, kind, SYMMETRIC, ".cg",
                           BLOCK_I, BLOCK_J)
        tl.debug_barrier()


# ------------------------------------------------------------------ the chain and its readout
@triton.jit
def _readout_store(o_ptrs, mask, dnew, dold_ptrs, step, steps, tau, VELOCITY: tl.constexpr, CACHE: tl.constexpr):
    """The running readout in out after chain step l = ``step``: integrated: out += d(l); velocity: out = l
    where out > steps (not settled yet) and |d(l) - d(l-1)| <= tau (d(l-1) read at dold_ptrs with CACHE)
    (method.md section 3, mv)."""
    held = tl.load(o_ptrs, mask=mask, other=0.0)
    if VELOCITY:
        dold = tl.load(dold_ptrs, mask=mask, other=0.0, cache_modifier=CACHE)
        held = tl.where((tl.abs(dnew - dold) <= tau) & (held > steps), step * 1.0, held)
    else:
        held = held + dnew
    tl.store(o_ptrs, held, mask=mask)


@triton.jit
def _chain_start_tile(q_base, sqn, sqc, o_base, C, rows, rmask, cls, cmask, steps, VELOCITY: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Step 0 of the chain for a tile (every schedule): out = 0 (integrated) or steps + 1 (velocity);
    returns q (float32) and the tile's mask, for d(0) = N q - 1 and the dead classes."""
    q, mask = sched._q_tile(q_base, sqn, sqc, rows, rmask, cls, cmask)
    if VELOCITY:
        init = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32) + (steps + 1)
    else:
        init = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    tl.store(o_base + rows[:, None] * C + cls[None, :], init, mask=mask)
    return q, mask


@triton.jit
def _mv_step_tile(k_base, ski, skj, r_base, c_base, e_base, src, dst, o_base, CP, C, cols, jmask, cls, cmask, N,
                  step, steps, tau, VELOCITY: tl.constexpr, PRECISION: tl.constexpr, CACHE: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chain step l for BLOCK_R patches j (``cols``) and BLOCK_C classes (the fused and split schedules):
    d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j, r, c float32, one running float32 tl.dot accumulator
    over N in blocks of BLOCK_S; d(l-1) at src, d(l) to dst ([N, CP] float32 scratch, read with CACHE);
    the readout updated in out (:func:`_readout_store`). method.md section 3, mv."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_S):
        rows = i0 + tl.arange(0, BLOCK_S)
        rmask = rows < N
        k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                    mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        r = tl.load(r_base + rows, mask=rmask, other=0.0)
        f = tl.load(src + rows[:, None] * CP + cls[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0,
                    cache_modifier=CACHE)
        acc = tl.dot(tl.trans(k), f * r[:, None], acc, input_precision=PRECISION)
    c = tl.load(c_base + cols, mask=jmask, other=0.0)
    e = tl.load(e_base + cols, mask=jmask, other=0.0)
    dnew = acc * c[:, None] + e[:, None]
    mask = jmask[:, None] & cmask[None, :]
    offs = cols[:, None] * CP + cls[None, :]
    tl.store(dst + offs, dnew, mask=mask)
    _readout_store(o_base + cols[:, None] * C + cls[None, :], mask, dnew, src + offs, step, steps, tau, VELOCITY,
                   CACHE)


@triton.jit
def _chain_finish_tile(q_base, sqn, sqc, o_base, C, rows, rmask, cls, cmask, N, dead, VELOCITY: tl.constexpr):
    """The readout of a tile (every schedule): integrated: S = sum_l d(l) (as held in out); velocity:
    S = lstar + f(0) / (1 + f(0)), f(0) = N q (slow settling wins, ties to the stronger f(0));
    S = -inf for a dead class (method.md section 3, mv)."""
    mask = rmask[:, None] & cmask[None, :]
    s = tl.load(o_base + rows[:, None] * C + cls[None, :], mask=mask, other=0.0)
    if VELOCITY:
        q, mask = sched._q_tile(q_base, sqn, sqc, rows, rmask, cls, cmask)
        f0 = N * q
        s = s + f0 / (1.0 + f0)
    sched._scores_tile(o_base, C, rows, cls, mask, s, dead)


@triton.jit
def _markov_scores_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    k_ptr,  # [B, N, N] kernel
    r_ptr, c_ptr,  # [B, N] float32: T = diag(r) K diag(c) (the float64 SK scales, rounded)
    e_ptr,  # [B, N] float32: T's column sums - 1
    out_ptr,  # [B, N, C] float32 out (contiguous); holds the running sum / lstar during the chain
    f_ptr,  # [2, B, N, CP] float32 scratch: d(l-1) and d(l); plane = B * N * CP
    B, N, C, CP, plane,
    sqb, sqn, sqc,
    skb, ski, skj,
    steps, tau,
    VELOCITY: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
):
    """The chain as its deviation d = f - 1: d(0) = N q - 1;
    d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j (= (T^T f(l-1))[j] - 1), l = 1..steps.

    integrated: S = sum_l d(l).  velocity: lstar = first l with |d(l) - d(l-1)| <= tau
    (steps + 1 if never), S = lstar + f(0) / (1 + f(0)).  S = -inf for a dead class (sum_i q = 0).
    method.md section 3, mv. Products run in IEEE float32 (no tf32). Patches j in blocks of BLOCK_J,
    the sum over i in blocks of BLOCK_I (:func:`_mv_step_tile`), a CTA barrier between steps.
    """
    pid_b, cls, cmask = sched._class_tile(C, BLOCK_C)
    q_base = q_ptr + pid_b * sqb
    o_base = out_ptr + pid_b * N * C
    f_base = f_ptr + pid_b * N * CP
    rj = tl.arange(0, BLOCK_J)
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rows = j0 + rj
        q, mask = _chain_start_tile(q_base, sqn, sqc, o_base, C, rows, rows < N, cls, cmask, steps, VELOCITY,
                                    BLOCK_J, BLOCK_C)
        qsum += tl.sum(q, axis=0)
        tl.store(f_base + rows[:, None] * CP + cls[None, :], N * q - 1.0, mask=mask)
    tl.debug_barrier()
    for step in range(1, steps + 1):
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + rj
            _mv_step_tile(k_ptr + pid_b * skb, ski, skj, r_ptr + pid_b * N, c_ptr + pid_b * N, e_ptr + pid_b * N,
                          f_base + ((step - 1) % 2) * plane, f_base + (step % 2) * plane, o_base, CP, C, cols,
                          cols < N, cls, cmask, N, step, steps, tau, VELOCITY, PRECISION, ".cg", BLOCK_J, BLOCK_I,
                          BLOCK_C)
        tl.debug_barrier()
    for j0 in range(0, N, BLOCK_J):
        rows = j0 + rj
        _chain_finish_tile(q_base, sqn, sqc, o_base, C, rows, rows < N, cls, cmask, N, qsum <= 0, VELOCITY)


@triton.jit(do_not_specialize=["step", "steps"])
def _markov_step_kernel(
    k_ptr,  # [B, N, N] kernel
    r_ptr, c_ptr,  # [B, N] float32: T = diag(r) K diag(c) (the float64 SK scales, rounded)
    e_ptr,  # [B, N] float32: T's column sums - 1
    src_ptr, dst_ptr,  # [B, N, CP] float32: d(l-1) in, d(l) out (d = f - 1)
    out_ptr,  # [B, N, C] float32: running sum (integrated) or lstar (velocity), updated in place
    N, C, CP,
    skb, ski, skj,
    step, steps, tau,
    VELOCITY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr = "ieee",
):
    """Chain step l for BLOCK_R patches j and BLOCK_C classes (the split schedule, :func:`_mv_step_tile`):
    d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j; integrated: out += d(l); velocity: out = l where
    out > steps and |d(l) - d(l-1)| <= tau. method.md section 3, mv. IEEE float32 products (no tf32).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    _mv_step_tile(k_ptr + pid_b * skb, ski, skj, r_ptr + pid_b * N, c_ptr + pid_b * N, e_ptr + pid_b * N,
                  src_ptr + pid_b * N * CP, dst_ptr + pid_b * N * CP, out_ptr + pid_b * N * C, CP, C, cols, cols < N,
                  cls, cls < C, N, step, steps, tau, VELOCITY, PRECISION, "", BLOCK_R, BLOCK_S, BLOCK_C)


@triton.jit
def _markov_finish_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    out_ptr,  # [B, N, C] float32: running sum / lstar in, scores out
    N, C,
    sqb, sqn, sqc,
    VELOCITY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """velocity: S = lstar + f(0) / (1 + f(0)) with f(0) = N q; S = -inf for a dead class (sum_i q = 0).
    method.md section 3, mv (split schedule, :func:`_chain_finish_tile`)."""
    pid_b, cls, cmask = sched._class_tile(C, BLOCK_C)
    q_base = q_ptr + pid_b * sqb
    qsum, _ = sched._column_sums(q_base, sqn, sqc, q_base, 0, N, cls, cmask, False, BLOCK_N, BLOCK_C)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        _chain_finish_tile(q_base, sqn, sqc, out_ptr + pid_b * N * C, C, rows, rows < N, cls, cmask, N, qsum <= 0,
                           VELOCITY)


@triton.jit
def _chain_init_tile(q_base, sqn, sqc, r_base, o_base, dst, plane, CP, C, rows, rmask, cls, cmask, N, steps,
                     VELOCITY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Step 0 of the chain for a tile (the window and persistent schedules): y(0) = r (N q - 1) into dst
    (and, VELOCITY, d(0) = N q - 1 two planes on), out = 0 (integrated) or steps + 1 (velocity); returns
    the tile's column sums of q (dead classes). method.md section 3, mv."""
    q, mask = _chain_start_tile(q_base, sqn, sqc, o_base, C, rows, rmask, cls, cmask, steps, VELOCITY, BLOCK_R,
                                BLOCK_C)
    offs = rows[:, None] * CP + cls[None, :]
    r = tl.load(r_base + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(dst + offs, r[:, None] * (N * q - 1.0), mask=mask)
    if VELOCITY:
        tl.store(dst + 2 * plane + offs, N * q - 1.0, mask=mask)
    return tl.sum(q, axis=0)


@triton.jit
def _chain_step_tile(k_base, ski, skj, r_base, c_base, e_base, o_base, src, dst, plane, CP, C,
                     rows, rmask, cls, cmask, N, step, steps, tau,
                     VELOCITY: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chain step l >= 1 for a [BLOCK_R patches, BLOCK_C classes] tile (the window and persistent
    schedules); the scratch holds y = r * d, pre-scaled for the next product:
    d(l)[j] = c_j sum_i K_ij y(l-1)[i] + e_j (read as K_ji when SYMMETRIC), y(l) = r d(l) into dst;
    integrated: out += d(l); velocity: out = l where out > steps and |d(l) - d(l-1)| <= tau (d two planes
    on). r, c may be float32 or float64 (rounded to float32 here: the same numbers as rounding them
    first). method.md section 3, mv."""
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * CP + cls[None, :]
    if SYMMETRIC:
        acc = sched._k_times_x_window(k_base, ski, skj, src, CP, rows, rmask, cls, cmask, N,
                                False, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
    else:
        acc = sched._k_times_x_window(k_base, ski, skj, src, CP, rows, rmask, cls, cmask, N,
                                True, BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
    r = tl.load(r_base + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    c = tl.load(c_base + rows, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    e = tl.load(e_base + rows, mask=rmask, other=0.0, cache_modifier=".cg")
    dnew = acc * c[:, None] + e[:, None]
    tl.store(dst + offs, r[:, None] * dnew, mask=mask)
    if VELOCITY:
        tl.store(dst + 2 * plane + offs, dnew, mask=mask)
    _readout_store(o_base + rows[:, None] * C + cls[None, :], mask, dnew, src + 2 * plane + offs, step, steps, tau,
                   VELOCITY, ".cg")


@triton.jit(do_not_specialize=["steps"])
def _markov_window_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    k_ptr,  # [B, N, N] kernel
    r_ptr, c_ptr,  # [B, N] float32: T = diag(r) K diag(c) (the float64 SK scales, rounded)
    e_ptr,  # [B, N] float32: T's column sums - 1
    out_ptr,  # [B, N, C] float32 out (contiguous); the running sum / lstar during the chain
    y_ptr,  # [2 or 4, B, N, CP] float32 scratch: r * d(l-1), r * d(l) (and, VELOCITY, d(l-1), d(l));
    # plane = B * N * CP
    N, C, CP, plane,
    sqb, sqn, sqc,
    skb, ski, skj,
    steps, tau,
    VELOCITY: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The chain of one window (N <= BLOCK_N) for BLOCK_C classes (the window schedule):
    d(0) = N q - 1; d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j (read as K_ji when SYMMETRIC), l = 1..steps.

    integrated: S = sum_l d(l).  velocity: lstar = first l with |d(l) - d(l-1)| <= tau
    (steps + 1 if never), S = lstar + f(0) / (1 + f(0)).  S = -inf for a dead class (sum_i q = 0).
    method.md section 3, mv. Rows in blocks of BLOCK_I (:func:`_chain_init_tile`, :func:`_chain_step_tile`);
    a CTA barrier between steps.
    """
    pid_b, cls, cmask = sched._class_tile(C, BLOCK_C)
    q_base = q_ptr + pid_b * sqb
    o_base = out_ptr + pid_b * N * C
    y_base = y_ptr + pid_b * N * CP
    ri = tl.arange(0, BLOCK_I)
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        qsum += _chain_init_tile(q_base, sqn, sqc, r_ptr + pid_b * N, o_base, y_base, plane, CP, C, rows, rows < N,
                                 cls, cmask, N, steps, VELOCITY, BLOCK_I, BLOCK_C)
    tl.debug_barrier()
    for step in range(1, steps + 1):
        for i0 in range(0, N, BLOCK_I):
            rows = i0 + ri
            _chain_step_tile(k_ptr + pid_b * skb, ski, skj, r_ptr + pid_b * N, c_ptr + pid_b * N, e_ptr + pid_b * N,
                             o_base, y_base + ((step - 1) % 2) * plane, y_base + (step % 2) * plane, plane, CP, C,
                             rows, rows < N, cls, cmask, N, step, steps, tau, VELOCITY, SYMMETRIC, PRECISION,
                             BLOCK_N, BLOCK_I, BLOCK_S, BLOCK_C)
        tl.debug_barrier()
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + ri
        _chain_finish_tile(q_base, sqn, sqc, o_base, C, rows, rows < N, cls, cmask, N, qsum <= 0, VELOCITY)


@triton.jit(do_not_specialize=["sk_iters", "steps", "phase_lo", "phase_hi"])
def _markov_persistent_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    k_ptr,  # [B, N, N] kernel (any float dtype, any strides)
    r_ptr, c_ptr,  # [B, N] float64 scale vectors (scratch: set to 1 in phase 0)
    e_ptr,  # [B, N] float32 scratch: T's column sums - 1
    out_ptr,  # [B, N, C] float32 out (contiguous); the running sum / lstar during the chain
    y_ptr,  # [2 or 4, B, N, CP] float32 scratch (see _chain_step_tile); plane = B * N * CP
    part_ptr,  # [B, RB, CP] float32: per row block column sums of q (RB = cdiv(N, BLOCK_R))
    bar_ptr,  # [3] int32 zeros: barrier counter, exit counter, error flag
    B, N, C, CP, plane,
    sqb, sqn, sqc,
    skb, ski, skj,
    sk_iters, steps, tau, phase_lo, phase_hi,
    VELOCITY: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_N: tl.constexpr, SK_BLOCK_I: tl.constexpr, SK_BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The persistent schedule of mv (large N): phases phase_lo..phase_hi - 1 in one launch of at most one
    program per SM, tiles striped over the programs, a grid barrier between phases when GRID_SYNC
    (:func:`sched._phase_done`).

    Phase 0: r = c = 1; phases 1..2 sk_iters: Sinkhorn-Knopp row / column steps in turn, float64, over
    blocks of SK_BLOCK_I patches; phase 2 sk_iters + 1: the drift e; phase 2 sk_iters + 2 + l for
    l = 0..steps: the chain step l over [BLOCK_R, BLOCK_C] tiles (:func:`_chain_init_tile`, :func:`_chain_step_tile`;
    l = 0 also stores q's column sums by row block); the last phase: the readout and the dead classes.
    method.md section 3, mv: the same numbers as the split schedule up to float32 summation order.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    RB = tl.cdiv(N, BLOCK_R)
    CB = tl.cdiv(C, BLOCK_C)
    chain0 = 2 * sk_iters + 2
    last = chain0 + steps + 1
    for phase in range(phase_lo, phase_hi):
        if phase < chain0:
            n_sk = tl.cdiv(N, SK_BLOCK_I)
            for t in range(pid, B * n_sk, nprog):
                b = (t // n_sk).to(tl.int64)
                idx = (t % n_sk) * SK_BLOCK_I + tl.arange(0, SK_BLOCK_I)
                imask = idx < N
                if phase == 0:
                    tl.store(r_ptr + b * N + idx, tl.full((SK_BLOCK_I,), 1.0, tl.float64), mask=imask)
                    tl.store(c_ptr + b * N + idx, tl.full((SK_BLOCK_I,), 1.0, tl.float64), mask=imask)
                else:
                    kind = tl.where(phase == chain0 - 1, 2, 1 - phase % 2)
                    _sk_phase_tile(k_ptr + b * skb, ski, skj, r_ptr + b * N, c_ptr + b * N, e_ptr + b * N, idx,
                                   imask, N, kind, SYMMETRIC, ".cg", SK_BLOCK_I, SK_BLOCK_J)
        else:
            step = phase - chain0
            for t in range(pid, B * RB * CB, nprog):
                b, rb, rows, rmask, cls, cmask = sched._tile_coords(t, RB, CB, N, C, BLOCK_R, BLOCK_C)
                q_base = q_ptr + b * sqb
                o_base = out_ptr + b * N * C
                part = part_ptr + b * RB * CP + cls
                y_base = y_ptr + b * N * CP
                if step == 0:
                    colsum = _chain_init_tile(q_base, sqn, sqc, r_ptr + b * N, o_base, y_base, plane, CP, C, rows,
                                              rmask, cls, cmask, N, steps, VELOCITY, BLOCK_R, BLOCK_C)
                    tl.store(part + rb * CP, colsum, mask=cmask)
                elif phase < last:
                    _chain_step_tile(k_ptr + b * skb, ski, skj, r_ptr + b * N, c_ptr + b * N, e_ptr + b * N, o_base,
                                     y_base + ((step - 1) % 2) * plane, y_base + (step % 2) * plane, plane, CP, C,
                                     rows, rmask, cls, cmask, N, step, steps, tau, VELOCITY, SYMMETRIC, PRECISION,
                                     BLOCK_N, BLOCK_R, BLOCK_S, BLOCK_C)
                else:
                    qsum = sched._part_sum(part, CP, RB, cmask, BLOCK_C)
                    _chain_finish_tile(q_base, sqn, sqc, o_base, C, rows, rmask, cls, cmask, N, qsum <= 0, VELOCITY)
        sched._phase_done(bar_ptr, phase, phase_lo, phase_hi, GRID_SYNC)
    sched._launch_done(bar_ptr, GRID_SYNC)


_SK_CONFIGS = configs("BLOCK_I BLOCK_J", [(32, 128, 4), (64, 128, 8), (16, 256, 4)])
_SK_COL_CONFIGS = configs("BLOCK_I BLOCK_J", [(64, 64, 4), (32, 128, 4), (64, 128, 8)])
_CHAIN_CONFIGS = configs("BLOCK_I BLOCK_J BLOCK_C", [
    (64, 64, 16, 4), (64, 64, 32, 4), (64, 64, 64, 8), (64, 128, 32, 8), (128, 32, 16, 4)
], num_stages=3)
# the SK kernels update r / c in place, so timing configs must start from the same vectors
_rows_tuned = autotune(configs=_SK_CONFIGS, key=["N"], restore_value=["r_ptr"])(_sk_step_kernel)
_cols_tuned = autotune(configs=_SK_COL_CONFIGS, key=["N"], restore_value=["c_ptr"])(_sk_step_kernel)
_chain_tuned = autotune(configs=_CHAIN_CONFIGS, key=["B", "N", "C", "VELOCITY"])(_markov_scores_kernel)
_STEP_CONFIGS = configs("BLOCK_R BLOCK_S BLOCK_C", [
    (32, 64, 16, 4), (32, 64, 32, 4), (64, 64, 32, 4), (64, 64, 64, 8)
], num_stages=3)
# a step updates out in place, so timing configs must start from the same running values
_step_tuned = autotune(configs=_STEP_CONFIGS, key=["N", "C", "VELOCITY"],
                              restore_value=["out_ptr"])(_markov_step_kernel)
# tf32x3: its own configs (as sinkhorn_scores.TF32X3_STEP_CONFIGS), the ieee path keeps the H100-checked ones
_step_tuned_tf32x3 = autotune(configs=sched.TF32X3_STEP_CONFIGS, key=["N", "C", "VELOCITY"],
                              restore_value=["out_ptr"])(_markov_step_kernel)
_INTERPRET = {"BLOCK_I": 16, "BLOCK_J": 16}
_INTERPRET_STEP = {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16}
# the window schedule's chain: sinkhorn_scores' window configs (the same product helper, the same
# register budget); untimed
_CHAIN_WINDOW_KEY = ["N", "C", "VELOCITY", "SYMMETRIC", "PRECISION"]
_chain_window_tuned = autotune(configs=sched._WINDOW_CONFIGS, key=_CHAIN_WINDOW_KEY)(_markov_window_kernel)
_chain_window_tuned_tf32x3 = autotune(configs=sched._WINDOW_CONFIGS_TF32X3,
                                      key=_CHAIN_WINDOW_KEY)(_markov_window_kernel)
#: one SK program per window: [BLOCK_I, BLOCK_J] float64 partial products (untuned)
_SK_WINDOW_BLOCKS = {"BLOCK_I": 32, "BLOCK_J": 64}
#: the persistent schedule's Sinkhorn-Knopp blocks: 16 patches per tile, so that N = 1024 has 64 tiles
#: per phase to share out over the SMs (untuned)
PERSISTENT_SK_BLOCKS = {"SK_BLOCK_I": 16, "SK_BLOCK_J": 128}
_PERSISTENT_KEY = ["B", "N", "C", "VELOCITY", "SYMMETRIC", "PRECISION"]
_persistent_tuned = autotune(configs=sched.PERSISTENT_CONFIGS, key=_PERSISTENT_KEY)(_markov_persistent_kernel)
_persistent_tuned_tf32x3 = autotune(configs=sched.PERSISTENT_CONFIGS_TF32X3,
                                    key=_PERSISTENT_KEY)(_markov_persistent_kernel)


def doubly_stochastic_scales(kernel: Tensor, *, sk_iters: int = SK_ITERS) -> tuple[Tensor, Tensor]:
    """kernel: [B, N, N] -> (r [B, N], c [B, N]) float64 with diag(r) K diag(c) = reference.doubly_stochastic(K)."""
    B, N, _ = kernel.shape
    r = torch.ones((B, N), dtype=torch.float64, device=kernel.device)
    c = torch.ones_like(r)
    args = (kernel, r, c, r, N, *kernel.stride())  # e_ptr (r here) is not read by the r and c steps
    with device_guard(kernel):
        for _ in range(sk_iters):
            if interpreting():
                for kind in (0, 1):
                    _sk_step_kernel[(B, triton.cdiv(N, 16))](*args, KIND=kind, **_INTERPRET)
            else:
                _rows_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_I"]))](*args, KIND=0)
                _cols_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_J"]))](*args, KIND=1)
    return r, c


def column_drift(kernel: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """kernel [B, N, N], scales r, c [B, N] float64 -> e [B, N] float32: column sums of diag(r) K diag(c) - 1."""
    B, N, _ = kernel.shape
    e = torch.empty((B, N), dtype=torch.float32, device=kernel.device)
    blocks = _INTERPRET if interpreting() else {"BLOCK_I": 64, "BLOCK_J": 64}
    with device_guard(kernel):
        _sk_step_kernel[(B, triton.cdiv(N, blocks["BLOCK_J"]))](kernel, r, c, e, N, *kernel.stride(), KIND=2,
                                                                **blocks)
    return e


def window_scales(kernel: Tensor, *, sk_iters: int = SK_ITERS, symmetric: bool = False) -> tuple[Tensor, Tensor,
                  Tensor]:
    """kernel [B, N, N] -> (r, c [B, N] float64, e [B, N] float32) in ONE launch (a program per window):
    the same numbers as doubly_stochastic_scales and column_drift up to float64 summation order."""
    B, N, _ = kernel.shape
    r = torch.ones((B, N), dtype=torch.float64, device=kernel.device)
    c = torch.ones_like(r)
    e = torch.empty((B, N), dtype=torch.float32, device=kernel.device)
    blocks = _INTERPRET if interpreting() else _SK_WINDOW_BLOCKS
    with device_guard(kernel):
        _sk_window_kernel[(B,)](kernel, r, c, e, N, int(sk_iters), *kernel.stride(), SYMMETRIC=bool(symmetric),
                                num_warps=4, **blocks)
    return r, c, e


def markov_scores(q: Tensor, kernel: Tensor, *, sk_iters: int = SK_ITERS, steps: int = STEPS,
                  readout: str = "integrated",
                  tau: float = TAU, schedule: str = "auto", symmetric: bool = False,
                  options: TritonOptions | None = None) -> Tensor:
    """q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C] float32 (see reference.markov_scores).

    schedule: "fused" (the whole chain in one launch), "split" (one row-parallel launch per
    step), "window" (Sinkhorn-Knopp in one launch and the chain in one, every row of a window per
    program; N <= WINDOW_MAX_N), "persistent" (everything in one launch, grid barriers between phases)
    or "auto" (:func:`ovss_fast.kernels.triton.sinkhorn_scores.choose_schedule`).
    ``symmetric=True`` promises K = K^T (as gibbs_kernel builds it); the window and persistent
    schedules use it. ``options`` (:class:`~ovss_fast.kernels.triton._runtime.TritonOptions`, default
    :func:`~ovss_fast.kernels.triton._runtime.defaults`): the preferred schedule when ``schedule`` is
    "auto", and the products' precision.
    """
    if readout not in ("integrated", "velocity"):
        raise InputError(f"readout must be 'integrated' or 'velocity', got {readout!r}")
    B, N, C = q.shape
    opts = resolve(options)
    chosen = sched.choose_schedule(B, N, C, q.device, schedule, opts.schedule)
    prec = opts.precision
    out = torch.empty((B, N, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if chosen == "persistent":
        return _markov_persistent(q, kernel, out, int(sk_iters), int(steps), float(tau), readout == "velocity",
                                  bool(symmetric), prec)
    if chosen == "window":
        r, c, e = window_scales(kernel, sk_iters=sk_iters, symmetric=symmetric)
    else:
        r, c = doubly_stochastic_scales(kernel, sk_iters=sk_iters)
        e = column_drift(kernel, r, c)
    cp = triton.cdiv(C, SCRATCH_PAD) * SCRATCH_PAD
    velocity = readout == "velocity"
    planes = 4 if chosen == "window" and velocity else 2  # the window chain keeps d apart from r * d
    f = torch.empty((planes, B, N, cp), dtype=torch.float32, device=q.device)
    r, c = r.float(), c.float()
    if chosen == "split":
        return _chain_split(q, kernel, r, c, e, out, f, int(steps), float(tau), velocity, prec)
    with device_guard(q):
        if chosen == "window":
            args = (q, kernel, r, c, e, out, f, N, C, cp, B * N * cp, *q.stride(), *kernel.stride(), int(steps),
                    float(tau))
            consts = {"VELOCITY": velocity, "SYMMETRIC": bool(symmetric), "PRECISION": prec,
                      "BLOCK_N": sched.window_block_n(N)}
            if interpreting():
                _markov_window_kernel[(B, triton.cdiv(C, 16))](*args, **consts, BLOCK_I=32, BLOCK_S=16, BLOCK_C=16)
            else:
                tuned = _chain_window_tuned_tf32x3 if prec == "tf32x3" else _chain_window_tuned
                tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args, **consts)
            return out
        args = (q, kernel, r, c, e, out, f, B, N, C, cp, B * N * cp, *q.stride(), *kernel.stride(), int(steps),
                float(tau))
        if interpreting():
            _markov_scores_kernel[(B, triton.cdiv(C, 16))](*args, VELOCITY=velocity, PRECISION=prec, BLOCK_C=16,
                                                           **_INTERPRET)
        else:
            _chain_tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args, VELOCITY=velocity, PRECISION=prec)
    return out


def _chain_split(q: Tensor, kernel: Tensor, r: Tensor, c: Tensor, e: Tensor, out: Tensor, f: Tensor, steps: int,
                 tau: float, velocity: bool, prec: str = "ieee") -> Tensor:
    """The row-parallel schedule: one launch per chain step, then one to finish the readout."""
    B, N, C = q.shape
    cp = f.shape[3]
    f[0, :, :, :C] = N * q.to(torch.float32) - 1.0  # d(0) = f(0) - 1, as the fused kernel computes it
    out.fill_(float(steps + 1) if velocity else 0.0)
    interp = interpreting()
    with device_guard(q):
        for step in range(1, steps + 1):
            args = (kernel, r, c, e, f[(step - 1) % 2], f[step % 2], out, N, C, cp, *kernel.stride(), step, steps, tau)
            if interp:
                grid = (B, triton.cdiv(N, _INTERPRET_STEP["BLOCK_R"]), triton.cdiv(C, _INTERPRET_STEP["BLOCK_C"]))
                _markov_step_kernel[grid](*args, VELOCITY=velocity, PRECISION=prec, **_INTERPRET_STEP)
            else:
                tuned = _step_tuned_tf32x3 if prec == "tf32x3" else _step_tuned
                tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_R"]), triton.cdiv(C, m["BLOCK_C"]))](
                    *args, VELOCITY=velocity, PRECISION=prec)
        block_c = 16 if interp else 32
        _markov_finish_kernel[(B, triton.cdiv(C, block_c))](q, out, N, C, *q.stride(), VELOCITY=velocity,
                                                           BLOCK_N=16 if interp else 64, BLOCK_C=block_c)
    return out


def _markov_persistent(q: Tensor, kernel: Tensor, out: Tensor, sk_iters: int, steps: int, tau: float,
                       velocity: bool, symmetric: bool, prec: str) -> Tensor:
    """The persistent schedule: Sinkhorn-Knopp, the drift and the whole chain in ONE launch."""
    B, N, C = q.shape
    dev = q.device
    cp = triton.cdiv(C, SCRATCH_PAD) * SCRATCH_PAD
    interp = interpreting()
    rows = sched._INTERPRET_PERSISTENT["BLOCK_R"] if interp else sched.PERSISTENT_MIN_ROWS
    r = torch.empty((B, N), dtype=torch.float64, device=dev)
    c = torch.empty_like(r)
    e = torch.empty((B, N), dtype=torch.float32, device=dev)
    y = torch.empty((4 if velocity else 2, B, N, cp), dtype=torch.float32, device=dev)
    part = torch.empty((B, triton.cdiv(N, rows), cp), dtype=torch.float32, device=dev)
    bar = torch.zeros(3, dtype=torch.int32, device=dev)
    args = (q, kernel, r, c, e, out, y, part, bar, B, N, C, cp, B * N * cp, *q.stride(), *kernel.stride(),
            sk_iters, steps, tau)
    sk_blocks = {"SK_BLOCK_I": 16, "SK_BLOCK_J": 16} if interp else PERSISTENT_SK_BLOCKS
    consts = {"VELOCITY": velocity, "SYMMETRIC": symmetric, "PRECISION": prec, "BLOCK_N": sched.persistent_block_n(N),
              **sk_blocks}
    tuned = _persistent_tuned_tf32x3 if prec == "tf32x3" else _persistent_tuned

    def tiles(m: dict) -> int:
        return max(B * triton.cdiv(N, m["BLOCK_R"]) * triton.cdiv(C, m["BLOCK_C"]),
                   B * triton.cdiv(N, sk_blocks["SK_BLOCK_I"]))

    with device_guard(q):
        sched.launch_persistent(_markov_persistent_kernel, tuned, args, consts, tiles, 2 * sk_iters + steps + 4,
                                bar, dev, sched._INTERPRET_PERSISTENT)
    return out
