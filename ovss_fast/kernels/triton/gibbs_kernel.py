"""Triton gibbs_kernel: cost and Gibbs kernel from a patch affinity (method.md section 2).

:func:`gibbs_kernel` (cost and K), two launches per call:
  1. ``_cost_range_kernel``: per (image, strip of RANGE_ROWS rows) the min and max of
     Sym = (A + A^T) / 2 over the strip, into partials [B, n_strips];
  2. ``_gibbs_kernel_kernel``: per (image, tile) reduces the image's partials to M = max Sym and
     the min / max of the scale-free Craw = -log(Sym / M + 1e-12) (M = 0: Sym / 1), and writes
     cost = (Craw - min) / (max - min) (0 if max == min) and K = exp(-cost / eps).
Craw decreases as Sym grows, so its min and max are Craw of Sym's max and min: the range pass
needs no log, and knows M only at its end.
Each pass reads every tile of A and its mirror tile: 4 N^2 reads and 2 N^2 writes per image.

:func:`gibbs_kernel_only` (K only; what ops.discrepancy needs), symmetric tiles. Sym is
symmetric, so Sym[J, I] = Sym[I, J]^T: one program per tile pair ti <= tj (a linear program
id mapped onto the upper triangle of tiles, :func:`_tile_pair`) reads A[I, J] and A[J, I] once
and covers both tiles. Two launches:
  1. ``_sym_range_kernel``: RANGE_PARTS programs per image, each striding over the tile
     pairs, min / max of Sym into partials [B, n_parts];
  2. ``_sym_gibbs_kernel``: per (tile pair, image) M and Craw's min / max from the partials,
     K[I, J] and its transpose K[J, I] (one store on a diagonal tile). The cost is never written:
     2 N^2 reads and N^2 writes per image.
The per-tile math (:func:`_sym_tile`, :func:`_fold_range`, :func:`_store_range`,
:func:`_image_range`, :func:`_cost_and_kernel`) is shared by all four kernels, so both paths give the same bits.
method.md section 2 (spec v2: the scale-free cost).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels.common import EPS
from ovss_fast.kernels.triton import _runtime
from ovss_fast.kernels.triton._runtime import LOG_FLOOR as _LOG_FLOOR
from ovss_fast.kernels.triton._runtime import autotune, configs, device_guard, interpreting, next_pow2

#: rows per program of the range pass (fixes the number of partials per image)
RANGE_ROWS = 32
#: the most programs per image of the symmetric range pass (each reduces some tile pairs to one
#: partial min / max); every program of the second pass reads all of them, so a few hundred at most
RANGE_PARTS = 512
#: the ``gibbs`` option (TritonOptions): "separate" (the default, :func:`gibbs_kernel` and its K) or "fused"
#: (:func:`gibbs_kernel_only`; untimed, no GPU has run it yet, so never the default)
GIBBS_SCHEDULES = _runtime.GIBBS_SCHEDULES

#: a Triton constexpr so the kernels can read it
LOG_FLOOR = tl.constexpr(_LOG_FLOOR)


# --------------------------------------------------------------------------- per-tile math (every kernel)
@triton.jit
def _sym_tile(base, rows, cols, N, sai, saj):
    """(Sym[rows, cols], in-bounds mask): A[rows, cols] and its mirror A[cols, rows] (loaded as a
    row-contiguous tile and transposed) -> (A + A^T) / 2, halved first (no overflow near the float32
    maximum). Sym[cols, rows] is the transpose of this tile, bit for bit (0.5 * a + 0.5 * b ==
    0.5 * b + 0.5 * a)."""
    rmask = rows < N
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    a = tl.load(base + rows[:, None] * sai + cols[None, :] * saj, mask=mask, other=0.0).to(tl.float32)
    at = tl.load(base + cols[:, None] * sai + rows[None, :] * saj,
                 mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    return 0.5 * a + 0.5 * tl.trans(at), mask


@triton.jit
def _craw(sym, inv_scale):
    """The scale-free Craw = -log(Sym / M + 1e-12), ``inv_scale`` = 1 / M (1 where M <= 0): a product, not a
    division per entry (an IEEE division holds more registers; ptxas spilled in _sym_gibbs_kernel 64 x 64 at
    4 warps), within one rounding of Sym / M."""
    return -tl.log(sym * inv_scale + LOG_FLOOR)


@triton.jit
def _fold_range(lo, hi, base, rows, cols, N, sai, saj):
    """Element-wise running min / max of Sym over the in-bounds entries of tile [rows, cols]."""
    sym, mask = _sym_tile(base, rows, cols, N, sai, saj)
    return tl.minimum(lo, tl.where(mask, sym, float("inf"))), tl.maximum(hi, tl.where(mask, sym, float("-inf")))


@triton.jit
def _store_range(lo_ptr, hi_ptr, idx, lo, hi):
    """One partial: the min of the running minima and the max of the running maxima, at idx."""
    tl.store(lo_ptr + idx, tl.min(tl.min(lo, axis=1), axis=0))
    tl.store(hi_ptr + idx, tl.max(tl.max(hi, axis=1), axis=0))


@triton.jit
def _image_range(lo_ptr, hi_ptr, pid_b, n_parts, BLOCK_S: tl.constexpr):
    """(M, min Craw, max Craw - min Craw) of image pid_b from its n_parts partial min / max of Sym:
    M = max Sym (1 where it is <= 0: Sym / M stays Sym); Craw decreases as Sym grows, so its min / max
    are Craw of Sym's max / min (the same float32 values as reducing Craw itself)."""
    s = tl.arange(0, BLOCK_S)
    smask = s < n_parts
    smin = tl.min(tl.load(lo_ptr + pid_b * n_parts + s, mask=smask, other=float("inf")), axis=0)
    smax = tl.max(tl.load(hi_ptr + pid_b * n_parts + s, mask=smask, other=float("-inf")), axis=0)
    inv_scale = 1.0 / tl.where(smax > 0, smax, 1.0)
    lo = _craw(smax, inv_scale)
    return inv_scale, lo, _craw(smin, inv_scale) - lo


