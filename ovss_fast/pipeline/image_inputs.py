"""Image inputs: files, PIL images, numpy arrays and tensors -> batches of float32 [B, 3, H, W] in [0, 1].

Decoding follows :mod:`ovss_fast.pipeline.image_io` (16-bit scaled, alpha composited on black, EXIF
orientation for files). Every accepted form and its errors are in :func:`as_image_batches`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ovss_fast.errors import InputError, InputTypeError
from ovss_fast.pipeline import image_io as _image

ImageLike = Any  # PIL.Image.Image | np.ndarray | Tensor | str | os.PathLike, or a list of them


def load_image(path: str | os.PathLike, *, exif: bool = True) -> Tensor:
    """Read an image file -> [3, H, W] float32 RGB in [0, 1]; clear errors for missing or corrupt files.

    Decoding follows :mod:`ovss_fast.pipeline.image_io` (16-bit scaled, alpha composited on black);
    ``exif=True`` applies the file's EXIF orientation, so the image is the one a viewer shows.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} not found")
    try:
        with Image.open(path) as im:
            im.load()
            return pil_to_tensor(im, exif=exif)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"could not read image file {path!r} ({exc.__class__.__name__}: {exc}); is it a complete "
            "PNG/JPEG/... image?"
        ) from exc


def pil_to_tensor(im: Any, *, exif: bool = False) -> Tensor:
    """A PIL image -> [3, H, W] float32 RGB in [0, 1] (the rules of :mod:`ovss_fast.pipeline.image_io`)."""
    return _image.to_float(_image.decode(im, exif=exif))


def _float01(name: str, t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.bool or not t.is_floating_point():
        raise InputTypeError(f"{name} has dtype {t.dtype}; expected uint8 (0-255) or floating point (0-1)")
    t = t.detach().float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or Inf values")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise InputError(
            f"{name} values must lie in [0, 1] for floating point images, got min {float(t.min()):g} "
            f"and max {float(t.max()):g} (an 8-bit image wants /255, or pass it as uint8)"
        )
    return t


def _check_size(name: str, t: Tensor) -> Tensor:
    if t.shape[-1] == 0 or t.shape[-2] == 0 or t.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def as_image_batches(image: ImageLike) -> tuple[list[Tensor], str]:
    """Any accepted image input -> (list of [B, 3, H, W] float32 tensors in [0, 1], kind).

    Tensors stay on their device; files, PIL images and arrays come in on the CPU.

    kind "single" (one image -> labels [H, W]), "batch" (a [B, ...] tensor or array ->
    [B, H, W]) or "list" (a list -> a list of [H, W], sizes may differ).

    Accepted: a PIL image; a path to an image file; a numpy array [H, W], [H, W, 3],
    [H, W, 4] (alpha composited on black) or [B, H, W, 3]; a tensor [3, H, W] or [B, 3, H, W];
    uint8 (0-255) or float (0-1); a list of any of these.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("image is an empty list; give at least one image")
        out = []
        for i, im in enumerate(image):
            batches, kind = as_image_batches(im)
            if kind != "single":
                raise InputError(f"image[{i}] is a batch; a list must hold single images")
            out.extend(batches)
        return out, "list"
    if isinstance(image, (str, os.PathLike)):
        return [load_image(image)[None]], "single"
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return [pil_to_tensor(image)[None]], "single"
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim == 3 and arr.shape[-1] == 4:  # alpha composited on black, as for files
            scale = 255.0 if arr.dtype == np.uint8 else 1.0
            rgb = arr[..., :3].astype(np.float32) * (arr[..., 3:].astype(np.float32) / np.float32(scale))
            arr = np.rint(rgb).astype(np.uint8) if arr.dtype == np.uint8 else rgb
        if arr.ndim == 3 and arr.shape[-1] == 3:
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
            return [_check_size("image", _float01("image", t))], "single"
        if arr.ndim == 4 and arr.shape[-1] == 3:
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
            return [_check_size("image", _float01("image", t))], "batch"
        raise InputError(
            f"image as a numpy array must be [H, W], [H, W, 3], [H, W, 4] or [B, H, W, 3] (channels last), "
            f"got shape {arr.shape}"
        )
    if isinstance(image, Tensor):
        if image.dim() == 3 and image.shape[0] == 3:
            return [_check_size("image", _float01("image", image)[None])], "single"
        if image.dim() == 4 and image.shape[1] == 3:
            return [_check_size("image", _float01("image", image))], "batch"
        raise InputError(
            f"image as a tensor must be [3, H, W] or [B, 3, H, W] (channels first), got shape {tuple(image.shape)}"
        )
    raise InputTypeError(
        f"image must be a PIL image, a numpy array, a tensor, a file path or a list of these; "
        f"got {type(image).__name__}"
    )


def map_by_size(image: ImageLike, guide: ImageLike | None,
                fn: Callable[[Tensor, Tensor, tuple[int, ...]], tuple[Tensor | None, ...]],
                device: torch.device) -> tuple[Tensor | list[Tensor] | None, ...]:
    """fn(images [B, 3, H, W], guides [B, 3, H', W'], indices) -> outputs [B, ...] (a tuple; an entry may
    be None), over any accepted input, each output shaped as the input came.

    Images of one size (and guide size) go through ``fn`` together on ``device`` (a list's entries
    are grouped by size, order kept); ``indices`` are those images' positions in the input (0 for a
    single image). guide: one guide image per image, the same kind (default: the images themselves).
    Per output: [...] for a single image, [B, ...] for a batch, a list for a list (None stays None).
    """
    batches, kind = as_image_batches(image)
    guides = None
    if guide is not None:
        guides, gkind = as_image_batches(guide)
        if gkind != kind or [g.shape[0] for g in guides] != [b.shape[0] for b in batches]:
            raise InputError("guide must match image: one guide image per image (the same kind: single, batch "
                             "or list of the same length)")
    by_size: dict[tuple, list[int]] = {}
    for i, b in enumerate(batches):
        key = tuple(b.shape[-2:]) + (() if guides is None else tuple(guides[i].shape[-2:]))
        by_size.setdefault(key, []).append(i)
    results: list[list[Tensor | None]] = []  # per output, per batch

    def joined(ts: list[Tensor], members: list[int]) -> Tensor:
        parts = [ts[i].to(device) for i in members]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    for members in by_size.values():
        img = joined(batches, members)
        indices = tuple(members) if kind == "list" else tuple(range(img.shape[0]))
        outs = fn(img, img if guides is None else joined(guides, members), indices)
        if not results:
            results = [[None] * len(batches) for _ in outs]
        for k, out in enumerate(outs):
            if out is None:
                continue
            for i, o in zip(members, out.split([batches[i].shape[0] for i in members]), strict=True):
                results[k][i] = o

    def shaped(per_batch: list[Tensor | None]) -> Tensor | list[Tensor] | None:
        if per_batch[0] is None:
            return None
        if kind == "single":
            return per_batch[0][0]
        if kind == "batch":
            return per_batch[0]
        return [o[0] for o in per_batch]

    return tuple(shaped(r) for r in results)


__all__ = ["ImageLike", "as_image_batches", "load_image", "map_by_size", "pil_to_tensor"]
