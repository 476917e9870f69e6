"""What the Triton op (sinkhorn_scores) and mv (markov_scores) kernels share: the per-tile helpers and the
schedule machinery (method.md section 3; the schedules are described in sinkhorn_scores' docstring).

* tiles: :func:`_class_tile` (a program over (image, class tile)), :func:`_q_tile` (q as float32),
  :func:`_scores_tile` (S with -inf for dead classes), :func:`_column_sums` (q's, and f's, column sums
  over N), :func:`_k_times_x` / :func:`_k_times_x_window` (K x or K^T x in partial sums of SUM_CHUNK);
* the persistent schedule: :func:`_tile_coords`, :func:`_grid_sync` / :func:`_grid_exit` (grid barriers),
  :func:`_phase_done` / :func:`_launch_done` (where a persistent kernel waits), :func:`_part_sum` (per row
  block partial sums), :func:`launch_persistent`;
* the window and persistent configs, the choice of schedule and precision.

Each file keeps its own math (op: u, v, f; mv: Sinkhorn-Knopp, the chain, the readout) in its own tile
helpers and drives them with these.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.kernels.triton import _runtime
from ovss_fast.kernels.triton._runtime import DENOM_FLOOR as _DENOM_FLOOR
from ovss_fast.kernels.triton._runtime import configs, interpreting, next_pow2

#: scratch rows are padded to a multiple of this many classes (the largest BLOCK_C)
SCRATCH_PAD = 64
#: the largest N the window schedule takes (a small-N schedule: K of a window is read from L1/L2)
WINDOW_MAX_N = 512
#: the schedules a caller (or the ``schedule`` option) can name
SCHEDULES = _runtime.SCHEDULES
PRECISIONS = _runtime.PRECISIONS

#: a Triton constexpr so the kernels can read it
DENOM_FLOOR = tl.constexpr(_DENOM_FLOOR)
#: products over N are summed in partial sums of this many terms, then added: the float32
#: rounding error then grows with SUM_CHUNK + N / SUM_CHUNK terms, not N (one running
#: tl.dot accumulator over N = 4096 missed the 1e-4 contract on an H100: 1.2e-4)
SUM_CHUNK = tl.constexpr(256)


@triton.jit
def _k_times_x_part(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, lo, hi, N, acc,
                    TRANS: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """acc + the terms s = lo..hi - 1 of K x (TRANS false) or K^T x for output rows ``rows`` and classes
    ``cls``, s in blocks of BLOCK_S, one tl.dot accumulator; x: [N, CP] float32 scratch at x_base (read
    with .cg). Products in PRECISION ("ieee": IEEE float32 FMAs, the default; "tf32x3" when
    the ``precision`` option asks for split tf32)."""
    rs = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi, BLOCK_S):
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
    return acc


@triton.jit
def _k_times_x(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
               TRANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
               PRECISION: tl.constexpr = "ieee"):
    """[BLOCK_R, BLOCK_C] tile of K x (TRANS false) or K^T x (:func:`_k_times_x_part`) in partial sums of
    SUM_CHUNK terms, added."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, N, SUM_CHUNK):
        acc += _k_times_x_part(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, c0,
                               tl.minimum(c0 + SUM_CHUNK, N), N, tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32),
                               TRANS, BLOCK_S, PRECISION)
    return acc


@triton.jit
def _k_times_x_window(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                      TRANS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """K x or K^T x for a tile, N at most BLOCK_N (a constexpr): when BLOCK_N <= SUM_CHUNK the sum over N
    is a single partial sum, so one accumulator is kept, not two (the window schedule); else
    :func:`_k_times_x` (BLOCK_N = ANY_N: the fused and split schedules)."""
    if BLOCK_N <= SUM_CHUNK:
        acc = _k_times_x_part(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, 0, N, N,
                              tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32), TRANS, BLOCK_S, PRECISION)
    else:
        acc = _k_times_x(k_base, ski, skj, x_base, CP, rows, rmask, cls, cmask, N,
                         TRANS, BLOCK_R, BLOCK_S, BLOCK_C, PRECISION)
    return acc


#: BLOCK_N for :func:`_k_times_x_window` that always sums over N in partial sums of SUM_CHUNK (the fused
#: and split schedules, whose N has no bound): then it is :func:`_k_times_x`
ANY_N = tl.constexpr(1 << 30)


@triton.jit
def _class_tile(C, BLOCK_C: tl.constexpr):
    """A program over (image, tile of BLOCK_C classes) (grid axes 0 and 1) -> (image as int64, classes,
    class mask)."""
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(0).to(tl.int64), cls, cls < C


