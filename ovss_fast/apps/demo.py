"""``ovss-fast demo``: a synthetic scene through every mode; a table and a PNG panel.

Needs no weights and no network. The scene is CLIP-like (:func:`ovss_fast.synthetic.make_clip_like_scene`:
VOC-like by default, its raw argmax fails the way CLIP's does). The panel shows, left to right: the guide
image, the ground truth, raw CLIP argmax, and the kl, op and mv maps (joint-bilaterally upsampled to the
guide's size).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ovss_fast.apps.flags import add_backend_arguments, fail_or_raise
from ovss_fast.errors import InputError
from ovss_fast.ops import api as ops
from ovss_fast.synthetic import DATASETS, make_clip_like_scene, miou

MODES = ("kl", "op", "mv")


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8: distinct, deterministic colours (golden-ratio hues)."""
    import colorsys

    cols = [colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, 0.75, 0.95) for i in range(num_classes)]
    return (np.array(cols) * 255).round().astype(np.uint8)


def colourise(labels: Tensor, num_classes: int) -> np.ndarray:
    """labels [H, W] int -> [H, W, 3] uint8."""
    return palette(num_classes)[labels.cpu().numpy()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo.png", help="where to write the PNG panel (default: demo.png)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    parser.add_argument("--difficulty", choices=("easy", "hard"), default="easy")
    parser.add_argument("--grid", type=int, default=32, help="patch grid side h = w (default: 32)")
    parser.add_argument("--size", type=int, default=256, help="image side H = W (default: 256)")
    parser.add_argument("--kind", choices=sorted(DATASETS), default="voc",
                        help="voc: 21 classes, 2-6 present (default); stuff: 171 classes, 8-20 present")
    add_backend_arguments(parser, device_default="cpu")


def run_demo(*, seed: int = 0, difficulty: str = "easy", grid: int = 32, size: int = 256, kind: str = "voc",
             backend: str = "auto", device: str = "cpu") -> tuple[list[tuple[str, float, float]], list[np.ndarray]]:
    """Rows (name, mIoU at image resolution, ms) and the panel images, guide first."""
    if grid < 2 or size < grid or size % grid:
        raise InputError(f"--size must be a multiple of --grid (>= 2), got size {size} and grid {grid}")
    scene = make_clip_like_scene(seed, kind, difficulty, grid=(grid, grid), patch_px=size // grid)
    classes = scene.text.shape[0]
    feats, text, aff, guide = (t.to(device) for t in (scene.feats, scene.text, scene.affinity, scene.guide))
    gt = scene.labels_full[0]
    rows: list[tuple[str, float, float]] = []
    maps: list[Tensor] = []

    # raw CLIP: argmax of the class logits per patch, nearest-neighbour upsampled
    t0 = time.perf_counter()
    q = ops.class_distributions(feats, text, backend=backend)
    raw = q.argmax(-1).reshape(1, 1, grid, grid).float()
    raw = torch.nn.functional.interpolate(raw, size=(size, size), mode="nearest")[0, 0].long()
    rows.append(("raw argmax", miou(raw.cpu(), gt, classes), 1e3 * (time.perf_counter() - t0)))
    maps.append(raw)
    for mode in MODES:
        ops.segment_features(feats, text, aff, grid=(grid, grid), guide=guide, mode=mode, backend=backend)  # warm
        t0 = time.perf_counter()
        labels = ops.segment_features(feats, text, aff, grid=(grid, grid), guide=guide, mode=mode, backend=backend)
        if labels.is_cuda:
            torch.cuda.synchronize()
        rows.append((mode, miou(labels[0].cpu(), gt, classes), 1e3 * (time.perf_counter() - t0)))
        maps.append(labels[0])

    guide_img = (scene.guide[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    panels = [guide_img, colourise(gt, classes)] + [colourise(m, classes) for m in maps]
    return rows, panels


def save_panel(panels: list[np.ndarray], titles: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw

    h, w, _ = panels[0].shape
    pad, top = 6, 18
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + top + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(zip(panels, titles, strict=True)):
        x = pad + i * (w + pad)
        canvas.paste(Image.fromarray(img), (x, top))
        draw.text((x + 2, 3), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def run(args: argparse.Namespace) -> int:
    try:
        rows, panels = run_demo(seed=args.seed, difficulty=args.difficulty, grid=args.grid, size=args.size,
                                kind=args.kind, backend=args.backend, device=args.device)
    except Exception as exc:
        return fail_or_raise("ovss-fast demo", exc)
    print(f"synthetic CLIP-like scene: seed {args.seed}, {args.kind}-like, {args.difficulty}, "
          f"{args.grid}x{args.grid} patches -> {args.size}x{args.size} pixels, backend {args.backend}")
    print(f"{'method':<12}{'mIoU':>8}{'ms':>10}")
    for name, score, ms in rows:
        print(f"{name:<12}{score:>8.3f}{ms:>10.1f}")
    titles = ["guide", "ground truth"] + [f"{n} {s:.2f}" for n, s, _ in rows]
    out = Path(args.out)
    save_panel(panels, titles, out)
    print(f"wrote {out}")
    return 0
