"""LPOSS's patch stage for the "cpu" and "cuda" backends: the kNN and edge weights, then the compiled solve.

Equal to :func:`ovss_fast.kernels.reference.label_propagation` (the spec). On the CPU the kNN and the edge
weights are the compiled ``knn_edges`` (csrc/cpu/knn_edges.cpp); elsewhere :func:`knn` in PyTorch ops takes
an unsorted ``topk`` of k + 1 per row block and sorts only the rows whose k-th and (k+1)-th similarities
tie (the tie-break by index needs it there and nowhere else). The symmetric graph and the CG are the
compiled ``knn_propagation`` (csrc/cpu/knn_propagation.cpp; csrc/cuda/knn_propagation*, compiled and never
run on a GPU), all classes in one batched CG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ovss_fast.kernels.common import compute_dtype

#: rows of the similarity matrix held at once by the kNN ([KNN_BLOCK, N])
KNN_BLOCK = 512


def knn(feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """feats [N, D] -> (sims [N, k], index [N, k]): the k largest inner products of each row, the lower index
    first among equal ones at the k-th place (what a stable sort gives). Order within a row is unspecified."""
    N = feats.shape[0]
    sims, index = [], []
    for start in range(0, N, KNN_BLOCK):
        s = feats[start:start + KNN_BLOCK] @ feats.T  # [b, N]
        if k >= N:
            v, i = torch.sort(s, dim=1, descending=True, stable=True)
        else:
            # the k + 1 largest, unsorted (cheaper); m = the (k+1)-th largest, which a tie at the k-th place
            # repeats. Rows without a tie drop it (the last column moves into its place).
            v, i = torch.topk(s, k + 1, dim=1, sorted=False)
            m, at = v.min(dim=1)
            tied = ((v == m.unsqueeze(1)).sum(1) >= 2).nonzero().flatten()
            rows = torch.arange(v.shape[0])
            v[rows, at], i[rows, at] = v[:, k].clone(), i[:, k].clone()
            if tied.numel():
                tv, ti = torch.sort(s[tied], dim=1, descending=True, stable=True)
                v[tied], i[tied] = tv[:, : k + 1], ti[:, : k + 1]
        sims.append(v[:, :k])
        index.append(i[:, :k])
    return torch.cat(sims), torch.cat(index)


def _has_cpu_knn_edges() -> bool:
    """Whether the compiled extension is loaded with its CPU knn_edges (the Triton interpreter may run without)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ovss_fast::knn_edges", "CPU"))
    except RuntimeError:  # schema not registered
        return False


def edge_weights(feats: Tensor, positions: Tensor, *, k: int, gamma: float, sigma: float,
                 dist_pow: float) -> tuple[Tensor, Tensor]:
    """feats [N, D] (L2-normalised here), positions [N, 2] -> (index [N, k'], w [N, k']), k' = min(k, N): each
    node's neighbours (itself among them) and w = max(0, sim)^gamma exp(-sigma dist^dist_pow).

    On the CPU both are the compiled ``knn_edges`` when loaded (csrc/cpu/knn_edges.cpp: the symmetric similarity
    tiles computed once, a running selection per row); elsewhere :func:`knn` and PyTorch ops."""
    if feats.device.type == "cpu" and _has_cpu_knn_edges():
        return torch.ops.ovss_fast.knn_edges(torch.nn.functional.normalize(feats, dim=1), positions, int(k),
                                             float(gamma), float(sigma), float(dist_pow))
    sims, index = knn(torch.nn.functional.normalize(feats, dim=1), min(k, feats.shape[0]))
    dist = (positions.unsqueeze(1) - positions[index]).square_().sum(-1).sqrt_()
    return index, sims.clamp_(min=0).pow_(gamma).mul_(torch.exp(dist.pow_(dist_pow).mul_(-sigma)))


def label_propagation(scores: Tensor, feats: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                      sigma: float = 0.01, dist_pow: float = 1.0, alpha: float = 0.95, iters: int = 10,
                      tol: float = 1e-6) -> Tensor:
    """scores [B, N, C], feats [B, N, D], positions [B, N, 2] -> [B, N, C]; as reference.label_propagation.

    The kNN and the edge weights here, then the graph and the CG in the compiled ``knn_propagation`` (the
    CPU or CUDA kernel, by the tensors' device)."""
    dt = compute_dtype(scores, feats, positions)
    out = torch.empty(scores.shape, dtype=dt, device=scores.device)
    for i in range(scores.shape[0]):
        index, w = edge_weights(feats[i].to(dt), positions[i].to(dt), k=k, gamma=gamma, sigma=sigma,
                                dist_pow=dist_pow)
        out[i] = torch.ops.ovss_fast.knn_propagation(index, w, scores[i].to(dt), float(alpha), int(iters), float(tol))
    return out
