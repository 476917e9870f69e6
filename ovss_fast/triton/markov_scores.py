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

Launches per call: 2 * sk_iters small ones (``_sk_rows_kernel``, ``_sk_cols_kernel``; each
parallel over row / column blocks of every image), one ``_drift_kernel``, then the chain in
one of two schedules
(as for sinkhorn_scores, chosen by ``fused_is_better`` or forced with ``schedule=``):

* fused: ONE ``_markov_scores_kernel`` launch runs all ``steps`` chain steps, a program per
  (image, tile of BLOCK_C classes), f ping-ponging between two program-private scratch
  slices in global memory, a CTA barrier between steps;
* split: one ``_markov_step_kernel`` launch per step over (image, row block, class block),
  then ``_markov_finish_kernel`` (velocity readout, dead classes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import DENOM_FLOOR as _DENOM_FLOOR
from ._runtime import autotune, device_guard, interpreting
from .sinkhorn_scores import fused_is_better

#: scratch rows are padded to a multiple of this many classes (the largest BLOCK_C)
SCRATCH_PAD = 64

#: a Triton constexpr so the kernels can read it
DENOM_FLOOR = tl.constexpr(_DENOM_FLOOR)


@triton.jit
def _sk_rows_kernel(
    k_ptr,  # [B, N, N] kernel (any float dtype, any strides)
    r_ptr, c_ptr,  # [B, N] float64 scale vectors; r updated in place
    N,
    skb, ski, skj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Row step of Sinkhorn-Knopp: r_i <- r_i / max(r_i * sum_j K_ij c_j, 1e-30), in float64
    (method.md section 3, mv)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < N
    k_base = k_ptr + pid_b * skb
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        jmask = cols < N
        k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                    mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float64)
        c = tl.load(c_ptr + pid_b * N + cols, mask=jmask, other=0.0)
        acc += k * c[None, :]
    r = tl.load(r_ptr + pid_b * N + rows, mask=rmask, other=1.0)
    tl.store(r_ptr + pid_b * N + rows, r / tl.maximum(r * tl.sum(acc, axis=1), DENOM_FLOOR), mask=rmask)


@triton.jit
def _sk_cols_kernel(
    k_ptr,  # [B, N, N] kernel
    r_ptr, c_ptr,  # [B, N] float64 scale vectors; c updated in place
    N,
    skb, ski, skj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Column step of Sinkhorn-Knopp: c_j <- c_j / max(c_j * sum_i r_i K_ij, 1e-30), in float64
    (method.md section 3, mv)."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = cols < N
    k_base = k_ptr + pid_b * skb
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < N
        k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                    mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float64)
        r = tl.load(r_ptr + pid_b * N + rows, mask=rmask, other=0.0)
        acc += k * r[:, None]
    c = tl.load(c_ptr + pid_b * N + cols, mask=jmask, other=1.0)
    tl.store(c_ptr + pid_b * N + cols, c / tl.maximum(c * tl.sum(acc, axis=0), DENOM_FLOOR), mask=jmask)


@triton.jit
def _drift_kernel(
    k_ptr,  # [B, N, N] kernel
    r_ptr, c_ptr,  # [B, N] float64 scale vectors
    e_ptr,  # [B, N] float32 out: e_j = c_j sum_i r_i K_ij - 1
    N,
    skb, ski, skj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """T's column sums minus 1, in float64 (the chain's drift d(l) = T^T d(l-1) + e; method.md section 3, mv)."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = cols < N
    k_base = k_ptr + pid_b * skb
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < N
        k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                    mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float64)
        r = tl.load(r_ptr + pid_b * N + rows, mask=rmask, other=0.0)
        acc += k * r[:, None]
    c = tl.load(c_ptr + pid_b * N + cols, mask=jmask, other=0.0)
    tl.store(e_ptr + pid_b * N + cols, (c * tl.sum(acc, axis=0) - 1.0).to(tl.float32), mask=jmask)


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
):
    """The chain as its deviation d = f - 1: d(0) = N q - 1;
    d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j (= (T^T f(l-1))[j] - 1), l = 1..steps.

    integrated: S = sum_l d(l).  velocity: lstar = first l with |d(l) - d(l-1)| <= tau
    (steps + 1 if never), S = -lstar + 1e-3 f(0).  S = -inf for a dead class (sum_i q = 0).
    method.md section 3, mv. Products run in IEEE float32 (no tf32).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    q_base = q_ptr + pid_b * sqb
    k_base = k_ptr + pid_b * skb
    o_base = out_ptr + pid_b * N * C
    f_base = f_ptr + pid_b * N * CP
    ri = tl.arange(0, BLOCK_I)
    rj = tl.arange(0, BLOCK_J)

    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rows = j0 + rj
        mask = (rows < N)[:, None] & cmask[None, :]
        q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
        qsum += tl.sum(q, axis=0)
        tl.store(f_base + rows[:, None] * CP + cls[None, :], N * q - 1.0, mask=mask)
        if VELOCITY:
            init = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32) + (steps + 1)
        else:
            init = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
        tl.store(o_base + rows[:, None] * C + cls[None, :], init, mask=mask)
    tl.debug_barrier()

    for step in range(1, steps + 1):
        src = f_base + ((step - 1) % 2) * plane
        dst = f_base + (step % 2) * plane
        for j0 in range(0, N, BLOCK_J):
            cols = j0 + rj
            jmask = cols < N
            acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
            for i0 in range(0, N, BLOCK_I):
                rows = i0 + ri
                rmask = rows < N
                k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                            mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
                r = tl.load(r_ptr + pid_b * N + rows, mask=rmask, other=0.0)
                f = tl.load(src + rows[:, None] * CP + cls[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                acc = tl.dot(tl.trans(k), f * r[:, None], acc, input_precision="ieee")
            c = tl.load(c_ptr + pid_b * N + cols, mask=jmask, other=0.0)
            e = tl.load(e_ptr + pid_b * N + cols, mask=jmask, other=0.0)
            fnew = acc * c[:, None] + e[:, None]
            mask = jmask[:, None] & cmask[None, :]
            tl.store(dst + cols[:, None] * CP + cls[None, :], fnew, mask=mask)
            o_ptrs = o_base + cols[:, None] * C + cls[None, :]
            held = tl.load(o_ptrs, mask=mask, other=0.0)
            if VELOCITY:
                fold = tl.load(src + cols[:, None] * CP + cls[None, :], mask=mask, other=0.0, cache_modifier=".cg")
                settled = (tl.abs(fnew - fold) <= tau) & (held > steps)
                held = tl.where(settled, step * 1.0, held)
            else:
                held = held + fnew
            tl.store(o_ptrs, held, mask=mask)
        tl.debug_barrier()

    dead = qsum <= 0
    for j0 in range(0, N, BLOCK_J):
        rows = j0 + rj
        mask = (rows < N)[:, None] & cmask[None, :]
        o_ptrs = o_base + rows[:, None] * C + cls[None, :]
        s = tl.load(o_ptrs, mask=mask, other=0.0)
        if VELOCITY:
            q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
            s = -s + 1e-3 * (N * q)
        s = tl.where(dead[None, :], float("-inf"), s)
        tl.store(o_ptrs, s, mask=mask)


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
):
    """Chain step l for BLOCK_R patches j and BLOCK_C classes (the split schedule):
    d(l)[j] = c_j sum_i K_ij r_i d(l-1)[i] + e_j; integrated: out += d(l); velocity: out = l where
    out > steps and |d(l) - d(l-1)| <= tau. method.md section 3, mv. IEEE float32 products (no tf32).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    jmask = cols < N
    cmask = cls < C
    k_base = k_ptr + pid_b * skb
    src = src_ptr + pid_b * N * CP
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_S):
        rows = i0 + tl.arange(0, BLOCK_S)
        rmask = rows < N
        k = tl.load(k_base + rows[:, None] * ski + cols[None, :] * skj,
                    mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        r = tl.load(r_ptr + pid_b * N + rows, mask=rmask, other=0.0)
        f = tl.load(src + rows[:, None] * CP + cls[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(k), f * r[:, None], acc, input_precision="ieee")
    c = tl.load(c_ptr + pid_b * N + cols, mask=jmask, other=0.0)
    e = tl.load(e_ptr + pid_b * N + cols, mask=jmask, other=0.0)
    fnew = acc * c[:, None] + e[:, None]
    mask = jmask[:, None] & cmask[None, :]
    tl.store(dst_ptr + pid_b * N * CP + cols[:, None] * CP + cls[None, :], fnew, mask=mask)
    o_ptrs = out_ptr + pid_b * N * C + cols[:, None] * C + cls[None, :]
    held = tl.load(o_ptrs, mask=mask, other=0.0)
    if VELOCITY:
        fold = tl.load(src + cols[:, None] * CP + cls[None, :], mask=mask, other=0.0)
        settled = (tl.abs(fnew - fold) <= tau) & (held > steps)
        held = tl.where(settled, step * 1.0, held)
    else:
        held = held + fnew
    tl.store(o_ptrs, held, mask=mask)


@triton.jit
def _markov_finish_kernel(
    q_ptr,  # [B, N, C] (any float dtype, any strides)
    out_ptr,  # [B, N, C] float32: running sum / lstar in, scores out
    N, C,
    sqb, sqn, sqc,
    VELOCITY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """velocity: S = -lstar + 1e-3 f(0) with f(0) = N q; S = -inf for a dead class (sum_i q = 0).
    method.md section 3, mv (split schedule)."""
    pid_b = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0)
        qsum += tl.sum(q.to(tl.float32), axis=0)
    dead = qsum <= 0
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        o_ptrs = out_ptr + pid_b * N * C + rows[:, None] * C + cls[None, :]
        s = tl.load(o_ptrs, mask=mask, other=0.0)
        if VELOCITY:
            q = tl.load(q_ptr + pid_b * sqb + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0)
            s = -s + 1e-3 * (N * q.to(tl.float32))
        s = tl.where(dead[None, :], float("-inf"), s)
        tl.store(o_ptrs, s, mask=mask)


_SK_CONFIGS = [
    triton.Config({"BLOCK_I": 32, "BLOCK_J": 128}, num_warps=4),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 128}, num_warps=8),
    triton.Config({"BLOCK_I": 16, "BLOCK_J": 256}, num_warps=4),
]
_SK_COL_CONFIGS = [
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64}, num_warps=4),
    triton.Config({"BLOCK_I": 32, "BLOCK_J": 128}, num_warps=4),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 128}, num_warps=8),
]
_CHAIN_CONFIGS = [
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_I": 64, "BLOCK_J": 128, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_I": 128, "BLOCK_J": 32, "BLOCK_C": 16}, num_warps=4, num_stages=3),
]
# the SK kernels update r / c in place, so timing configs must start from the same vectors
_rows_tuned = autotune(configs=_SK_CONFIGS, key=["N"], restore_value=["r_ptr"])(_sk_rows_kernel)
_cols_tuned = autotune(configs=_SK_COL_CONFIGS, key=["N"], restore_value=["c_ptr"])(_sk_cols_kernel)
_chain_tuned = autotune(configs=_CHAIN_CONFIGS, key=["B", "N", "C", "VELOCITY"])(_markov_scores_kernel)
_STEP_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 32, "BLOCK_S": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_S": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
]
# a step updates out in place, so timing configs must start from the same running values
_step_tuned = autotune(configs=_STEP_CONFIGS, key=["N", "C", "VELOCITY"],
                              restore_value=["out_ptr"])(_markov_step_kernel)
_INTERPRET = {"BLOCK_I": 16, "BLOCK_J": 16}
_INTERPRET_STEP = {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16}


def doubly_stochastic_scales(kernel: Tensor, *, sk_iters: int = 15) -> tuple[Tensor, Tensor]:
    """kernel: [B, N, N] -> (r [B, N], c [B, N]) float64 with diag(r) K diag(c) = reference.doubly_stochastic(K)."""
    B, N, _ = kernel.shape
    r = torch.ones((B, N), dtype=torch.float64, device=kernel.device)
    c = torch.ones_like(r)
    strides = kernel.stride()
    with device_guard(kernel):
        for _ in range(sk_iters):
            if interpreting():
                _sk_rows_kernel[(B, triton.cdiv(N, 16))](kernel, r, c, N, *strides, **_INTERPRET)
                _sk_cols_kernel[(B, triton.cdiv(N, 16))](kernel, r, c, N, *strides, **_INTERPRET)
            else:
                _rows_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_I"]))](kernel, r, c, N, *strides)
                _cols_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_J"]))](kernel, r, c, N, *strides)
    return r, c


def column_drift(kernel: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """kernel [B, N, N], scales r, c [B, N] float64 -> e [B, N] float32: column sums of diag(r) K diag(c) - 1."""
    B, N, _ = kernel.shape
    e = torch.empty((B, N), dtype=torch.float32, device=kernel.device)
    blocks = _INTERPRET if interpreting() else {"BLOCK_I": 64, "BLOCK_J": 64}
    with device_guard(kernel):
        _drift_kernel[(B, triton.cdiv(N, blocks["BLOCK_J"]))](kernel, r, c, e, N, *kernel.stride(), **blocks)
    return e


def markov_scores(
    q: Tensor,
    kernel: Tensor,
    *,
    sk_iters: int = 15,
    steps: int = 50,
    readout: str = "integrated",
    tau: float = 0.3,
    schedule: str = "auto",
) -> Tensor:
    """q: [B, N, C]; kernel: [B, N, N] -> S: [B, N, C] float32 (see reference.markov_scores).

    schedule: "fused" (the whole chain in one launch), "split" (one row-parallel launch per
    step) or "auto" (:func:`ovss_fast.triton.sinkhorn_scores.fused_is_better`).
    """
    if readout not in ("integrated", "velocity"):
        raise ValueError(f"readout must be 'integrated' or 'velocity', got {readout!r}")
    if schedule not in ("auto", "fused", "split"):
        raise ValueError(f"schedule must be 'auto', 'fused' or 'split', got {schedule!r}")
    B, N, C = q.shape
    out = torch.empty((B, N, C), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    r, c = doubly_stochastic_scales(kernel, sk_iters=sk_iters)
    e = column_drift(kernel, r, c)
    cp = triton.cdiv(C, SCRATCH_PAD) * SCRATCH_PAD
    f = torch.empty((2, B, N, cp), dtype=torch.float32, device=q.device)
    r, c = r.float(), c.float()
    args = (q, kernel, r, c, e, out, f, B, N, C, cp, B * N * cp, *q.stride(), *kernel.stride(), int(steps), float(tau))
    velocity = readout == "velocity"
    if schedule == "split" or (schedule == "auto" and not fused_is_better(B, N, C, q.device)):
        return _chain_split(q, kernel, r, c, e, out, f, int(steps), float(tau), velocity)
    with device_guard(q):
        if interpreting():
            _markov_scores_kernel[(B, triton.cdiv(C, 16))](*args, VELOCITY=velocity, BLOCK_C=16, **_INTERPRET)
        else:
            _chain_tuned[lambda m: (B, triton.cdiv(C, m["BLOCK_C"]))](*args, VELOCITY=velocity)
    return out


def _chain_split(q: Tensor, kernel: Tensor, r: Tensor, c: Tensor, e: Tensor, out: Tensor, f: Tensor, steps: int,
                 tau: float, velocity: bool) -> Tensor:
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
                _markov_step_kernel[grid](*args, VELOCITY=velocity, **_INTERPRET_STEP)
            else:
                _step_tuned[lambda m: (B, triton.cdiv(N, m["BLOCK_R"]), triton.cdiv(C, m["BLOCK_C"]))](
                    *args, VELOCITY=velocity)
        block_c = 16 if interp else 32
        _markov_finish_kernel[(B, triton.cdiv(C, block_c))](q, out, N, C, *q.stride(), VELOCITY=velocity,
                                                           BLOCK_N=16 if interp else 64, BLOCK_C=block_c)
    return out
