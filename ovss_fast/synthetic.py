"""Seeded synthetic scenes for tests, demos and benchmarks (no weights, no network).

A scene is what the method sees after CLIP, with a known ground truth:

- a region map: Voronoi cells on the image, each cell given a class;
- patch features: a strong component shared by every patch (CLIP's patch tokens are
  dominated by one), the patch's class direction, and class noise (a random mix of
  other classes' directions plus isotropic noise): raw argmax is poor;
- text embeddings: one random direction per class;
- an affinity that knows regions but not classes: attention-like weights from a
  per-region embedding (unrelated to the class) plus noise and a spatial falloff;
- a guide image whose colours follow the regions (plus noise), at full resolution.

``difficulty`` "easy" and "hard" differ in class noise, affinity noise and colour noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: per difficulty: (class-evidence weight, class-noise weight, isotropic noise,
#: affinity noise, affinity sharpness, colour noise)
DIFFICULTY = {
    "easy": (0.30, 0.55, 0.35, 0.35, 6.0, 0.03),
    "hard": (0.26, 0.62, 0.40, 0.60, 4.0, 0.06),
}


@dataclass
class Scene:
    """One synthetic batch. Shapes: B images, N = h * w patches, C classes, D width."""

    feats: Tensor  # [B, N, D]
    text: Tensor  # [C, D]
    affinity: Tensor  # [B, N, N]
    guide: Tensor  # [B, 3, H, W], values in [0, 1]
    labels: Tensor  # [B, h, w] int64, ground truth at patch resolution
    labels_full: Tensor  # [B, H, W] int64, ground truth at image resolution
    grid: tuple[int, int]
    class_names: list[str]


def _voronoi(centres: Tensor, size: tuple[int, int]) -> Tensor:
    """Index of the nearest centre (in unit coordinates) for every cell of a grid."""
    hh, ww = size
    ys = (torch.arange(hh, dtype=torch.float64) + 0.5) / hh
    xs = (torch.arange(ww, dtype=torch.float64) + 0.5) / ww
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [hh*ww, 2]
    return torch.cdist(pts, centres).argmin(dim=1).reshape(hh, ww)


def make_scene(
    seed: int = 0,
    *,
    batch: int = 1,
    grid: tuple[int, int] = (24, 24),
    image_size: tuple[int, int] = (192, 192),
    num_classes: int = 6,
    num_regions: int = 9,
    dim: int = 64,
    difficulty: str = "easy",
    dtype: torch.dtype = torch.float32,
) -> Scene:
    """A reproducible synthetic scene; the same seed gives the same tensors on every machine."""
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
    if num_classes < 1 or num_regions < 1:
        raise ValueError(f"num_classes and num_regions must be >= 1, got {num_classes} and {num_regions}")
    w_cls, w_noise_cls, w_iso, aff_noise, sharp, colour_noise = DIFFICULTY[difficulty]
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    H, W = image_size
    n = h * w
    text = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    text = text / text.norm(dim=1, keepdim=True)
    shared = torch.randn(dim, generator=gen, dtype=torch.float64)
    shared = shared / shared.norm()

    feats, affs, guides, labs, labs_full = [], [], [], [], []
    for _ in range(batch):
        centres = torch.rand(num_regions, 2, generator=gen, dtype=torch.float64)
        # every class appears at least once when there are enough regions
        region_class = torch.randperm(max(num_regions, num_classes), generator=gen)[:num_regions] % num_classes
        region_low = _voronoi(centres, (h, w)).reshape(-1)  # [N]
        region_full = _voronoi(centres, (H, W))  # [H, W]
        cls = region_class[region_low]  # [N]

        # features: shared + class + class noise (a random mix of the other classes) + iso noise
        mix = torch.randn(n, num_classes, generator=gen, dtype=torch.float64)
        noise_cls = mix @ text
        noise_cls = noise_cls / noise_cls.norm(dim=1, keepdim=True)
        iso = torch.randn(n, dim, generator=gen, dtype=torch.float64) / dim**0.5
        x = shared[None] + w_cls * text[cls] + w_noise_cls * noise_cls + w_iso * iso
        feats.append(x)

        # affinity: regions, not classes
        emb = torch.randn(num_regions, 16, generator=gen, dtype=torch.float64)
        z = emb[region_low] + aff_noise * torch.randn(n, 16, generator=gen, dtype=torch.float64)
        z = z / z.norm(dim=1, keepdim=True)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        pos = torch.stack([yy.reshape(-1) / h, xx.reshape(-1) / w], dim=1)
        dist2 = torch.cdist(pos, pos) ** 2
        logits = sharp * (z @ z.T) - dist2 / 0.5
        affs.append(torch.softmax(logits, dim=1))  # rows sum to 1, like attention

        # guide: a colour per region plus noise, in [0, 1]
        colours = 0.15 + 0.7 * torch.rand(num_regions, 3, generator=gen, dtype=torch.float64)
        img = colours[region_full].permute(2, 0, 1)
        img = img + colour_noise * torch.randn(3, H, W, generator=gen, dtype=torch.float64)
        guides.append(img.clamp(0, 1))
        labs.append(cls.reshape(h, w))
        labs_full.append(region_class[region_full])

    return Scene(
        feats=torch.stack(feats).to(dtype),
        text=text.to(dtype),
        affinity=torch.stack(affs).to(dtype),
        guide=torch.stack(guides).to(dtype),
        labels=torch.stack(labs),
        labels_full=torch.stack(labs_full),
        grid=(h, w),
        class_names=[f"class{c}" for c in range(num_classes)],
    )


def miou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean intersection over union over the classes present in pred or target."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long()
    ious = []
    for c in range(num_classes):
        inter = ((p == c) & (t == c)).sum().item()
        union = ((p == c) | (t == c)).sum().item()
        if union > 0:
            ious.append(inter / union)
    return float(sum(ious) / len(ious)) if ious else 0.0
