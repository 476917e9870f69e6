"""Whole-image sizes drawn like VOC's and ADE20K's, as the ``dslo`` protocol sees them (seeded).

The protocol resizes an image to a short side (336; ADE20K runs at 336 or 448), crops it down to whole
16 px patches and upsamples the scores to the annotation: per image, the patch grid (h, w), N = h * w
and the annotation size (H, W). VOC images are at most 500 px on their long side (most 500 x 375 or
500 x 333, a third portrait); ADE20K's are larger and more varied (short side 256-512 here, aspect
ratios 1-2). Used by the tuning-count test (tests/test_triton_buckets.py) and bench/gpu_check.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PATCH = 16


@dataclass(frozen=True)
class WholeImage:
    """One image: annotation H x W, patch grid h x w (N = h * w), classes C."""

    H: int
    W: int
    h: int
    w: int
    C: int

    @property
    def N(self) -> int:  # noqa: N802 - the method's name for the patch count
        return self.h * self.w


def patch_grid(H: int, W: int, short: int) -> tuple[int, int]:
    """(h, w) patches of an H x W image resized to short side ``short`` and cropped to whole patches."""
    scale = short / min(H, W)
    return int(round(H * scale)) // PATCH, int(round(W * scale)) // PATCH


def whole_image_sizes(dataset: str, n: int = 200, seed: int = 0, short: int | None = None) -> list[WholeImage]:
    """``n`` seeded draws: dataset "voc" (C = 21, short side 336) or "ade" (C = 150, short side ``short``,
    336 or 448; None draws one of the two per image)."""
    rng = random.Random(f"{dataset}-{seed}-{short}")
    out = []
    for _ in range(n):
        if dataset == "voc":
            long_side, short_side = 500, rng.choice([375, 333, 375, 281, 400, 500, rng.randint(250, 500)])
            classes, s = 21, short or 336
        elif dataset == "ade":
            short_side = rng.randint(256, 512)
            long_side, classes = int(short_side * rng.uniform(1.0, 2.0)), 150
            s = short or rng.choice([336, 448])
        else:
            raise ValueError(f"dataset must be 'voc' or 'ade', got {dataset!r}")
        H, W = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
        h, w = patch_grid(H, W, s)
        out.append(WholeImage(H, W, h, w, classes))
    return out
