"""Fake (meta) implementations of the ``ovss_fast`` ops, so torch.compile can trace them.

Each mirrors the output shapes and dtypes of the kernels: float64 when any input
is float64, else float32; labels int64. Imported by :mod:`ovss_fast.kernels.extension`
after the library is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ovss_fast.kernels.common import compute_dtype


@torch.library.register_fake("ovss_fast::class_distributions")
def _class_distributions(feats: Tensor, text: Tensor, scale: float, nms: float, nms_axis: str = "classes") -> Tensor:
    B, N, _ = feats.shape
    return feats.new_empty((B, N, text.shape[0]), dtype=compute_dtype(feats, text))


@torch.library.register_fake("ovss_fast::gibbs_kernel")
def _gibbs_kernel(affinity: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    dt = compute_dtype(affinity)
    return affinity.new_empty(affinity.shape, dtype=dt), affinity.new_empty(affinity.shape, dtype=dt)


@torch.library.register_fake("ovss_fast::kl_scores")
def _kl_scores(q: Tensor) -> Tensor:
    return q.new_empty(q.shape, dtype=compute_dtype(q))


@torch.library.register_fake("ovss_fast::sinkhorn_scores")
def _sinkhorn_scores(q: Tensor, kernel: Tensor, eps: float, iters: int) -> Tensor:
    return q.new_empty(q.shape, dtype=compute_dtype(q, kernel))


@torch.library.register_fake("ovss_fast::markov_scores")
def _markov_scores(q: Tensor, kernel: Tensor, sk_iters: int, steps: int, readout: str, tau: float) -> Tensor:
    return q.new_empty(q.shape, dtype=compute_dtype(q, kernel))


@torch.library.register_fake("ovss_fast::jbu_upsample")
def _jbu_upsample(scores: Tensor, guide: Tensor, sigma_spatial: float, sigma_range: float, radius: int) -> Tensor:
    B, C = scores.shape[:2]
    H, W = guide.shape[-2:]
    return scores.new_empty((B, C, H, W), dtype=compute_dtype(scores, guide))


@torch.library.register_fake("ovss_fast::jbu_argmax")
def _jbu_argmax(scores: Tensor, guide: Tensor, sigma_spatial: float, sigma_range: float, radius: int) -> Tensor:
    H, W = guide.shape[-2:]
    return scores.new_empty((scores.shape[0], H, W), dtype=torch.int64)


@torch.library.register_fake("ovss_fast::pixel_propagation")
def _pixel_propagation(scores: Tensor, image: Tensor, radius: int, tau: float, alpha: float, iters: int,
                       tol: float) -> Tensor:
    return scores.new_empty(scores.shape, dtype=compute_dtype(scores, image))


@torch.library.register_fake("ovss_fast::knn_propagation")
def _knn_propagation(index: Tensor, weights: Tensor, b: Tensor, alpha: float, iters: int, tol: float) -> Tensor:
    return b.new_empty(b.shape, dtype=compute_dtype(b, weights))


@torch.library.register_fake("ovss_fast::knn_edges")
def _knn_edges(feats: Tensor, positions: Tensor, k: int, gamma: float, sigma: float,
               dist_pow: float) -> tuple[Tensor, Tensor]:
    shape = (feats.shape[0], min(k, feats.shape[0]))
    return feats.new_empty(shape, dtype=torch.int64), feats.new_empty(shape, dtype=compute_dtype(feats, positions))


@torch.library.register_fake("ovss_fast::pamr")
def _pamr(scores: Tensor, image: Tensor, iters: int, dilations: list[int]) -> Tensor:
    B, C = scores.shape[:2]
    H, W = image.shape[-2:]
    return scores.new_empty((B, C, H, W), dtype=compute_dtype(scores, image))
