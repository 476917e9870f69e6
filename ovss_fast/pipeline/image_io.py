"""One image decoder for every reader: ``Segmenter`` (files, PIL images) and the evaluation datasets.

Rules (docs/guide.md, "Image decoding"):

- 8-bit modes (1, L, RGB, CMYK, YCbCr, ...) convert to RGB by PIL's colour models
  (CMYK: R = 255 (1 - C)(1 - K) and so on);
- high bit depth is scaled to [0, 1], never clipped: I;16, I;16B, I;16L, I;16N by
  1 / 65535; mode I (how Pillow opens some 16-bit files) likewise when its values lie in
  0..65535, an error otherwise; mode F must already lie in [0, 1];
- alpha (RGBA, LA, PA, RGBa, La, and a palette or grey image with a ``transparency``
  entry) is composited on black: colour * alpha, so a transparent pixel is black whatever
  colour the file stores under it;
- the EXIF orientation is applied only when asked (``exif=True``: ``segment`` and
  ``Segmenter`` given a file path, so what a viewer shows is what gets segmented);
  datasets are read as stored, as their annotations are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ovss_fast.errors import InputError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def decode(im: Any, *, exif: bool = False) -> np.ndarray:
    """A PIL image -> [H, W, 3] RGB: uint8 (8-bit sources without alpha) or float32 in [0, 1]."""
    from PIL import ImageOps

    if exif:
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        raw = np.asarray(im)
        if mode == "I" and raw.size and (int(raw.min()) < 0 or int(raw.max()) > 65535):
            raise InputError(f"image mode 'I' (32-bit integers) holds values {int(raw.min())}..{int(raw.max())}; "
                             "only 0..65535 (16-bit) is understood")
        grey = raw.astype(np.float32) / np.float32(65535.0)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        if grey.size and not (np.isfinite(grey).all() and grey.min() >= 0.0 and grey.max() <= 1.0):
            raise InputError(f"image mode 'F' (32-bit floats) must lie in [0, 1], got {float(np.nanmin(grey)):g}.."
                             f"{float(np.nanmax(grey)):g}")
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in _ALPHA or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / np.float32(255.0)
        return rgba[..., :3] * rgba[..., 3:]
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_float(arr: np.ndarray) -> Tensor:
    """[H, W, 3] from :func:`decode` -> float32 [3, H, W] in [0, 1]."""
    t = torch.from_numpy(np.array(arr, copy=True, order="C")).permute(2, 0, 1)
    return t.float() / 255.0 if arr.dtype == np.uint8 else t.contiguous()


def to_uint8(arr: np.ndarray) -> Tensor:
    """[H, W, 3] from :func:`decode` -> uint8 [3, H, W] (float sources rounded to the nearest level)."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * np.float32(255.0)), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.array(arr, copy=True, order="C")).permute(2, 0, 1).contiguous()


__all__ = ["decode", "to_float", "to_uint8"]
