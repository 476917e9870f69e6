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
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError

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
    #: [B, N, 16] unit region features, a DINO-like source for LPOSS's kNN graph (make_clip_like_scene only, else
    #: None): the very embeddings (region embedding plus the affinity's noise) the affinity is built from, so they
    #: know regions, not classes, with the same noise knobs; drawn before the affinity, no extra random numbers
    dino_feats: Tensor | None = None


def _voronoi(centres: Tensor, size: tuple[int, int]) -> Tensor:
    """Index of the nearest centre (in unit coordinates) for every cell of a grid."""
    hh, ww = size
    ys = (torch.arange(hh, dtype=torch.float64) + 0.5) / hh
    xs = (torch.arange(ww, dtype=torch.float64) + 0.5) / ww
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [hh*ww, 2]
    return torch.cdist(pts, centres).argmin(dim=1).reshape(hh, ww)


def _region_affinity(gen: torch.Generator, region_low: Tensor, num_regions: int, grid: tuple[int, int],
                     aff_noise: float, sharp: float) -> tuple[Tensor, Tensor]:
    """(affinity [N, N], region features [N, 16]): the affinity knows regions, not classes: attention-like weights
    (rows sum to 1) from a random embedding per region plus noise (the unit region features, a scene's
    ``dino_feats``), and a spatial falloff. region_low: [N] region index per patch."""
    h, w = grid
    n = h * w
    emb = torch.randn(num_regions, 16, generator=gen, dtype=torch.float64)
    z = emb[region_low] + aff_noise * torch.randn(n, 16, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([yy.reshape(-1) / h, xx.reshape(-1) / w], dim=1)
    dist2 = torch.cdist(pos, pos) ** 2
    logits = sharp * (z @ z.T) - dist2 / 0.5
    return torch.softmax(logits, dim=1), z


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

    aff, _ = _region_affinity(gen, region_low, num_regions, grid, aff_noise, sharp)

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
           labs_full: list[Tensor], grid: tuple[int, int], dtype: torch.dtype,
           dino: list[Tensor] | None = None) -> Scene:
    return Scene(
        feats=torch.stack(feats).to(dtype),
        text=text.to(dtype),
        affinity=torch.stack(affs).to(dtype),
        guide=torch.stack(guides).to(dtype),
        labels=torch.stack(labs),
        labels_full=torch.stack(labs_full),
        grid=tuple(grid),
        class_names=[f"class{c}" for c in range(text.shape[0])],
        dino_feats=None if dino is None else torch.stack(dino).to(dtype),
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


# ---------------------------------------------------------------------------------------------------------------------
# Scenes that fail the way CLIP does (issue 29)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipLikeParams:
    """The knobs of :func:`make_clip_like_scene`, in logits at CLIP's scale of 100 unless said otherwise.

    Each models one failure of CLIP's dense predictions that the literature documents:

    - ``evidence``: the local class signal, the true class's lead over the rest at its patches. CLIP's
      patch-text cosines live in a narrow band (about 0.15-0.35, differences of a few hundredths; MaskCLIP,
      Zhou et al. ECCV 2022; ClearCLIP, Lan et al. ECCV 2024, Fig. 1): at the logit scale of 100 a lead of a
      few logits. Calibrated (bench/calibrate_scenes.py).
    - ``image_level``: a component shared by every patch that leans towards the image's salient classes
      (ClearCLIP's residual analysis: the residual stream carries an image-level signal into every patch token;
      SCLIP, Wang et al. ECCV 2024: CLIP's patch tokens are spatially invariant, each votes for the image's
      main class). The image's present classes get it in proportion to area times a random salience.
      Calibrated together with ``text_bias`` (one ``bias`` knob, ``image_level = text_bias = bias``).
    - ``text_bias``: the spread (std) of a per-class offset shared by every patch, from the text side: some
      class names score high everywhere whatever the image (the "text bias" / hub classes that SCLIP's and
      NACLIP's (Hajimiri et al. WACV 2025) qualitative maps show as one class flooding the image; ClearCLIP
      sec. 3). Raw argmax suffers from it, per-class normalisation (KL) removes it.
    - ``noise`` and ``noise_corr``: patch noise on every class's logit (std, logits), spatially correlated
      over ``noise_corr`` patches (Gaussian blur sigma): CLIP's dense errors come in blobs, not per patch
      (the noisy maps of MaskCLIP, SCLIP and ClearCLIP's figures). Fixed, not calibrated.
    - ``texture``, ``parts`` and ``camouflage`` shape the guide image: texture amplitude inside regions,
      the fraction of object regions split into two-coloured parts (edges inside objects), and the chance
      a region takes a neighbour's colour (edges missing on class boundaries). Set once so that the guide's
      gradient magnitude separates class-boundary pixels from interior ones with a rank AUC of about
      0.8-0.9, as in photographs (issue 29; :func:`boundary_auc`), not tuned on any mIoU.
    """

    evidence: float
    bias: float
    noise: float = 0.1
    noise_corr: float = 1.5
    texture: float = 0.25
    parts: float = 0.5
    camouflage: float = 0.25


#: calibrated once by ``python -m bench.calibrate_scenes`` (bench/RESULTS.md, "Scene calibration") on raw argmax
#: and + KL only, then frozen: per dataset family, (evidence, bias)
CLIP_LIKE = {
    "voc": ClipLikeParams(evidence=2.0, bias=3.0, noise=0.1),
    "stuff": ClipLikeParams(evidence=2.0, bias=2.0, noise=0.45),
}
#: per difficulty, multipliers (noise, affinity noise index into DIFFICULTY, texture and camouflage)
CLIP_LIKE_DIFFICULTY = {"easy": 1.0, "hard": 1.25}


def _smooth_field(gen: torch.Generator, channels: int, size: tuple[int, int], cells: float) -> Tensor:
    """Smooth random field [channels, H, W], unit std per channel: Gaussian values on a coarse lattice every
    ``cells`` pixels, bicubic to full size."""
    hh, ww = size
    lh, lw = max(2, int(hh / cells) + 2), max(2, int(ww / cells) + 2)
    coarse = torch.randn(1, channels, lh, lw, generator=gen, dtype=torch.float64)
    f = F.interpolate(coarse, size=(hh, ww), mode="bicubic", align_corners=True)[0]
    return (f - f.mean(dim=(1, 2), keepdim=True)) / f.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of [C, h, w] over its last two dims (reflect padding); sigma in cells."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, 0, 0), mode="reflect") if x.shape[-1] > r else F.pad(x[None], (r, r, 0, 0),
                                                                                      mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="reflect") if x.shape[-2] > r else F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def _warped_coords(gen: torch.Generator, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Unit pixel coordinates [H, W] (y, x) bent by a smooth two-octave displacement field: Voronoi cells and
    blobs drawn in them get irregular outlines."""
    hh, ww = size
    ys = (torch.arange(hh, dtype=torch.float64) + 0.5) / hh
    xs = (torch.arange(ww, dtype=torch.float64) + 0.5) / ww
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    warp = 0.06 * _smooth_field(gen, 2, size, max(hh, ww) / 5) + 0.015 * _smooth_field(gen, 2, size,
                                                                                       max(hh, ww) / 16)
    return yy + warp[0], xx + warp[1]


def _warped_voronoi(gen: torch.Generator, num_regions: int, wy: Tensor, wx: Tensor) -> Tensor:
    """Index of the nearest of ``num_regions`` random centres, in warped coordinates: [H, W]."""
    pts = torch.stack([wy, wx], dim=-1).reshape(-1, 2)
    centres = torch.rand(num_regions, 2, generator=gen, dtype=torch.float64)
    return torch.cdist(pts, centres).argmin(dim=1).reshape(wy.shape)


def _blobs(gen: torch.Generator, num_objects: int, wy: Tensor, wx: Tensor) -> Tensor:
    """Object index per pixel (-1 where none): star-shaped blobs r(theta) = R (1 + sum_k a_k cos(k theta +
    phi_k)) in the warped coordinates, larger ones first, so smaller ones lie on top."""
    out = torch.full(wy.shape, -1, dtype=torch.long)
    radii = 0.12 + 0.22 * torch.rand(num_objects, generator=gen, dtype=torch.float64)
    order = radii.argsort(descending=True)
    for j in order.tolist():
        cy, cx = 0.2 + 0.6 * torch.rand(2, generator=gen, dtype=torch.float64)
        ay = 0.6 + 0.8 * float(torch.rand(1, generator=gen, dtype=torch.float64))  # aspect
        dy, dx = (wy - cy) / ay, (wx - cx) * ay
        theta, rho = torch.atan2(dy, dx), torch.sqrt(dy**2 + dx**2)
        r = torch.ones_like(theta)
        for k in range(2, 6):
            amp = 0.35 / k * float(torch.rand(1, generator=gen, dtype=torch.float64))
            r = r + amp * torch.cos(k * theta + 6.283185307 * float(torch.rand(1, generator=gen,
                                                                               dtype=torch.float64)))
        out[rho < radii[j] * r] = j
    return out


def _mode_pool(labels: Tensor, grid: tuple[int, int], num: int) -> Tensor:
    """The most frequent label of each patch's pixels: [H, W] -> [h, w] (H, W multiples of h, w)."""
    h, w = grid
    hh, ww = labels.shape
    py, px = hh // h, ww // w
    blocks = labels.reshape(h, py, w, px).permute(0, 2, 1, 3).reshape(h * w, py * px)
    counts = torch.zeros(h * w, num, dtype=torch.long).scatter_add_(1, blocks, torch.ones_like(blocks))
    return counts.argmax(dim=1).reshape(h, w)


def _textured_guide(gen: torch.Generator, region: Tensor, is_object: Tensor, p: ClipLikeParams,
                    colour_noise: float) -> Tensor:
    """Guide [3, H, W] in [0, 1]: a colour per region, a smooth texture inside every region, a second colour on
    part of some objects (edges inside objects), neighbours sharing a colour (camouflage: edges missing on class
    boundaries), a smooth illumination, pixel noise."""
    num = int(region.max()) + 1
    size = tuple(region.shape)
    colours = 0.15 + 0.7 * torch.rand(num, 3, generator=gen, dtype=torch.float64)
    # camouflage: a region takes the colour of a neighbour (adjacent somewhere in the image), nearly
    adj = torch.zeros(num, num, dtype=torch.bool)
    for a, b in ((region[1:], region[:-1]), (region[:, 1:], region[:, :-1])):
        m = a != b
        adj[a[m], b[m]] = True
    for r in range(num):
        nb = torch.nonzero(adj[r] | adj[:, r]).reshape(-1)
        if nb.numel() and float(torch.rand(1, generator=gen, dtype=torch.float64)) < p.camouflage:
            pick = nb[int(torch.randint(0, nb.numel(), (1,), generator=gen))]
            colours[r] = colours[pick] + 0.04 * torch.randn(3, generator=gen, dtype=torch.float64)
    img = colours[region].permute(2, 0, 1)
    # parts: a second colour on one side of a smooth random field inside some objects
    part_field = _smooth_field(gen, 1, size, max(size) / 6)[0]
    second = 0.15 + 0.7 * torch.rand(num, 3, generator=gen, dtype=torch.float64)
    has_parts = (torch.rand(num, generator=gen, dtype=torch.float64) < p.parts) & is_object
    split = has_parts[region] & (part_field > 0)
    img = torch.where(split[None], second[region].permute(2, 0, 1), img)
    # texture: two octaves of smooth colour noise, per region its own amplitude
    amp = p.texture * (0.5 + torch.rand(num, generator=gen, dtype=torch.float64))
    tex = 0.7 * _smooth_field(gen, 3, size, 6.0) + 0.5 * _smooth_field(gen, 3, size, 2.5)
    img = img + amp[region][None] * tex
    img = img * (1 + 0.15 * _smooth_field(gen, 1, size, max(size) / 2))  # illumination
    img = img + colour_noise * torch.randn(3, *size, generator=gen, dtype=torch.float64)
    return img.clamp(0, 1)


#: CLIP-like patch-text cosines: text embeddings of class prompts share a large common direction (their mutual
#: cosine about TEXT_COMMON**2 = 0.5 here), and a patch's cosine to a class is BASE_COSINE + logit / 100
TEXT_COMMON = 0.5**0.5
BASE_COSINE = 0.2
#: the vocabulary (text embeddings and the per-class text bias) is one per dataset family, like a benchmark's
#: class names: drawn from this seed plus the family's index, whatever the scene's seed
VOCABULARY_SEED = 29_000


@lru_cache(maxsize=8)
def _vocabulary(kind: str, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(orthonormal basis [C + 1, D]: the common text direction e0 then one direction per class, text [C, D],
    text bias [C] ~ N(0, 1)) of a dataset family; dim 0: the text bias only (the same for every dim)."""
    num_classes = DATASETS[kind].num_classes
    gen = torch.Generator().manual_seed(VOCABULARY_SEED + sorted(DATASETS).index(kind))
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64)
    if dim == 0:
        return torch.empty(0), torch.empty(0), bias
    if dim < num_classes + 2:
        raise InputError(f"dim must be >= {num_classes + 2} for {kind!r} ({num_classes} classes), got {dim}")
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes + 1, generator=gen, dtype=torch.float64))
    basis = basis.T.contiguous()  # [C + 1, D], orthonormal rows
    text = TEXT_COMMON * basis[0] + (1 - TEXT_COMMON**2) ** 0.5 * basis[1:]
    return basis, text, bias


def _features_with_logits(gen: torch.Generator, basis: Tensor, logits: Tensor) -> Tensor:
    """Unit features [N, D] whose cosine to class c's text is BASE_COSINE + logits[:, c] / 100 exactly: a
    common component, the logits on the class directions, and a random residual orthogonal to all of them."""
    n, dim = logits.shape[0], basis.shape[1]
    logits = logits - logits.mean(dim=1, keepdim=True)  # a per-patch constant moves neither softmax nor argmax
    common = BASE_COSINE / TEXT_COMMON
    coef = logits / (100.0 * (1 - TEXT_COMMON**2) ** 0.5)  # [N, C]
    rest = 1 - common**2 - (coef**2).sum(dim=1)
    if float(rest.min()) <= 0:
        raise InputError("logits too large for unit features: lower evidence, bias or noise")
    resid = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    resid = resid - (resid @ basis.T) @ basis
    resid = resid / resid.norm(dim=1, keepdim=True) * rest.sqrt()[:, None]
    return common * basis[0] + coef @ basis[1:] + resid


@dataclass
class ClipLikeLayout:
    """What a CLIP-like scene draws before its logits' strengths are applied (so that calibration can try many
    strengths on the same scenes): the ground truth, its regions, and each logit term at unit strength."""

    kind: str
    difficulty: str
    grid: tuple[int, int]
    region_full: Tensor  # [H, W] region index
    region_class: Tensor  # [R] class of each region
    is_object: Tensor  # [R] bool: an object (VOC-like blobs; every Stuff-like region), may get parts
    region_low: Tensor  # [N] region of each patch (the most frequent among its pixels)
    labels: Tensor  # [N] class of each patch
    labels_full: Tensor  # [H, W] class of each pixel
    salience: Tensor  # [C] image-level term at unit strength (1 for the most salient present class)
    text_bias: Tensor  # [C] the family's text bias, N(0, 1)
    noise: Tensor  # [N, C] spatially correlated noise, unit std

    def logits(self, params: ClipLikeParams) -> Tensor:
        """Logits [N, C] at CLIP's scale: evidence at the true class + bias * (image-level + text bias) + noise
        (times the difficulty's multiplier)."""
        n, c = self.noise.shape
        out = torch.zeros(n, c, dtype=torch.float64)
        out[torch.arange(n), self.labels] = params.evidence
        out = out + params.bias * (self.salience + self.text_bias)[None]
        return out + CLIP_LIKE_DIFFICULTY[self.difficulty] * params.noise * self.noise


def _check_clip_like(kind: str, difficulty: str, grid: tuple[int, int] | None,
                     patch_px: int | None) -> tuple[DatasetLike, tuple[int, int], int]:
    if kind not in DATASETS:
        raise InputError(f"kind must be one of {sorted(DATASETS)}, got {kind!r}")
    if difficulty not in CLIP_LIKE_DIFFICULTY:
        raise InputError(f"difficulty must be one of {sorted(CLIP_LIKE_DIFFICULTY)}, got {difficulty!r}")
    spec = DATASETS[kind]
    grid = tuple(grid or spec.grid)
    if len(grid) != 2 or min(grid) < 2:
        raise InputError(f"grid must be (h, w) with h, w >= 2, got {grid}")
    px = spec.patch_px if patch_px is None else int(patch_px)
    if px < 1:
        raise InputError(f"patch_px must be >= 1, got {patch_px}")
    return spec, grid, px


def _layout(gen: torch.Generator, kind: str, difficulty: str, grid: tuple[int, int], px: int,
            noise_corr: float) -> ClipLikeLayout:
    spec = DATASETS[kind]
    h, w = grid
    size = (h * px, w * px)
    lo, hi = spec.present
    k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    extra = int(torch.randint(spec.extra_regions[0], spec.extra_regions[1] + 1, (1,), generator=gen))
    wy, wx = _warped_coords(gen, size)
    if spec.background:  # background cells (class 0) under blob objects of the k - 1 other present classes
        objects = 1 + torch.randperm(spec.num_classes - 1, generator=gen)[:k - 1]
        objects = torch.cat([objects, objects[torch.randint(0, k - 1, (min(extra, 2),), generator=gen)]])
        n_bg = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        bg = _warped_voronoi(gen, n_bg, wy, wx)
        blob = _blobs(gen, objects.numel(), wy, wx)
        region_full = torch.where(blob >= 0, n_bg + blob, bg)
        region_class = torch.cat([torch.zeros(n_bg, dtype=torch.long), objects])
        is_object = torch.cat([torch.zeros(n_bg, dtype=torch.bool), torch.ones(objects.numel(), dtype=torch.bool)])
    else:  # stuff: every region is a class region
        present = torch.randperm(spec.num_classes, generator=gen)[:k]
        region_class = torch.cat([present, present[torch.randint(0, k, (extra,), generator=gen)]])
        region_full = _warped_voronoi(gen, region_class.numel(), wy, wx)
        is_object = torch.ones(region_class.numel(), dtype=torch.bool)
    region_low = _mode_pool(region_full, grid, region_class.numel()).reshape(-1)  # [N]
    labels_full = region_class[region_full]
    num_classes = spec.num_classes
    area = torch.bincount(labels_full.reshape(-1), minlength=num_classes).to(torch.float64)
    if spec.background:  # the image-level signal is about the objects, not the background
        area[0] = 0
    salience = area * torch.exp(torch.randn(num_classes, generator=gen, dtype=torch.float64))
    noise = _blur(torch.randn(num_classes, h, w, generator=gen, dtype=torch.float64), noise_corr)
    noise = noise / noise.std().clamp_min(1e-12)
    return ClipLikeLayout(kind, difficulty, grid, region_full, region_class, is_object, region_low,
                          region_class[region_low], labels_full, salience / salience.max(),
                          _vocabulary(kind, 0)[2], noise.reshape(num_classes, h * w).T.contiguous())


def clip_like_layout(seed: int, kind: str = "voc", difficulty: str = "easy", *, grid: tuple[int, int] | None = None,
                     patch_px: int | None = None, noise_corr: float | None = None) -> ClipLikeLayout:
    """The layout :func:`make_clip_like_scene` draws for these arguments (the same ground truth and terms), without
    its features, affinity and guide: ``layout.logits(params)`` are that scene's logits for any strengths."""
    _, grid, px = _check_clip_like(kind, difficulty, grid, patch_px)
    corr = CLIP_LIKE[kind].noise_corr if noise_corr is None else noise_corr
    return _layout(torch.Generator().manual_seed(seed), kind, difficulty, grid, px, corr)


def make_clip_like_scene(seed: int, kind: str = "voc", difficulty: str = "easy", *,
                         params: ClipLikeParams | None = None, dim: int = 512, grid: tuple[int, int] | None = None,
                         patch_px: int | None = None, dtype: torch.dtype = torch.float32) -> Scene:
    """One image like a benchmark's (``DATASETS[kind]``) whose class evidence fails the way CLIP's does.

    Ground truth: VOC-like, 1-5 irregular blob objects (classes drawn from the 20, one or two repeated) over 1-3
    background cells of class 0; Stuff-like, 8-20 classes on warped Voronoi regions (a few repeated).
    Logits [N, C] at CLIP's scale (:class:`ClipLikeParams` names each term and its source): ``evidence`` at
    the true class, an image-level term towards the salient present classes (objects, not VOC's background)
    and the family's per-class text bias (both times ``bias``), spatially correlated noise. The features have
    exactly the cosines BASE_COSINE + logit / 100 with the family's fixed text embeddings
    (:data:`VOCABULARY_SEED`). Affinity: regions, not classes (as :func:`make_dataset_scene`, the same noise
    knobs ``DIFFICULTY``); ``dino_feats``: the region features that affinity is built from (a DINO-like source
    for LPOSS's kNN graph). Guide: textured, its edges only partly on class boundaries (:func:`boundary_auc`
    about 0.8-0.9). ``difficulty`` "hard" multiplies the logit noise by ``CLIP_LIKE_DIFFICULTY`` and takes
    the hard affinity and colour noise. ``params`` default ``CLIP_LIKE[kind]`` (calibrated);
    ``grid`` / ``patch_px`` replace the family's (smaller scenes for tests and the demo).
    """
    spec, grid, px = _check_clip_like(kind, difficulty, grid, patch_px)
    p = params if params is not None else CLIP_LIKE[kind]
    if not isinstance(p, ClipLikeParams):
        raise InputTypeError(f"params must be a ClipLikeParams, got {type(p).__name__}")
    basis, text, _ = _vocabulary(kind, dim)
    gen = torch.Generator().manual_seed(seed)
    lay = _layout(gen, kind, difficulty, grid, px, p.noise_corr)
    x = _features_with_logits(gen, basis, lay.logits(p))
    _, _, _, aff_noise, sharp, colour_noise = DIFFICULTY[difficulty]
    aff, dino = _region_affinity(gen, lay.region_low, lay.region_class.numel(), grid, aff_noise, sharp)
    img = _textured_guide(gen, lay.region_full, lay.is_object, p, colour_noise)
    return _stack([x], text, [aff], [img], [lay.labels.reshape(grid)], [lay.labels_full], grid, dtype, [dino])


def boundary_auc(guide: Tensor, labels: Tensor) -> float:
    """How well the guide's colour edges find the class boundaries: the rank AUC (Mann-Whitney) of the gradient
    magnitude (central differences, summed over RGB) at class-boundary pixels (a 4-neighbour of another class)
    against interior pixels. guide [3, H, W], labels [H, W]; 1 = every boundary pixel has a stronger edge than
    every interior one, 0.5 = chance."""
    if guide.dim() != 3 or labels.shape != guide.shape[1:]:
        raise InputError(f"guide [3, H, W] and labels [H, W] expected, got {tuple(guide.shape)} and "
                         f"{tuple(labels.shape)}")
    g = guide.double()
    gy = torch.zeros_like(g)
    gx = torch.zeros_like(g)
    gy[:, 1:-1] = (g[:, 2:] - g[:, :-2]) / 2
    gx[:, :, 1:-1] = (g[:, :, 2:] - g[:, :, :-2]) / 2
    mag = (gy**2 + gx**2).sum(dim=0).sqrt()
    lab = labels
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:-1] |= lab[1:] != lab[:-1]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    inner = slice(1, -1)  # the central differences are not defined on the frame
    mag, edge = mag[inner, inner].reshape(-1), edge[inner, inner].reshape(-1)
    pos, neg = int(edge.sum()), int((~edge).sum())
    if pos == 0 or neg == 0:
        raise InputError("labels need both boundary and interior pixels")
    ranks = torch.empty_like(mag)
    ranks[mag.argsort()] = torch.arange(1, mag.numel() + 1, dtype=torch.float64)
    return float((ranks[edge].sum() - pos * (pos + 1) / 2) / (pos * neg))
