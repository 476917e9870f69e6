"""Triton LPOSS / LPOSS+ label propagation (reference.label_propagation, reference.pixel_propagation).

Both solve (I - alpha S) x = y0 by conjugate gradient from 0, every column (a class of an image) at once, each
with its own scalars and its own stop (:func:`batched_cg`, PyTorch ops over the CG's vectors, the same
iteration as reference.propagation_cg); only the product S p is a Triton kernel.

LPOSS+ (pixel stage): S = D^-1/2 W D^-1/2, w_ij = exp(-||lab_i - lab_j|| / tau) for j in the (2r+1)^2 square
around i (not i, inside the image), Lab / (100, 128, 128) from reference.srgb_to_lab (float64, then float32).
S is held once as its forward half s [B, F, H W], F = 2 r (r + 1) offsets (dy > 0, or dy = 0 and dx > 0), slot
f = dy (2r+1) + dx - 1: s_ij = s_ji, so a pixel's backward neighbour i - o reads slot f of that neighbour.

    _stencil_weights_kernel   w over the forward half, d_i summed over the whole square, inv = d^-1/2 (0 -> 1)
    _stencil_scale_kernel     s_ij = w_ij inv_i inv_j
    _stencil_matvec_kernel    q = p - alpha S p on class planes [B C, H W], a program per (pixels, classes, image)

LPOSS (patch stage): the kNN and edge weights in PyTorch ops (kernels/propagation.py: blocked top-k, ties to
the lower index), S from common.symmetric_knn_graph (W + W^T, diagonal removed, normalised; coalesced) read as
CSR, and ``_csr_matvec_kernel``: q = p - alpha S p on [N, C], a program per (node, class block), the node's
entries in chunks of BLOCK_E.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovss_fast.kernels import reference
from ovss_fast.kernels.common import symmetric_knn_graph
from ovss_fast.kernels.propagation import edge_weights
from ovss_fast.kernels.triton._runtime import autotune, configs, device_guard, interpreting, next_pow2


# --------------------------------------------------------------------------- pixel stage
@triton.jit
def _pixel_block(H, W, BLOCK_P: tl.constexpr):
    """The pixels of program 0's block: (H W, flat index i, i < H W, row, column)."""
    HW = H * W
    i = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return HW, i, i < HW, i // W, i % W


@triton.jit
def _forward_offset(f, R):
    """The (dy, dx) of forward slot f = dy (2R+1) + dx - 1 (dy > 0, or dy = 0 and dx > 0)."""
    side = 2 * R + 1
    return (f + 1 + R) // side, (f + 1 + R) % side - R


@triton.jit
def _lab_distance_weight(lab_b, l0, l1, l2, j, mask, HW, inv_tau):
    """w = exp(-||lab_i - lab_j|| inv_tau) for the pixels j (0 where ~mask): [BLOCK_P] float32."""
    d0 = l0 - tl.load(lab_b + j, mask=mask, other=0.0)
    d1 = l1 - tl.load(lab_b + HW + j, mask=mask, other=0.0)
    d2 = l2 - tl.load(lab_b + 2 * HW + j, mask=mask, other=0.0)
    return tl.where(mask, tl.exp(-tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2) * inv_tau), 0.0)