@triton.jit
def _cost_and_kernel(sym, inv_scale, lo, span, inv_eps):
    """Craw = -log(Sym / M + 1e-12); cost = (Craw - lo) / span (0 everywhere when span == 0),
    K = exp(-cost / eps)."""
    craw = _craw(sym, inv_scale)
    cost = tl.where(span > 0, (craw - lo) / tl.where(span > 0, span, 1.0), 0.0)
    return cost, tl.exp(-cost * inv_eps)


@triton.jit
def _tile_pair(p):
    """Linear pair id p -> tiles (ti, tj), ti <= tj, column by column of the upper triangle:
    0 -> (0, 0), 1 -> (0, 1), 2 -> (1, 1), 3 -> (0, 2), ...; tj = floor((sqrt(8p + 1) - 1) / 2),
    corrected by one in either direction where float32 rounding misses the integer root (past
    tj = 4096 it lands one high just before a column start; tests/test_triton.py checks every column
    start while 8p + 1 fits int32, p < 2^28: far more tile pairs than any N that fits in memory)."""
    tj = ((tl.sqrt_rn(tl.cast(8 * p + 1, tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > p, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= p, tj + 1, tj)
    return p - tj * (tj + 1) // 2, tj


# --------------------------------------------------------------------------- gibbs_kernel: cost and K
@triton.jit
def _cost_range_kernel(
    a_ptr,  # [B, N, N] affinity (any float dtype, any strides)
    lo_ptr, hi_ptr,  # [B, n_strips] float32 out
    N, n_strips,
    sab, sai, saj,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """lo/hi[b, s] = min/max over rows i of strip s and all j of Sym[i, j] = (A[i, j] + A[j, i]) / 2.

    method.md section 2 (first pass).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    base = a_ptr + pid_b * sab
    rows = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = tl.full((BLOCK_M, BLOCK_N), float("inf"), tl.float32)
    hi = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for j0 in range(0, N, BLOCK_N):
        lo, hi = _fold_range(lo, hi, base, rows, j0 + tl.arange(0, BLOCK_N), N, sai, saj)
    _store_range(lo_ptr, hi_ptr, pid_b * n_strips + pid_s, lo, hi)


@triton.jit
def _gibbs_kernel_kernel(
    a_ptr,  # [B, N, N] affinity
    lo_ptr, hi_ptr,  # [B, n_strips] float32 partial min / max of Sym
    cost_ptr, k_ptr,  # [B, N, N] float32 out (contiguous)
    N, n_strips,
    sab, sai, saj,
    inv_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """cost = (Craw - min Craw) / (max Craw - min Craw) (0 where max == min), Craw = -log(Sym / M + 1e-12);
    K = exp(-cost / eps).

    method.md section 2 (second pass); min and max over the whole image from the partials.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    inv_scale, lo, span = _image_range(lo_ptr, hi_ptr, pid_b, n_strips, BLOCK_S)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    sym, mask = _sym_tile(a_ptr + pid_b * sab, rows, cols, N, sai, saj)
    cost, kern = _cost_and_kernel(sym, inv_scale, lo, span, inv_eps)
    out = pid_b * N * N + rows[:, None] * N + cols[None, :]
    tl.store(cost_ptr + out, cost, mask=mask)
    tl.store(k_ptr + out, kern, mask=mask)


# --------------------------------------------------------------------------- gibbs_kernel_only: K, symmetric tiles
@triton.jit
def _sym_range_kernel(
    a_ptr,  # [B, N, N] affinity (any float dtype, any strides)
    lo_ptr, hi_ptr,  # [B, n_parts] float32 out
    N, n_parts,
    sab, sai, saj,
    BLOCK: tl.constexpr,
):
    """lo/hi[b, s] = min/max of Sym over the tile pairs p = s, s + n_parts, ... (ti <= tj).

    method.md section 2 (first pass). A pair's tile covers Sym[I, J] and, by symmetry, Sym[J, I],
    so every entry of A is read once. A program left without a pair (n_parts is fixed by the
    smallest tile, see :func:`gibbs_kernel_only`) writes +inf / -inf, which the second pass ignores.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    base = a_ptr + pid_b * sab
    n_tiles = tl.cdiv(N, BLOCK)
    lo = tl.full((BLOCK, BLOCK), float("inf"), tl.float32)
    hi = tl.full((BLOCK, BLOCK), float("-inf"), tl.float32)
    for p in range(pid, n_tiles * (n_tiles + 1) // 2, n_parts):
        ti, tj = _tile_pair(p)
        lo, hi = _fold_range(lo, hi, base, ti * BLOCK + tl.arange(0, BLOCK), tj * BLOCK + tl.arange(0, BLOCK), N,
                             sai, saj)
    _store_range(lo_ptr, hi_ptr, pid_b * n_parts + pid, lo, hi)


@triton.jit
def _sym_gibbs_kernel(
    a_ptr,  # [B, N, N] affinity
    lo_ptr, hi_ptr,  # [B, n_parts] float32 partial min / max of Sym
    k_ptr,  # [B, N, N] float32 out (contiguous)
    N, n_parts,
    sab, sai, saj,
    inv_eps,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """K[I, J] = exp(-(Craw - min) / (max - min) / eps), Craw = -log(Sym / M + 1e-12), for tile pair
    ti <= tj, and K[J, I] = K[I, J]^T.

    method.md section 2 (second pass, K only). On a diagonal tile (ti == tj) the transposed store
    would rewrite the same entries with the same values; it is masked off.
    """
    ti, tj = _tile_pair(tl.program_id(0))
    pid_b = tl.program_id(1).to(tl.int64)
    inv_scale, lo, span = _image_range(lo_ptr, hi_ptr, pid_b, n_parts, BLOCK_S)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    sym, mask = _sym_tile(a_ptr + pid_b * sab, rows, cols, N, sai, saj)
    _, kern = _cost_and_kernel(sym, inv_scale, lo, span, inv_eps)
    out = k_ptr + pid_b * N * N
    tl.store(out + rows[:, None] * N + cols[None, :], kern, mask=mask)
    tl.store(out + cols[:, None] * N + rows[None, :], tl.trans(kern),
             mask=(cols[:, None] < N) & (rows[None, :] < N) & (ti != tj))


_RANGE_CONFIGS = configs("BLOCK_N", [(64, 4), (128, 4), (128, 8), (256, 8)])
# elementwise over [N, N]: 64x64 tiles give 4096 programs per image at N = 4096 (132 SMs)
_TILE_CONFIGS = configs("BLOCK_M BLOCK_N", [(32, 32, 4), (64, 64, 4), (64, 64, 8), (32, 128, 8)])
# symmetric tiles are square (tile ti of the rows is tile ti of the columns); both passes of
# gibbs_kernel_only tune over these. No 128 x 128 tile: for sm_90 ptxas spills registers there at 8 and
# at 16 warps (the range pass's running min / max and the tile pair are all live at once).
SYM_CONFIGS = configs("BLOCK", [(32, 4), (64, 4), (64, 8)])
#: the one configuration of both symmetric passes under the interpreter (which cannot time)
_SYM_INTERPRET_BLOCK = 16
_range_tuned = autotune(configs=_RANGE_CONFIGS, key=["N"])(_cost_range_kernel)
_tile_tuned = autotune(configs=_TILE_CONFIGS, key=["N"])(_gibbs_kernel_kernel)
_sym_range_tuned = autotune(configs=SYM_CONFIGS, key=["N"])(_sym_range_kernel)
_sym_tile_tuned = autotune(configs=SYM_CONFIGS, key=["N"])(_sym_gibbs_kernel)


def gibbs_kernel(affinity: Tensor, *, eps: float = EPS) -> tuple[Tensor, Tensor]:
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


def tile_pairs(N: int, block: int) -> int:
    """Tile pairs ti <= tj of an N x N matrix in block x block tiles (the upper triangle)."""
    t = triton.cdiv(N, block)
    return t * (t + 1) // 2


def gibbs_kernel_only(affinity: Tensor, *, eps: float = EPS) -> Tensor:
    """affinity: [B, N, N] -> kernel [B, N, N] float32, the K of :func:`gibbs_kernel` (same bits), no cost.

    Symmetric tiles: A is read once per pass, K written once. The range pass's program count per
    image is fixed before autotuning (RANGE_PARTS, or the tile pairs of the smallest tile if fewer),
    so the second pass knows how many partials to reduce whatever tile each pass picks.
    """
    B, N, _ = affinity.shape
    kern = torch.empty((B, N, N), dtype=torch.float32, device=affinity.device)
    if kern.numel() == 0:
        return kern
    interp = interpreting()
    smallest = _SYM_INTERPRET_BLOCK if interp else min(c.kwargs["BLOCK"] for c in SYM_CONFIGS)
    n_parts = min(RANGE_PARTS, tile_pairs(N, smallest))
    lo = torch.empty((B, n_parts), dtype=torch.float32, device=affinity.device)
    hi = torch.empty_like(lo)
    strides = affinity.stride()
    block_s = next_pow2(n_parts)
    with device_guard(affinity):
        if interp:
            _sym_range_kernel[(n_parts, B)](affinity, lo, hi, N, n_parts, *strides, BLOCK=smallest)
            _sym_gibbs_kernel[(tile_pairs(N, smallest), B)](affinity, lo, hi, kern, N, n_parts, *strides, 1.0 / eps,
                                                            BLOCK=smallest, BLOCK_S=block_s)
        else:
            _sym_range_tuned[(n_parts, B)](affinity, lo, hi, N, n_parts, *strides)
            _sym_tile_tuned[lambda m: (tile_pairs(N, m["BLOCK"]), B)](
                affinity, lo, hi, kern, N, n_parts, *strides, 1.0 / eps, BLOCK_S=block_s)
    return kern
