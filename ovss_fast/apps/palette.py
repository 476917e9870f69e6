"""Label maps as images (Pillow only): palette PNGs and overlays with a legend."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovss_fast.errors import InputError


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours: the PASCAL VOC colour map (bit-interleaved label index),
    so label 0 is black and 1, 2, 3 are dark red, green and olive."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def _labels_array(labels: Any) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim != 2:
        raise InputError(f"labels must be a 2D [H, W] map, got shape {arr.shape}")
    if arr.size and (arr.min() < 0):
        raise InputError(f"labels must be non-negative class indices, got a minimum of {arr.min()}")
    return arr


def label_image(labels: Any, num_classes: int | None = None) -> Image.Image:
    """[H, W] class indices -> a palette ("P" mode) image whose pixel values are the indices."""
    arr = _labels_array(labels)
    top = int(arr.max()) + 1 if arr.size else 1
    n = max(num_classes or 0, top)
    if n > 256:
        raise InputError(f"a palette PNG holds at most 256 classes, got {n}")
    im = Image.fromarray(arr.astype(np.uint8))  # mode "L"; putpalette turns it into "P" with the same values
    im.putpalette([v for rgb in palette(256) for v in rgb])
    return im


def save_labels(labels: Any, path: str | os.PathLike, num_classes: int | None = None) -> None:
    """Write [H, W] class indices as a palette PNG (values = indices, colours = :func:`palette`)."""
    label_image(labels, num_classes).save(os.fspath(path), format="PNG")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def overlay(image: Image.Image, labels: Any, class_names: Sequence[str], *, alpha: float = 0.5,
            legend: bool = True) -> Image.Image:
    """The image with its label colours blended in (``alpha`` = label weight) and, when
    ``legend``, a panel on the right with each class's colour and name (classes present
    in the map first; absent ones greyed)."""
    arr = _labels_array(labels)
    image = image.convert("RGB")
    if image.size != (arr.shape[1], arr.shape[0]):
        raise InputError(f"labels {arr.shape[1]}x{arr.shape[0]} (WxH) do not match the image {image.size}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    n = len(class_names)
    if arr.size and int(arr.max()) >= n:
        raise InputError(f"labels hold class {int(arr.max())} but only {n} class names were given")
    colours = np.array(palette(max(n, 1)), dtype=np.float32)
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colours[arr]
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    if not legend:
        return out

    size = max(12, min(24, out.height // 20))
    font = _font(size)
    present = set(np.unique(arr).tolist())
    order = [c for c in range(n) if c in present] + [c for c in range(n) if c not in present]
    draw0 = ImageDraw.Draw(out)
    text_w = max(int(draw0.textlength(str(class_names[c]), font=font)) for c in order) if order else 0
    pad, box = size // 2, size
    line = size + pad
    width = pad * 3 + box + text_w
    height = max(out.height, pad + line * n)
    canvas = Image.new("RGB", (out.width + width, height), (255, 255, 255))
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = out.width + pad
    for row, c in enumerate(order):
        y = pad + row * line
        colour = tuple(int(v) for v in colours[c])
        draw.rectangle([x0, y, x0 + box, y + box], fill=colour, outline=(0, 0, 0))
        fill = (0, 0, 0) if c in present else (150, 150, 150)
        draw.text((x0 + box + pad, y), str(class_names[c]), fill=fill, font=font)
    return canvas