@triton.jit
def _stencil_weights_kernel(
    lab_ptr,  # [B, 3, HW] float32 scaled Lab planes
    s_ptr,  # [B, F, HW] float32 out: the forward weights (0 off the image)
    inv_ptr,  # [B, HW] float32 out: d^-1/2
    H, W, R, inv_tau,
    BLOCK_P: tl.constexpr,
):
    """w_ij over the square around each pixel i; d_i = sum_j w_ij; the forward half stored, inv_i = d_i^-1/2."""
    b = tl.program_id(1).to(tl.int64)
    HW, i, pmask, y, x = _pixel_block(H, W, BLOCK_P)
    lab_b = lab_ptr + b * 3 * HW
    l0 = tl.load(lab_b + i, mask=pmask, other=0.0)
    l1 = tl.load(lab_b + HW + i, mask=pmask, other=0.0)
    l2 = tl.load(lab_b + 2 * HW + i, mask=pmask, other=0.0)
    side = 2 * R + 1
    F = R * (side + 1)
    s_b = s_ptr + b * F * HW + i
    degree = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in range(0, side * side):
        dy = t // side - R
        dx = t % side - R
        inside = pmask & (y + dy >= 0) & (y + dy < H) & (x + dx >= 0) & (x + dx < W) & (t != R * side + R)
        w = _lab_distance_weight(lab_b, l0, l1, l2, i + dy * W + dx, inside, HW, inv_tau)
        degree += w
        f = dy * side + dx - 1  # the forward half: t after the centre
        tl.store(s_b + f * HW, w, mask=pmask & (t > R * side + R))
    degree = tl.where(degree == 0.0, 1.0, degree)
    tl.store(inv_ptr + b * HW + i, 1.0 / tl.sqrt(degree), mask=pmask)


@triton.jit
def _stencil_scale_kernel(
    s_ptr,  # [B, F, HW] float32, scaled in place
    inv_ptr,  # [B, HW] float32
    H, W, R,
    BLOCK_P: tl.constexpr,
):
    """s_ij = w_ij inv_i inv_j over the forward half (off-image slots stay 0)."""
    b = tl.program_id(1).to(tl.int64)
    HW, i, pmask, y, x = _pixel_block(H, W, BLOCK_P)
    side = 2 * R + 1
    F = R * (side + 1)
    inv_b = inv_ptr + b * HW
    inv_i = tl.load(inv_b + i, mask=pmask, other=0.0)
    s_b = s_ptr + b * F * HW + i
    for f in range(0, F):
        dy, dx = _forward_offset(f, R)
        inside = pmask & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
        inv_j = tl.load(inv_b + i + dy * W + dx, mask=inside, other=0.0)
        w = tl.load(s_b + f * HW, mask=pmask, other=0.0)
        tl.store(s_b + f * HW, w * inv_i * inv_j, mask=pmask)


