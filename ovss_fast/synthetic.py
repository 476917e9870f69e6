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

:func:`make_scene` is the small scene of the demo and the tests; :func:`make_dataset_scene` is one image
like a benchmark's (``DATASETS``: VOC-like, 21 classes of which 2-6 are present; Stuff-like, 171 classes
of which 8-20 are present), the scenes of the synthetic ablation (bench/bench_ablation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ovss_fast.errors import InputError

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


def _image(gen: torch.Generator, text: Tensor, shared: Tensor, centres: Tensor, region_class: Tensor,
           grid: tuple[int, int], image_size: tuple[int, int], params: tuple[float, ...],
           confusers: int = 0, evidence: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One image of a scene, float64: features [N, D], affinity [N, N], guide [3, H, W], labels [h, w] and
    [H, W]. ``confusers`` 0: the class noise mixes every class of the vocabulary; k > 0: k classes drawn
    per patch from the vocabulary (a patch is confused with a few classes, whatever the vocabulary's size).
    ``evidence`` scales the class and class-noise weights (the logits' spread over classes)."""
    w_cls, w_noise_cls, w_iso, aff_noise, sharp, colour_noise = params
    (h, w), (H, W) = grid, image_size
    n, num_classes, dim = h * w, text.shape[0], text.shape[1]
    num_regions = centres.shape[0]
    region_low = _voronoi(centres, (h, w)).reshape(-1)  # [N]
    region_full = _voronoi(centres, (H, W))  # [H, W]
    cls = region_class[region_low]  # [N]

    # features: shared + class + class noise (a random mix of the other classes) + iso noise
    mix = torch.randn(n, num_classes, generator=gen, dtype=torch.float64)
    if confusers > 0:
        keep = torch.rand(n, num_classes, generator=gen, dtype=torch.float64).argsort(dim=1)[:, :confusers]
        mix = torch.zeros_like(mix).scatter(1, keep, mix.gather(1, keep))
    noise_cls = mix @ text
    noise_cls = noise_cls / noise_cls.norm(dim=1, keepdim=True)
    iso = torch.randn(n, dim, generator=gen, dtype=torch.float64) / dim**0.5
    x = shared[None] + evidence * (w_cls * text[cls] + w_noise_cls * noise_cls) + w_iso * iso

    # affinity: regions, not classes
    emb = torch.randn(num_regions, 16, generator=gen, dtype=torch.float64)
    z = emb[region_low] + aff_noise * torch.randn(n, 16, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([yy.reshape(-1) / h, xx.reshape(-1) / w], dim=1)
    dist2 = torch.cdist(pos, pos) ** 2
    logits = sharp * (z @ z.T) - dist2 / 0.5
    aff = torch.softmax(logits, dim=1)  # rows sum to 1, like attention

    # guide: a colour per region plus noise, in [0, 1]
    colours = 0.15 + 0.7 * torch.rand(num_regions, 3, generator=gen, dtype=torch.float64)
    img = colours[region_full].permute(2, 0, 1)
    img = img + colour_noise * torch.randn(3, H, W, generator=gen, dtype=torch.float64)
    return x, aff, img.clamp(0, 1), cls.reshape(h, w), region_class[region_full]


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
        raise InputError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
    if num_classes < 1 or num_regions < 1:
        raise InputError(f"num_classes and num_regions must be >= 1, got {num_classes} and {num_regions}")
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    text = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    text = text / text.norm(dim=1, keepdim=True)
    shared = torch.randn(dim, generator=gen, dtype=torch.float64)
    shared = shared / shared.norm()

    feats, affs, guides, labs, labs_full = [], [], [], [], []
    for _ in range(batch):
        centres = torch.rand(num_regions, 2, generator=gen, dtype=torch.float64)
        # every class appears at least once when there are enough regions
        region_class = torch.randperm(max(num_regions, num_classes), generator=gen)[:num_regions] % num_classes
        x, aff, img, lab, lab_full = _image(gen, text, shared, centres, region_class, grid, image_size,
                                            DIFFICULTY[difficulty])
        feats.append(x)
        affs.append(aff)
        guides.append(img)
        labs.append(lab)
        labs_full.append(lab_full)

    return _stack(feats, text, affs, guides, labs, labs_full, grid, dtype)


def _stack(feats: list[Tensor], text: Tensor, affs: list[Tensor], guides: list[Tensor], labs: list[Tensor],
           labs_full: list[Tensor], grid: tuple[int, int], dtype: torch.dtype) -> Scene:
    return Scene(
        feats=torch.stack(feats).to(dtype),
        text=text.to(dtype),
        affinity=torch.stack(affs).to(dtype),
        guide=torch.stack(guides).to(dtype),
        labels=torch.stack(labs),
        labels_full=torch.stack(labs_full),
        grid=tuple(grid),
        class_names=[f"class{c}" for c in range(text.shape[0])],
    )


@dataclass(frozen=True)
class DatasetLike:
    """A benchmark-like family of scenes: its vocabulary, how many classes an image shows, its patch grid."""

    num_classes: int  # the vocabulary (every class is a candidate in every image)
    present: tuple[int, int]  # min and max classes present in one image (inclusive)
    extra_regions: tuple[int, int]  # min and max regions beyond one per present class
    grid: tuple[int, int]  # patch grid (h, w)
    patch_px: int  # pixels per patch side of the guide image
    background: bool  # class 0 is present in every image (VOC's background)


#: VOC-like: 21 classes (0 = background, in every image), 2-6 present, a 21 x 28 grid (VOC's N = 588 under the
#: paper's protocol); Stuff-like: 171 classes, 8-20 present, 24 x 24 patches (COCO-Stuff's N ~ 1036 scaled down).
DATASETS = {
    "voc": DatasetLike(num_classes=21, present=(2, 6), extra_regions=(0, 3), grid=(21, 28), patch_px=8,
                       background=True),
    "stuff": DatasetLike(num_classes=171, present=(8, 20), extra_regions=(0, 6), grid=(24, 24), patch_px=8,
                         background=False),
}
#: class noise of a dataset-like scene: a mix of this many vocabulary classes per patch (all of VOC's 21; as
#: many of Stuff's 171, drawn per patch: a patch's confusions do not grow with the vocabulary, which classes
#: they are does)
CONFUSERS = 21
#: class evidence of a dataset-like scene relative to :func:`make_scene`'s: with 512-wide features, 0.15 puts a
#: patch's true class a few logits (at scale 100) above the rest, not make_scene's tens
EVIDENCE = 0.15


def make_dataset_scene(seed: int, kind: str = "voc", *, difficulty: str = "easy", dim: int = 512,
                       evidence: float = EVIDENCE, confusers: int = CONFUSERS,
                       grid: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32) -> Scene:
    """One image like a benchmark's (``DATASETS[kind]``): a vocabulary of classes of which a few are present.

    The present classes are drawn from the vocabulary (VOC-like: background plus 1-5 others); every present
    class owns at least one Voronoi region, a few more regions repeat present classes. Features, affinity and
    guide follow :func:`make_scene`, except the class noise, which mixes ``CONFUSERS`` vocabulary classes per
    patch, so absent classes compete for patches as they do in a large vocabulary. ``grid`` replaces the
    family's patch grid (smaller scenes for smoke tests).
    """
    if kind not in DATASETS:
        raise InputError(f"kind must be one of {sorted(DATASETS)}, got {kind!r}")
    if difficulty not in DIFFICULTY:
        raise InputError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
    spec = DATASETS[kind]
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(spec.num_classes, dim, generator=gen, dtype=torch.float64)
    text = text / text.norm(dim=1, keepdim=True)
    shared = torch.randn(dim, generator=gen, dtype=torch.float64)
    shared = shared / shared.norm()
    lo, hi = spec.present
    k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if spec.background:
        present = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(spec.num_classes - 1,
                                                                                     generator=gen)[:k - 1]])
    else:
        present = torch.randperm(spec.num_classes, generator=gen)[:k]
    extra = int(torch.randint(spec.extra_regions[0], spec.extra_regions[1] + 1, (1,), generator=gen))
    region_class = torch.cat([present, present[torch.randint(0, k, (extra,), generator=gen)]])
    centres = torch.rand(k + extra, 2, generator=gen, dtype=torch.float64)
    h, w = grid = tuple(grid or spec.grid)
    size = (h * spec.patch_px, w * spec.patch_px)
    x, aff, img, lab, lab_full = _image(gen, text, shared, centres, region_class, grid, size,
                                        DIFFICULTY[difficulty], confusers=confusers, evidence=evidence)
    return _stack([x], text, [aff], [img], [lab], [lab_full], grid, dtype)


def miou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean intersection over union over the classes present in pred or target."""
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long()
    # per-class counts by bincount (labels outside 0..num_classes-1 count for no class)
    def count(x: Tensor) -> Tensor:
        return torch.bincount(x[(x >= 0) & (x < num_classes)], minlength=num_classes)[:num_classes]

    inter = count(torch.where(p == t, p, torch.full_like(p, -1)))
    union = count(p) + count(t) - inter
    ious = [i / u for i, u in zip(inter.tolist(), union.tolist(), strict=True) if u > 0]
    return float(sum(ious) / len(ious)) if ious else 0.0