@triton.jit
def _q_tile(q_base, sqn, sqc, rows, rmask, cls, cmask):
    """q[rows, cls] as float32 (0 outside the tile) and the tile's mask."""
    mask = rmask[:, None] & cmask[None, :]
    q = tl.load(q_base + rows[:, None] * sqn + cls[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
    return q, mask


@triton.jit
def _scores_tile(out_base, C, rows, cls, mask, s, dead):
    """S[rows, cls] = s into out ([N, C] contiguous), -inf for a dead class (sum_i q = 0; method.md section 3)."""
    tl.store(out_base + rows[:, None] * C + cls[None, :], tl.where(dead[None, :], float("-inf"), s), mask=mask)


@triton.jit
def _column_sums(q_base, sqn, sqc, f_base, CP, N, cls, cmask, WITH_F: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """(sum_i q[i, cls], sum_i f[i, cls]) over all N rows, f: [N, CP] float32 at f_base (summed only WITH_F;
    zeros else), in row blocks of BLOCK_N (the split schedule's readouts)."""
    qsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        q, mask = _q_tile(q_base, sqn, sqc, rows, rows < N, cls, cmask)
        if WITH_F:
            fsum += tl.sum(tl.load(f_base + rows[:, None] * CP + cls[None, :], mask=mask, other=0.0), axis=0)
        qsum += tl.sum(q, axis=0)
    return qsum, fsum


#: the split step's configs for tf32x3 (tensor-core dots want larger tiles; untimed guesses, its own
#: autotuner so that the default ieee path keeps the configs checked on the H100)
TF32X3_STEP_CONFIGS = configs("BLOCK_R BLOCK_S BLOCK_C", [
    (64, 32, 32, 4), (64, 64, 64, 4), (128, 32, 64, 8), (64, 32, 16, 4, 4)
], num_stages=3)

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
def _phase_done(bar_ptr, phase, phase_lo, phase_hi, GRID_SYNC: tl.constexpr):
    """End of a persistent kernel's phase: with GRID_SYNC, a grid barrier unless it was the launch's last."""
    if GRID_SYNC:
        if phase < phase_hi - 1:
            _grid_sync(bar_ptr, (phase - phase_lo + 1) * tl.num_programs(0))


@triton.jit
def _launch_done(bar_ptr, GRID_SYNC: tl.constexpr):
    """End of a persistent launch: with GRID_SYNC, :func:`_grid_exit`."""
    if GRID_SYNC:
        _grid_exit(bar_ptr)


@triton.jit
def _tile_coords(t, RB, CB, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile t of a persistent phase -> (image, row block, rows, row mask, classes, class mask); classes
    fastest, so the programs that run at the same time share K's row block."""
    cb = t % CB
    rest = t // CB
    rb = rest % RB
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return (rest // RB).to(tl.int64), rb, rows, rows < N, cls, cls < C


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
_WINDOW_CONFIGS = configs("BLOCK_I BLOCK_S BLOCK_C", [
    (256, 16, 16, 8, 2), (64, 32, 16, 4), (64, 32, 32, 4), (128, 32, 32, 8)
], num_stages=3)
#: tf32x3 (tensor-core dots: wgmma wants 64-row blocks per warpgroup); no spills either
_WINDOW_CONFIGS_TF32X3 = configs("BLOCK_I BLOCK_S BLOCK_C", [
    (64, 32, 32, 4), (64, 32, 16, 4), (128, 32, 32, 8)
], num_stages=3)

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
                           "(another process holding SMs, MPS limits?); use the schedule option \"split\"")


def window_block_n(N: int) -> int:
    """BLOCK_N of the window schedule: every row of a window in one tile (tl.dot needs >= 16)."""
    return max(16, next_pow2(N))


def choose_schedule(B: int, N: int, C: int, device: torch.device, schedule: str = "auto",
                    preferred: str = "auto") -> str:
    """"fused", "split", "window" or "persistent" for this call. ``schedule`` (the kernel function's
    argument) names one strictly: "window" raises when N > WINDOW_MAX_N. When it is "auto", ``preferred``
    (the backend's ``schedule`` option, :class:`~ovss_fast.kernels.triton._runtime.TritonOptions`) is
    taken where it applies: a preferred "window" falls back to the auto choice of fused / split when
    N > WINDOW_MAX_N. Auto never picks "window" or "persistent" (no GPU run has checked them yet): it
    is :func:`fused_is_better`'s choice.
    """
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    if schedule == "window" and N > WINDOW_MAX_N:
        raise InputError(f"schedule='window' takes N <= {WINDOW_MAX_N} patches, got N = {N}")
    if schedule != "auto":
        return schedule
    if preferred not in SCHEDULES:
        raise InputError(f"schedule option must be one of {', '.join(map(repr, SCHEDULES))}, got {preferred!r}")
    if preferred == "window" and N <= WINDOW_MAX_N:
        return "window"
    if preferred in ("persistent", "fused", "split"):
        return preferred
    return "fused" if fused_is_better(B, N, C, device) else "split"


def fused_is_better(B: int, N: int, C: int, device: torch.device) -> bool:
    """Choose the schedule: one launch (B * ceil(C / 32) programs, each running every iteration)
    when that keeps at least half the SMs busy or N is small enough that launch overhead
    dominates; otherwise one row-parallel launch per half-iteration. Untuned guess, not measured;
    the ``schedule`` option "fused" / "split" overrides it (for benchmarks).
    """
    if device.type != "cuda" or N <= 256:
        return True
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * B * triton.cdiv(C, 32) >= sms