@triton.jit
def _stencil_matvec_kernel(
    s_ptr,  # [B, F, HW] float32 normalised forward half
    p_ptr,  # [B, C, HW] float32
    q_ptr,  # [B, C, HW] float32 out
    C, H, W, R, alpha,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """q = p - alpha S p: q_ic = p_ic - alpha sum_f (s_f[i] p_c[i + o_f] + s_f[i - o_f] p_c[i - o_f])."""
    b = tl.program_id(2).to(tl.int64)
    HW, i, pmask, y, x = _pixel_block(H, W, BLOCK_P)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = (cls < C)[None, :]
    side = 2 * R + 1
    F = R * (side + 1)
    s_b = s_ptr + b * F * HW
    p_b = p_ptr + (b * C + cls[None, :].to(tl.int64)) * HW
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for f in range(0, F):
        dy, dx = _forward_offset(f, R)
        o = dy * W + dx
        fwd = pmask & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
        w = tl.load(s_b + f * HW + i, mask=fwd, other=0.0)
        acc += w[:, None] * tl.load(p_b + (i + o)[:, None], mask=fwd[:, None] & cmask, other=0.0)
        bwd = pmask & (y - dy >= 0) & (x - dx >= 0) & (x - dx < W)
        w = tl.load(s_b + f * HW + i - o, mask=bwd, other=0.0)
        acc += w[:, None] * tl.load(p_b + (i - o)[:, None], mask=bwd[:, None] & cmask, other=0.0)
    mask2 = pmask[:, None] & cmask
    p_i = tl.load(p_b + i[:, None], mask=mask2, other=0.0)
    tl.store(q_ptr + (b * C + cls[None, :].to(tl.int64)) * HW + i[:, None], p_i - alpha * acc, mask=mask2)


# --------------------------------------------------------------------------- patch stage
@triton.jit
def _csr_matvec_kernel(
    crow_ptr,  # [N + 1] int64 row starts
    col_ptr,  # [nnz] int64
    val_ptr,  # [nnz] float32 normalised S
    p_ptr,  # [N, C] float32
    q_ptr,  # [N, C] float32 out
    C, alpha,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """q_i = p_i - alpha sum_e val_e p_{col_e} for node i = program 0, classes of block program 1."""
    i = tl.program_id(0).to(tl.int64)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    start = tl.load(crow_ptr + i)
    end = tl.load(crow_ptr + i + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        emask = e < end
        j = tl.load(col_ptr + e, mask=emask, other=0)
        v = tl.load(val_ptr + e, mask=emask, other=0.0)
        pv = tl.load(p_ptr + j[:, None] * C + cls[None, :], mask=emask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(v[:, None] * pv, axis=0)
    p_i = tl.load(p_ptr + i * C + cls, mask=cmask, other=0.0)
    tl.store(q_ptr + i * C + cls, p_i - alpha * acc, mask=cmask)


_PIXEL_CONFIGS = configs("BLOCK_P", [(128, 4), (256, 4), (512, 8)])
_MATVEC_CONFIGS = configs("BLOCK_P BLOCK_C", [(128, 8, 4), (64, 16, 4), (256, 4, 4), (128, 16, 8)])
_CSR_CONFIGS = configs("BLOCK_E BLOCK_C", [(32, 32, 4), (64, 16, 4), (16, 64, 4), (32, 64, 8)])
#: the scaling runs in place, so it is not autotuned (the autotuner would scale s once per config it times)
_SCALE_BLOCK, _SCALE_WARPS = 256, 4
# coarse keys: the radius per setting, the classes per dataset (the image size varies per image)
_weights_tuned = autotune(configs=_PIXEL_CONFIGS, key=["R"])(_stencil_weights_kernel)
_matvec_tuned = autotune(configs=_MATVEC_CONFIGS, key=["C", "R"])(_stencil_matvec_kernel)
_csr_tuned = autotune(configs=_CSR_CONFIGS, key=["C"])(_csr_matvec_kernel)


def _interpret_pixels(HW: int) -> int:
    """The interpreter's pixel block: few programs, since it runs them one after another."""
    return min(next_pow2(HW), 1024)


def batched_cg(matvec: Callable[[Tensor, Tensor], None], b: Tensor, *, alpha: float, iters: int, tol: float,
               dim: int) -> Tensor:
    """(I - alpha S) x = b by conjugate gradient from 0, every column of b at once (a column: a slice along
    ``dim``, the nodes), each with its own scalars and its own stop, as reference.propagation_cg (cupyx's cg:
    stop after the first step with ||r|| <= tol ||b||; a stopped column takes no further step).
    ``matvec(p, q)`` writes q = p - alpha S p; b, p, q are contiguous float32."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    q = torch.empty_like(b)
    rho = torch.linalg.vecdot(r, r, dim=dim).unsqueeze(dim)
    atol = rho.sqrt() * tol
    running = rho > 0
    for _ in range(iters):
        if not bool(running.any()):
            break
        matvec(p, q)
        step = (rho / torch.linalg.vecdot(p, q, dim=dim).unsqueeze(dim)).where(running, 0.0)
        x.addcmul_(p, step)
        r.addcmul_(q, step, value=-1)
        rho_next = torch.linalg.vecdot(r, r, dim=dim).unsqueeze(dim)
        running &= ~(rho_next.sqrt() <= atol)
        p.mul_((rho_next / rho).where(running, 0.0)).add_(r).mul_(running)
        rho = rho_next
    return x


def pixel_graph(image: Tensor, *, radius: int, tau: float) -> Tensor:
    """image [B, 3, H, W] -> the normalised stencil's forward half s [B, F, H W] float32, F = 2 r (r + 1)."""
    B, _, H, W = image.shape
    HW = H * W
    scale = torch.tensor(reference.LAB_SCALE, dtype=torch.float64, device=image.device)[:, None, None]
    lab = (reference.srgb_to_lab(image.double()) / scale).to(torch.float32).reshape(B, 3, HW).contiguous()
    s = torch.empty((B, 2 * radius * (radius + 1), HW), dtype=torch.float32, device=image.device)
    inv = torch.empty((B, HW), dtype=torch.float32, device=image.device)
    with device_guard(image):
        if interpreting():
            bp = _interpret_pixels(HW)
            _stencil_weights_kernel[(triton.cdiv(HW, bp), B)](lab, s, inv, H, W, radius, 1.0 / tau, BLOCK_P=bp)
            _stencil_scale_kernel[(triton.cdiv(HW, bp), B)](s, inv, H, W, radius, BLOCK_P=bp)
        else:
            _weights_tuned[lambda m: (triton.cdiv(HW, m["BLOCK_P"]), B)](lab, s, inv, H, W, radius, 1.0 / tau)
            _stencil_scale_kernel[(triton.cdiv(HW, _SCALE_BLOCK), B)](s, inv, H, W, radius, BLOCK_P=_SCALE_BLOCK,
                                                                      num_warps=_SCALE_WARPS)
    return s


def pixel_propagation(scores: Tensor, image: Tensor, *, radius: int = 6, tau: float = 0.01, alpha: float = 0.95,
                      iters: int = 10, tol: float = 1e-6) -> Tensor:
    """scores [B, C, H, W], image [B, 3, H, W] sRGB in [0, 1] -> [B, C, H, W] float32 (reference.pixel_propagation)."""
    B, C, H, W = scores.shape
    HW = H * W
    y0 = scores.to(torch.float32).contiguous().reshape(B * C, HW)
    if y0.numel() == 0:
        return y0.reshape(B, C, H, W).clone()
    s = pixel_graph(image, radius=radius, tau=tau)

    def matvec(p: Tensor, q: Tensor) -> None:
        with device_guard(p):
            if interpreting():
                bp, bc = _interpret_pixels(HW), min(next_pow2(C), 16)
                _stencil_matvec_kernel[(triton.cdiv(HW, bp), triton.cdiv(C, bc), B)](
                    s, p, q, C, H, W, radius, alpha, BLOCK_P=bp, BLOCK_C=bc)
            else:
                _matvec_tuned[lambda m: (triton.cdiv(HW, m["BLOCK_P"]), triton.cdiv(C, m["BLOCK_C"]), B)](
                    s, p, q, C, H, W, radius, alpha)

    return batched_cg(matvec, y0, alpha=alpha, iters=iters, tol=tol, dim=1).reshape(B, C, H, W)


def csr_graph(index: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """index, w [N, k] -> S as CSR (crow [N + 1], col [nnz] int64, val [nnz] float32), common.symmetric_knn_graph."""
    N = index.shape[0]
    s = symmetric_knn_graph(index, w)
    rows, cols = s.indices()
    crow = torch.searchsorted(rows, torch.arange(N + 1, device=rows.device))
    return crow.contiguous(), cols.contiguous(), s.values().to(torch.float32).contiguous()


def label_propagation(scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                      sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95, iters: int = 10,
                      tol: float = 1e-6) -> Tensor:
    """scores [B, N, C], feats [B, N, D], positions [B, N, 2] -> [B, N, C] float32 (reference.label_propagation)."""
    B, N, C = scores.shape
    out = torch.empty((B, N, C), dtype=torch.float32, device=scores.device)
    for b in range(B):
        index, w = edge_weights(feats[b].to(torch.float32), positions[b].to(torch.float32), k=k, gamma=gamma,
                                sigma=sigma, dist_pow=dist_pow)
        crow, col, val = csr_graph(index, w)

        def matvec(p: Tensor, q: Tensor, crow: Tensor = crow, col: Tensor = col, val: Tensor = val) -> None:
            with device_guard(p):
                if interpreting():
                    bc = min(next_pow2(C), 32)
                    _csr_matvec_kernel[(N, triton.cdiv(C, bc))](crow, col, val, p, q, C, alpha, BLOCK_E=32,
                                                                BLOCK_C=bc)
                else:
                    _csr_tuned[lambda m: (N, triton.cdiv(C, m["BLOCK_C"]))](crow, col, val, p, q, C, alpha)

        if N * C:
            out[b] = batched_cg(matvec, scores[b].to(torch.float32).contiguous(), alpha=alpha, iters=iters, tol=tol,
                                dim=0)
    return out
