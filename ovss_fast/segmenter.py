"""``Segmenter``: open-vocabulary segmentation of images with CLIP (open_clip or transformers) and the DSLO head.

Pipeline for one image (method.md sections 1-4 on CLIP):

    image [3, H, W] in [0, 1]
      -> resized so both sides are multiples of the patch size P (optionally to a
         given shorter side), giving a low-resolution patch grid (gh, gw)
      -> windows of (wh, ww) patches every (sh, sw) patches (one window when none is given);
         all windows of all images of one size, chunked to fit memory_budget, as one batch of
         M crops: CLIP patch features [M, n, D] and affinity [M, n, n] (n = wh * ww),
         class distributions Q over synonym-expanded names, discrepancy scores [M, n, S]
      -> overlapping windows' scores scatter-added onto the (gh, gw) grid and averaged
      -> class score = max over its synonyms' scores                      [B, C, gh, gw]
      -> joint bilateral upsampling to (H, W) guided by the full-resolution image, argmax

Synonyms: Q is computed over all synonyms of all classes (each synonym is a column
of the softmax and a distribution over patches), discrepancy scores are computed per
synonym, and a class's score is the maximum over its synonyms' scores; this is done
on the low-resolution grid, before upsampling.

Windows: every window has the same patch count (the last window in a row or
column is shifted back to end at the border), so the discrepancy scores of
different windows, whose scale depends on n, share one scale; overlapping scores
are averaged unweighted (mmseg's sliding-window convention).

Variants (keywords of :class:`Segmenter`): ``features`` picks the last ViT block of
MaskCLIP / SCLIP / ClearCLIP / NACLIP instead of plain CLIP's; ``head="logits"``
replaces the discrepancy scores by the peers' class probabilities softmax(scale * cos);
``bg_threshold`` turns low-probability pixels into class 0; ``aggregation="pixels"``
replaces the grid averaging and JBU by the peers' bilinear slide inference (each
window's maps upsampled to its pixels and averaged, bilinear to the output).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _image
from . import _validate as check
from ._backends import BACKENDS
from .affinity import BUILTIN, AffinityFn, build_affinity, check_affinity
from .clip_features import (
    DenseCLIP,
    check_features,
    check_pos_interp,
    default_templates,
    normalise,
    parse_class_names,
    preprocess_stats,
    text_embeddings,
)
from .models import (  # noqa: F401  (re-exported: these lived here before ovss_fast.models)
    _CHECKPOINT_SUFFIXES,
    _build_from_schema,
    _default_tokenizer,
    _looks_like_path,
    build_open_clip,
    load_model,
    wrap_model,
)
from .ops import class_distributions, discrepancy, jbu_argmax, jbu_upsample

ImageLike = Any  # PIL.Image.Image | np.ndarray | Tensor | str | os.PathLike, or a list of them

#: float32 [heads, T, T] tensors alive in the last block per feature preset's attention (the q-k
#: attention for the affinity included): scores + probabilities, plus a second pair for "qq+kk".
_LAST_BLOCK_TENSORS = {"qk": 2, "qq+kk": 4, "qq": 3, "kk+gauss": 3, "identity": 2}
#: Default budget for one chunk of windows (see ``Segmenter.memory_estimate``).
DEFAULT_MEMORY_BUDGET = 4 * 2**30


# --------------------------------------------------------------------------- images
def load_image(path: str | os.PathLike, *, exif: bool = True) -> Tensor:
    """Read an image file -> [3, H, W] float32 RGB in [0, 1]; clear errors for missing or corrupt files.

    Decoding follows :mod:`ovss_fast._image` (16-bit scaled, alpha composited on black);
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
        raise ValueError(
            f"could not read image file {path!r} ({exc.__class__.__name__}: {exc}); is it a complete "
            "PNG/JPEG/... image?"
        ) from None


def pil_to_tensor(im: Any, *, exif: bool = False) -> Tensor:
    """A PIL image -> [3, H, W] float32 RGB in [0, 1] (the rules of :mod:`ovss_fast._image`)."""
    return _image.to_float(_image.decode(im, exif=exif))


def _float01(name: str, t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.bool or not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected uint8 (0-255) or floating point (0-1)")
    t = t.detach().float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(
            f"{name} values must lie in [0, 1] for floating point images, got min {float(t.min()):g} "
            f"and max {float(t.max()):g} (an 8-bit image wants /255, or pass it as uint8)"
        )
    return t


def _check_size(name: str, t: Tensor) -> Tensor:
    if t.shape[-1] == 0 or t.shape[-2] == 0 or t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
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
            raise ValueError("image is an empty list; give at least one image")
        out = []
        for i, im in enumerate(image):
            batches, kind = as_image_batches(im)
            if kind != "single":
                raise ValueError(f"image[{i}] is a batch; a list must hold single images")
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
        raise ValueError(
            f"image as a numpy array must be [H, W], [H, W, 3], [H, W, 4] or [B, H, W, 3] (channels last), "
            f"got shape {arr.shape}"
        )
    if isinstance(image, Tensor):
        if image.dim() == 3 and image.shape[0] == 3:
            return [_check_size("image", _float01("image", image)[None])], "single"
        if image.dim() == 4 and image.shape[1] == 3:
            return [_check_size("image", _float01("image", image))], "batch"
        raise ValueError(
            f"image as a tensor must be [3, H, W] or [B, 3, H, W] (channels first), got shape {tuple(image.shape)}"
        )
    raise TypeError(
        f"image must be a PIL image, a numpy array, a tensor, a file path or a list of these; "
        f"got {type(image).__name__}"
    )


# --------------------------------------------------------------------------- windows
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` cells every ``stride`` cells covering ``size`` cells.

    The last window is shifted back to end at the border, so every window has the
    same size (when size >= window) and every cell is covered.
    """
    if window >= size:
        return [0]
    starts = list(range(0, size - window, stride))
    starts.append(size - window)
    return starts


@dataclass(frozen=True)
class WindowLayout:
    """The sliding windows of one patch grid, as index tensors (no Python loop per window downstream).

    grid (gh, gw) and cells (wh, ww) in patches; starts [nw, 2] the (row, column) of each
    window's top-left patch, row-major; cell_index [nw, n] each window patch's flat grid
    index y * gw + x (n = wh * ww, row-major in the window, as the features' patch order);
    count [gh * gw] float32, how many windows cover each cell (>= 1 everywhere).
    """

    grid: tuple[int, int]
    cells: tuple[int, int]
    starts: Tensor
    cell_index: Tensor
    count: Tensor

    @classmethod
    def build(cls, grid: tuple[int, int], cells: tuple[int, int], stride: tuple[int, int],
              device: torch.device | str = "cpu") -> WindowLayout:
        (gh, gw), (wh, ww) = grid, cells
        ys = torch.tensor(window_starts(gh, wh, stride[0]), dtype=torch.long)
        xs = torch.tensor(window_starts(gw, ww, stride[1]), dtype=torch.long)
        starts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [nw, 2]
        rows = starts[:, :1, None] + torch.arange(wh).view(1, wh, 1)  # [nw, wh, 1]
        cols = starts[:, 1:, None] + torch.arange(ww).view(1, 1, ww)  # [nw, 1, ww]
        cell_index = (rows * gw + cols).reshape(len(starts), wh * ww)  # [nw, n]
        count = torch.bincount(cell_index.reshape(-1), minlength=gh * gw).float()
        return cls((gh, gw), (wh, ww), starts.to(device), cell_index.to(device), count.to(device))

    @property
    def num_windows(self) -> int:
        return int(self.starts.shape[0])

    def flat_index(self, items: Tensor) -> Tensor:
        """items [M] (image b, window w) pairs numbered b * nw + w -> [M, n] rows of a [B * gh * gw, S] grid."""
        nw = self.num_windows
        return (items // nw)[:, None] * (self.grid[0] * self.grid[1]) + self.cell_index[items % nw]

    def gather(self, x01: Tensor, items: Tensor, patch: tuple[int, int]) -> Tensor:
        """The crops of ``items`` from x01 [B, 3, gh * ph, gw * pw] -> [M, 3, wh * ph, ww * pw] (one gather)."""
        (wh, ww), (ph, pw), nw = self.cells, patch, self.num_windows
        if nw == 1 and self.cells == self.grid:
            return x01[items]  # one window covering the grid: the images themselves
        start = self.starts[items % nw]  # [M, 2] in patches
        rows = start[:, :1] * ph + torch.arange(wh * ph, device=x01.device)  # [M, wh * ph]
        cols = start[:, 1:] * pw + torch.arange(ww * pw, device=x01.device)  # [M, ww * pw]
        img = (items // nw)[:, None, None]
        crops = x01.permute(0, 2, 3, 1)[img, rows[:, :, None], cols[:, None, :]]  # [M, wh * ph, ww * pw, 3]
        return crops.permute(0, 3, 1, 2).contiguous()


def _pair(name: str, value: object, patch: tuple[int, int]) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints (height, width) in pixels, got {value!r}")
    out = []
    for v, p in zip(value, patch, strict=True):
        v = int(v)
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if v % p:
            lo, hi = max(p, v // p * p), (v // p + 1) * p
            raise ValueError(f"{name}={v} is not a multiple of the patch size {p}; use {lo} or {hi}")
        out.append(v // p)
    return out[0], out[1]


# --------------------------------------------------------------------------- Segmenter
class Segmenter:
    """Open-vocabulary segmentation: CLIP dense features + an affinity + the DSLO head (or the peers' logits).

    ``Segmenter(model="ViT-B-16", pretrained="openai", affinity="clip", mode="mv")``

    model: an open_clip model name (``open_clip.list_models()``), an open_clip
    'local-dir:/folder' (open_clip_config.json + weights) or 'hf-hub:org/repo' name
    (``pretrained`` is then ignored), a HuggingFace transformers CLIP as
    'hf:openai/clip-vit-base-patch16' (downloaded by transformers when online) or
    'hf:/path/to/folder' (a save_pretrained folder; ``pip install 'ovss_fast[hf]'``),
    or an already-built open_clip or transformers CLIP model (nn.Module; then pass
    ``tokenizer`` too, or use :meth:`from_model`). See :mod:`ovss_fast.models`.
    pretrained: an open_clip tag (downloaded by open_clip when online), a local
    checkpoint path, or None (random weights, for tests; warns).
    affinity: "clip" (last-block self-attention, no extra weights), "sd2" (Stable
    Diffusion 2 self-attention, ``pip install 'ovss_fast[sd]'``), "dino" (timm DINO
    ViT), or a callable ``(image [B, 3, H, W] in [0, 1], grid (h, w)) -> [B, N, N]``;
    ``affinity_weights`` is the local weights path for "sd2"/"dino".
    mode: "mv", "op" or "kl" (method.md section 3). device: default CUDA if available;
    dtype: default float16 on CUDA, float32 on CPU (the model's; the DSLO ops run in
    float32). window / stride: sliding windows in pixels (int or (h, w), multiples of
    the patch size; stride defaults to half the window); None processes the whole
    image as one window. resize: shorter side in pixels the image is resized to
    before windowing (None: native size, rounded to the patch size).
    features: the dense-feature preset, "clip" (plain patch tokens, the paper's),
    "maskclip", "sclip", "clearclip" or "naclip", each as its method publishes it
    (:data:`~ovss_fast.clip_features.FEATURE_PRESETS`). pos_interp: "size" (default) or
    "peers" (the peers' ``scale_factor=(g + 0.1) / g0`` positional interpolation).
    head: "dslo" (the discrepancy scores, default) or "logits" (the peers' plain
    argmax of softmax(scale * cos) over synonyms, max over a class's synonyms; no
    affinity is computed). bg_threshold: None (default, off) or the peers' prob_thd:
    pixels whose highest class probability (softmax over synonyms of scale * cos, max
    over a class's synonyms, brought to pixels by the same upsampling as the scores)
    is below it become class 0, so the first class must be the background.
    aggregation: "grid" (default: overlapping windows averaged on the patch grid, then
    joint bilateral upsampling) or "pixels" (the peers': each window's maps upsampled
    bilinearly to its pixels, averaged where windows overlap, then bilinear to the
    output; the image is not snapped to whole patches, and crops that are not whole
    patches follow ``crop``: "floor" or "pad"). antialias: whether internal resizes
    (to whole patches, to ``resize``) antialias. templates: prompt templates
    (callables or "{}" format strings; default open_clip's 80 OpenAI ImageNet ones).
    memory_budget: bytes allowed for one chunk of windows going through together
    (visual-tower activations and N x N tensors, :meth:`memory_estimate`); windows
    are chunked to fit it, and when even one window does not fit, a ValueError says
    which window to use. batch_windows: True (default) sends all windows of the
    images of one size through the tower and the head in a few batched calls;
    False runs one window at a time (the older path, kept for comparison).
    Remaining keywords (scale, nms, eps, iters, sk_iters, steps, readout, tau,
    sigma_spatial, sigma_range, radius, backend) go to the ops of :mod:`ovss_fast.ops`.
    """

    def __init__(
        self,
        model: str | nn.Module = "ViT-B-16",
        pretrained: str | os.PathLike | None = "openai",
        affinity: str | AffinityFn = "clip",
        mode: str = "mv",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        window: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] | None = None,
        *,
        features: str = "clip",
        pos_interp: str = "size",
        head: str = "dslo",
        bg_threshold: float | None = None,
        aggregation: str = "grid",
        crop: str = "floor",
        antialias: bool = True,
        resize: int | None = None,
        tokenizer: Callable | None = None,
        templates: Sequence[str | Callable[[str], str]] | None = None,
        affinity_weights: str | os.PathLike | None = None,
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        batch_windows: bool = True,
        cache_dir: str | None = None,
        backend: str = "auto",
        scale: float = 100.0,
        nms: float = 0.0,
        eps: float = 0.1,
        iters: int = 50,
        sk_iters: int = 15,
        steps: int = 50,
        readout: str = "integrated",
        tau: float = 0.3,
        sigma_spatial: float = 1.0,
        sigma_range: float = 0.1,
        radius: int = 2,
    ) -> None:
        check.choice("mode", mode, check.MODES)
        check.choice("backend", backend, ("auto", *BACKENDS))  # before the model is built and the text embedded
        check_features(features)
        check_pos_interp(pos_interp)
        self.head = check.choice("head", head, check.HEADS)
        self.bg_threshold = check.threshold("bg_threshold", bg_threshold)
        self.aggregation = check.choice("aggregation", aggregation, check.AGGREGATIONS)
        self.crop = check.choice("crop", crop, check.CROPS)
        self.antialias = check.flag("antialias", antialias)
        if not callable(affinity):
            check.choice("affinity", affinity, BUILTIN)
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
        self.op_params: dict[str, Any] = {
            "scale": check.positive("scale", scale), "nms": check.nms_ratio(nms), "eps": check.positive("eps", eps),
            "iters": check.count("iters", iters, minimum=1),
            "sk_iters": check.count("sk_iters", sk_iters, minimum=1, why=check.SK_ITERS_WHY),
            "steps": check.count("steps", steps, minimum=1),
            "readout": check.choice("readout", readout, check.READOUTS),
            "tau": check.positive("tau", tau),
        }
        self.jbu_params: dict[str, Any] = {
            "sigma_spatial": check.positive("sigma_spatial", sigma_spatial),
            "sigma_range": check.positive("sigma_range", sigma_range),
            "radius": check.radius(radius),
        }
        self.mode = mode
        self.backend = backend
        self.memory_budget = check.positive("memory_budget", memory_budget)
        self.batch_windows = check.flag("batch_windows", batch_windows)
        #: optional ``name -> context manager`` that times the pipeline's stages (visual, affinity,
        #: class_distributions, discrepancy, jbu); None (default) times nothing
        self.stage_timer: Callable[[str], AbstractContextManager] | None = None
        if resize is not None:
            resize = check.count("resize", resize, minimum=1)
        self.resize = resize

        if isinstance(model, nn.Module):
            self.dtype = dtype or next(model.parameters()).dtype
            self.model, self.tokenizer, self.model_name = wrap_model(model, tokenizer)
            self.model = self.model.to(self.device).eval()
            if dtype is not None:
                self.model = self.model.to(dtype)
        else:
            self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
            self.model, self.tokenizer, self.model_name = load_model(
                model, pretrained, device=self.device, dtype=self.dtype, cache_dir=cache_dir, tokenizer=tokenizer)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dense = DenseCLIP(self.model.visual, features=features, pos_interp=pos_interp)
        self.pos_interp = pos_interp
        self.features = features
        self.patch = self.dense.patch
        self.mean, self.std = preprocess_stats(self.model)
        self.window = _pair("window", window, self.patch)
        self.stride = _pair("stride", stride, self.patch)
        if self.stride is not None and self.window is None:
            raise ValueError("stride is given without window; pass window too (stride is the step between windows)")
        if self.window is not None and self.stride is None:
            self.stride = (max(1, self.window[0] // 2), max(1, self.window[1] // 2))
        if self.window is not None and (self.stride[0] > self.window[0] or self.stride[1] > self.window[1]):
            raise ValueError(
                f"stride {self._px(self.stride)} is larger than window {self._px(self.window)}: it would leave "
                "gaps; use stride <= window"
            )
        self.templates = tuple(templates) if templates is not None else default_templates()
        if not self.templates:
            raise ValueError("templates is empty: give at least one prompt template such as '{}'")
        self.affinity_name = affinity if isinstance(affinity, str) else getattr(affinity, "__name__", "callable")
        self.affinity_fn = build_affinity(
            affinity, weights=None if affinity_weights is None else os.fspath(affinity_weights),
            device=self.device, dtype=self.dtype) if mode != "kl" and head == "dslo" else None
        self._text_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Callable | None = None, **kwargs: Any) -> Segmenter:
        """A Segmenter on an already-built model and its tokenizer: an open_clip CLIP model (tokenizer
        optional) or a transformers ``CLIPModel`` (with its tokenizer, e.g. ``CLIPTokenizer``, or an
        open_clip tokenizer of the same vocabulary)."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    def __repr__(self) -> str:
        win = "whole image" if self.window is None else f"{self._px(self.window)} / {self._px(self.stride)}"
        return (f"Segmenter(model={self.model_name!r}, affinity={self.affinity_name!r}, mode={self.mode!r}, "
                f"features={self.features!r}, head={self.head!r}, bg_threshold={self.bg_threshold!r}, "
                f"aggregation={self.aggregation!r}, window/stride={win}, device={str(self.device)!r}, "
                f"dtype={self.dtype})")

    def _px(self, cells: tuple[int, int]) -> str:
        h, w = cells[0] * self.patch[0], cells[1] * self.patch[1]
        return str(h) if h == w else f"({h}, {w})"

    # ----------------------------------------------------------------------- text
    def text_features(self, class_names: str | Sequence[str]) -> tuple[Tensor, list[list[int]]]:
        """Embeddings of every synonym [S, D] (float32, unit norm) and, per class, its rows.

        Cached per class list (the 16 most recent lists).
        """
        classes = parse_class_names(class_names)
        key = tuple(tuple(c) for c in classes)
        groups, i = [], 0
        for c in classes:
            groups.append(list(range(i, i + len(c))))
            i += len(c)
        cached = self._text_cache.get(key)
        if cached is None:
            names = [s for c in classes for s in c]
            cached = text_embeddings(self.model, self.tokenizer, names, self.templates, device=self.device)
            self._text_cache[key] = cached
            while len(self._text_cache) > 16:
                self._text_cache.popitem(last=False)
        else:
            self._text_cache.move_to_end(key)
        return cached, groups

    # ----------------------------------------------------------------------- geometry and memory
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Low-resolution patch grid (gh, gw) of an image of height x width pixels."""
        if self.resize is not None:
            s = self.resize / min(height, width)
            height, width = height * s, width * s
        return (max(1, round(height / self.patch[0])), max(1, round(width / self.patch[1])))

    def _window_cells(self, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.window is None:
            return grid, grid
        return (min(self.window[0], grid[0]), min(self.window[1], grid[1])), self.stride

    def memory_estimate(self, height: int, width: int, batch: int = 1, synonyms: int = 0) -> int:
        """Bytes alive while ``batch`` windows of an image of height x width go through together.

        Per window (n = wh * ww patches, T = n + 1 tokens, width W, heads h, e bytes per
        element of the visual tower's dtype, S = ``synonyms`` columns), the sum of:

        - visual tower, one block alive at a time (inference keeps no earlier layer):
          12 x T x W x e (the residual stream in and out, its layer norm, the MLP's 4W
          hidden layer and its activation at the MLP's peak) and 2 x h x T x T x e (one
          block's attention scores and probabilities);
        - the last block, which DenseCLIP runs itself in float32: 2 x h x T x T x 4
          (scores and probabilities; up to 4 for the feature presets, see
          ``_LAST_BLOCK_TENSORS``) and the head-averaged
          attention n x n x 4;
        - the DSLO head for "op"/"mv": 6 float32 [n, n] (affinity, its symmetrised form,
          cost, Gibbs kernel, and two for the transition or Sinkhorn temporaries); none for "kl";
        - 8 float32 [n, S] (logits, softmax, Q, the scaling vectors or chain state, products, scores);
        - an affinity source's own ``memory_per_crop((wh, ww))`` when it has one ("sd2" and
          "dino" do: rough estimates of their models' activations; a callable without it counts 0).

        The image itself, the accumulated [B, S, gh, gw] scores and model weights are not counted.
        """
        (wh, ww), _ = self._window_cells(self.grid_for(height, width))
        return int(batch) * self._window_bytes((wh, ww), int(synonyms))

    def _window_bytes(self, cells: tuple[int, int], synonyms: int) -> int:
        """Bytes of one window of (wh, ww) patches (see :meth:`memory_estimate`)."""
        n = cells[0] * cells[1]
        t = n + 1
        e = self.dense.dtype.itemsize
        width, heads = self.dense.tower.conv.out_channels, self.dense.heads
        last = _LAST_BLOCK_TENSORS[self.dense.preset.attention]
        tower = 12 * t * width * e + 2 * heads * t * t * e
        tower += last * heads * t * t * 4 + n * n * 4
        head = (0 if self.mode == "kl" else 6) * n * n * 4 + 8 * n * synonyms * 4
        return tower + head + self._affinity_bytes(cells)

    def _affinity_bytes(self, cells: tuple[int, int]) -> int:
        """An affinity source's ``memory_per_crop(cells)`` (0 for "clip", "kl" and callables without one)."""
        per_crop = getattr(self.affinity_fn, "memory_per_crop", None)
        return 0 if per_crop is None else int(per_crop(cells))

    def _windows_per_chunk(self, height: int, width: int, synonyms: int) -> int:
        """How many windows go through together so a chunk fits ``memory_budget``; raises if one does not."""
        (wh, ww), _ = self._window_cells(self.grid_for(height, width))
        one = self._window_bytes((wh, ww), synonyms)
        if one > self.memory_budget:
            self._refuse(height, width, 1, synonyms)
        return max(1, int(self.memory_budget // one))

    def _check_memory(self, height: int, width: int, batch: int, synonyms: int = 0) -> None:
        """The per-window path holds ``batch`` windows (one per image) at once: refuse when they do not fit."""
        if self.memory_estimate(height, width, batch, synonyms) > self.memory_budget:
            self._refuse(height, width, batch, synonyms)

    def _refuse(self, height: int, width: int, batch: int, synonyms: int) -> None:
        need = self.memory_estimate(height, width, batch, synonyms)
        grid = self.grid_for(height, width)
        (wh, ww), _ = self._window_cells(grid)
        side = 0  # the largest square window (in patches) whose batch fits
        while side < 4096 and batch * self._window_bytes((side + 1, side + 1), synonyms) <= self.memory_budget:
            side += 1
        what = "as one window" if self.window is None else f"with window {self._px(self.window)}"
        msg = (
            f"segmenting a {height}x{width} image {what} (a {wh}x{ww} patch window, N = {wh * ww}, batch {batch}) "
            f"needs about {need / 2**30:.2f} GiB (visual tower activations and N x N tensors, see "
            f"Segmenter.memory_estimate), over memory_budget = {self.memory_budget / 2**30:.2f} GiB; "
        )
        if side >= 1:
            win = side * self.patch[0]
            msg += (f"pass window={win}, stride={max(1, side // 2) * self.patch[0]} "
                    f"(--window {win} --stride {max(1, side // 2) * self.patch[0]} on the command line)")
            if batch > 1:
                msg += ", or fewer images at once"
            msg += ", or raise memory_budget"
        else:
            msg += "even one patch does not fit: raise memory_budget or pass fewer images at once"
        raise ValueError(msg)

    # ----------------------------------------------------------------------- the pipeline
    def _stage(self, name: str) -> AbstractContextManager:
        """Context for one pipeline stage; ``stage_timer`` (e.g. bench/bench_pipeline.py's) times it."""
        return nullcontext() if self.stage_timer is None else self.stage_timer(name)

    def _on_grid(self, img: Tensor) -> Tensor:
        """img [B, 3, H, W] -> resized to whole patches of its patch grid, [B, 3, gh * ph, gw * pw] in [0, 1]."""
        H, W = img.shape[-2:]
        gh, gw = self.grid_for(H, W)
        ph, pw = self.patch
        if (gh * ph, gw * pw) == (H, W):
            return img
        return F.interpolate(img, size=(gh * ph, gw * pw), mode="bilinear", align_corners=False,
                             antialias=self.antialias).clamp(0, 1)

    def window_layout(self, grid: tuple[int, int], device: torch.device | str = "cpu") -> WindowLayout:
        """The windows of a (gh, gw) patch grid: their starts, patch indices and coverage counts."""
        cells, stride = self._window_cells(grid)
        return WindowLayout.build(grid, cells, stride, device)

    def _window_features(self, crops01: Tensor) -> tuple[Tensor, Tensor | None]:
        """crops01 [M, 3, wh * ph, ww * pw] in [0, 1] -> (feats [M, n, D] float32, affinity [M, n, n] or None).

        One forward of the visual tower for all M windows; the affinity source is called
        once with the whole batch (None for mode "kl").
        """
        M = crops01.shape[0]
        grid = (crops01.shape[-2] // self.patch[0], crops01.shape[-1] // self.patch[1])
        need_affinity = self.mode != "kl" and self.head == "dslo"
        need_attention = need_affinity and self.affinity_fn is None
        with self._stage("visual"):
            feats, attention = self.dense(normalise(crops01, self.mean, self.std), need_attention=need_attention)
            feats = feats.float()
        if not need_affinity:
            return feats, None
        if self.affinity_fn is None:
            return feats, attention
        with self._stage("affinity"):
            affinity = check_affinity(self.affinity_fn(crops01, grid), grid[0] * grid[1], M,
                                      repr(self.affinity_name))
            return feats, affinity.to(crops01.device)

    def _window_scores(self, feats: Tensor, affinity: Tensor | None, text: Tensor) -> Tensor:
        """The DSLO head on M windows: feats [M, n, D], affinity [M, n, n] | None, text [S, D] -> [M, n, S]."""
        with self._stage("class_distributions"):
            q = class_distributions(feats, text, scale=self.op_params["scale"], nms=self.op_params["nms"],
                                    backend=self.backend)
        with self._stage("discrepancy"):
            return discrepancy(q, affinity, mode=self.mode, eps=self.op_params["eps"],
                               iters=self.op_params["iters"], sk_iters=self.op_params["sk_iters"],
                               steps=self.op_params["steps"], readout=self.op_params["readout"],
                               tau=self.op_params["tau"], backend=self.backend).float()

    def _map_kinds(self) -> tuple[str, ...]:
        """The per-synonym maps each window contributes, in column order: "dslo" (discrepancy scores)
        for the DSLO head, "cos" (cosine to each synonym) for the logits head or the background threshold."""
        kinds = ("dslo",) if self.head == "dslo" else ()
        if self.head == "logits" or self.bg_threshold is not None:
            kinds += ("cos",)
        return kinds

    def _window_maps(self, feats: Tensor, affinity: Tensor | None, text: Tensor) -> Tensor:
        """[M, n, K * S]: the maps of :meth:`_map_kinds` side by side (K of them), per window patch."""
        maps = []
        for kind in self._map_kinds():
            if kind == "dslo":
                maps.append(self._window_scores(feats, affinity, text))
            else:
                maps.append(F.normalize(feats, dim=-1) @ text.t().to(feats.dtype))
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=-1)

    @staticmethod
    def _class_scores(syn: Tensor, groups: list[list[int]]) -> Tensor:
        """Synonym scores [B, S, gh, gw] -> class scores [B, C, gh, gw]: the max over each class's synonyms."""
        return torch.stack([syn[:, g].amax(dim=1) for g in groups], dim=1)

    @torch.no_grad()
    def _grid_scores(self, img: Tensor, text: Tensor, groups: list[list[int]]) -> Tensor:
        """img [B, 3, H, W] in [0, 1] on self.device -> class scores [B, C, gh, gw] (float32).

        The DSLO head's scores, max over synonyms (for head "logits": the class
        probabilities); see :meth:`_grid_maps`.
        """
        return self._class_maps(self._grid_maps(img, text), groups)[0]

    @torch.no_grad()
    def _grid_maps(self, img: Tensor, text: Tensor) -> Tensor:
        """img [B, 3, H, W] in [0, 1] on self.device -> per-synonym maps [B, K * S, gh, gw] (float32).

        All B x nw windows (nw per image, one size) go through in chunks of as many as
        ``memory_budget`` allows: one visual-tower forward, one affinity call, one
        class_distributions and one discrepancy per chunk; each chunk's maps
        (:meth:`_window_maps`) are scatter-added onto the grid (index_add_ with
        precomputed patch indices), then divided by the number of windows covering each
        cell. ``batch_windows=False`` runs the per-window path instead
        (:meth:`_grid_maps_per_window`).
        """
        if not self.batch_windows:
            return self._grid_maps_per_window(img, text)
        B, _, H, W = img.shape
        S = text.shape[0]
        K = len(self._map_kinds()) * S
        chunk = self._windows_per_chunk(H, W, K)
        x01 = self._on_grid(img)
        gh, gw = self.grid_for(H, W)
        layout = self.window_layout((gh, gw), img.device)
        total = B * layout.num_windows
        acc = torch.zeros(B * gh * gw, K, device=img.device, dtype=torch.float32)  # [B * gh * gw, K]
        for start in range(0, total, chunk):
            items = torch.arange(start, min(total, start + chunk), device=img.device)  # (image, window) pairs
            crops01 = layout.gather(x01, items, self.patch)
            feats, affinity = self._window_features(crops01)
            m = self._window_maps(feats, affinity, text)  # [M, n, K]
            acc.index_add_(0, layout.flat_index(items).reshape(-1), m.reshape(-1, K))
        return (acc.view(B, gh * gw, K) / layout.count.view(1, -1, 1)).transpose(1, 2).reshape(B, K, gh, gw)

    @torch.no_grad()
    def _grid_maps_per_window(self, img: Tensor, text: Tensor) -> Tensor:
        """The per-window path: one tower forward and one head call per window (the B images together)."""
        B, _, H, W = img.shape
        K = len(self._map_kinds()) * text.shape[0]
        self._check_memory(H, W, B, K)
        x01 = self._on_grid(img)
        gh, gw = self.grid_for(H, W)
        ph, pw = self.patch
        (wh, ww), (sh, sw) = self._window_cells((gh, gw))
        acc = torch.zeros(B, K, gh, gw, device=img.device, dtype=torch.float32)
        count = torch.zeros(1, 1, gh, gw, device=img.device, dtype=torch.float32)
        for y0 in window_starts(gh, wh, sh):
            for x0 in window_starts(gw, ww, sw):
                crop01 = x01[:, :, y0 * ph:(y0 + wh) * ph, x0 * pw:(x0 + ww) * pw]
                feats, affinity = self._window_features(crop01)
                m = self._window_maps(feats, affinity, text)  # [B, n, K]
                acc[:, :, y0:y0 + wh, x0:x0 + ww] += m.transpose(1, 2).reshape(B, K, wh, ww)
                count[:, :, y0:y0 + wh, x0:x0 + ww] += 1
        return acc / count

    # ----------------------------------------------------------------------- the peers' pixel aggregation
    def _pixel_size(self, height: int, width: int) -> tuple[int, int]:
        """The processed size for aggregation "pixels": ``resize`` on the short side (half up), not snapped."""
        if self.resize is None:
            return height, width
        s = self.resize / min(height, width)
        return max(1, int(height * s + 0.5)), max(1, int(width * s + 0.5))

    def _crop_grid(self, hc: int, wc: int) -> tuple[int, int]:
        ph, pw = self.patch
        if self.crop == "pad":
            return -(-hc // ph), -(-wc // pw)
        if hc < ph or wc < pw:
            raise ValueError(f"a {hc}x{wc} crop is smaller than one {ph}x{pw} patch; use crop='pad' or a larger "
                             "image / resize")
        return hc // ph, wc // pw

    @torch.no_grad()
    def _pixel_maps(self, img: Tensor, text: Tensor) -> Tensor:
        """img [B, 3, H, W] in [0, 1] -> per-synonym maps [B, K * S, h, w] at the processed size (peers' slide
        inference): windows of the window size in pixels every stride pixels (the last shifted back to the
        border), each window's patch maps upsampled bilinearly to the window's pixels and averaged where
        windows overlap."""
        B, _, H, W = img.shape
        h, w = self._pixel_size(H, W)
        x01 = img if (h, w) == (H, W) else F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False,
                                                          antialias=self.antialias).clamp(0, 1)
        ph, pw = self.patch
        if self.window is None:
            (hc, wc), (sy, sx) = (h, w), (h, w)
        else:
            hc, wc = min(self.window[0] * ph, h), min(self.window[1] * pw, w)
            sy, sx = self.stride[0] * ph, self.stride[1] * pw
        fh, fw = self._crop_grid(hc, wc)
        S = text.shape[0]
        K = len(self._map_kinds()) * S
        one = self._window_bytes((fh, fw), K)
        if one > self.memory_budget:
            self._refuse(H, W, 1, K)
        chunk = max(1, int(self.memory_budget // one))
        items = [(b, y, x) for b in range(B) for y in window_starts(h, hc, sy) for x in window_starts(w, wc, sx)]
        acc = torch.zeros(B, K, h, w, device=img.device, dtype=torch.float32)
        count = torch.zeros(1, 1, h, w, device=img.device, dtype=torch.float32)
        mean = torch.tensor(self.mean, device=img.device, dtype=x01.dtype).view(1, 3, 1, 1)
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            crops = torch.stack([x01[b, :, y:y + hc, x:x + wc] for b, y, x in part])  # [M, 3, hc, wc]
            if self.crop == "pad" and (fh * ph, fw * pw) != (hc, wc):
                # pad with the mean colour: zeros once normalised, as the peers pad the normalised image
                padded = mean.expand(len(part), 3, fh * ph, fw * pw).clone()
                padded[:, :, :hc, :wc] = crops
                crops = padded
            else:
                crops = crops[:, :, :fh * ph, :fw * pw]
            feats, affinity = self._window_features(crops)
            m = self._window_maps(feats, affinity, text).transpose(1, 2).reshape(len(part), K, fh, fw)
            if self.crop == "pad":
                m = F.interpolate(m, size=(fh * ph, fw * pw), mode="bilinear", align_corners=False)[:, :, :hc, :wc]
            else:
                m = F.interpolate(m, size=(hc, wc), mode="bilinear", align_corners=False)
            for (b, y, x), mi in zip(part, m, strict=True):
                acc[b, :, y:y + hc, x:x + wc] += mi
                if b == 0:
                    count[:, :, y:y + hc, x:x + wc] += 1
        return acc / count

    # ----------------------------------------------------------------------- maps -> classes -> pixels
    def _class_maps(self, maps: Tensor, groups: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        """Per-synonym maps [B, K * S, ...] -> (class scores [B, C, ...], class probabilities [B, C, ...] or None).

        Scores: the DSLO scores' max over a class's synonyms (head "dslo"), or the class
        probabilities (head "logits"). Probabilities: softmax over all synonyms of
        scale * cos, then the max over a class's synonyms (None unless head "logits" or
        bg_threshold need them).
        """
        kinds = self._map_kinds()
        S = maps.shape[1] // len(kinds)
        probs = None
        if "cos" in kinds:
            cos = maps[:, -S:]
            probs = self._class_scores(torch.softmax(self.op_params["scale"] * cos, dim=1), groups)
        scores = self._class_scores(maps[:, :S], groups) if self.head == "dslo" else probs
        return scores, probs

    def _labels(self, scores: Tensor, probs: Tensor | None) -> Tensor:
        """argmax over classes, with the background threshold applied (class 0 where the best probability is low)."""
        labels = scores.argmax(dim=1)
        if self.bg_threshold is not None:
            labels = labels.masked_fill(probs.amax(dim=1) < self.bg_threshold, 0)
        return labels

    def _finish(self, img: Tensor, guide: Tensor, text: Tensor, groups: list[list[int]], want: str) -> Tensor:
        """img [B, 3, H, W] -> "grid" class scores at the aggregation's resolution, or "scores" / "labels"
        at the guide's size (JBU guided by it for aggregation "grid", bilinear for "pixels")."""
        if self.aggregation == "pixels":
            maps = self._pixel_maps(img, text)
            if want != "grid" and tuple(maps.shape[-2:]) != tuple(guide.shape[-2:]):
                maps = F.interpolate(maps, size=tuple(guide.shape[-2:]), mode="bilinear", align_corners=False)
            scores, probs = self._class_maps(maps, groups)
            return scores if want in ("grid", "scores") else self._labels(scores, probs)
        scores, probs = self._class_maps(self._grid_maps(img, text), groups)
        if want == "grid":
            return scores
        with self._stage("jbu"):
            if want == "labels" and self.bg_threshold is None:
                return jbu_argmax(scores, guide, backend=self.backend, **self.jbu_params)
            up = jbu_upsample(scores, guide, backend=self.backend, **self.jbu_params)
            if want == "scores":
                return up
            if probs is not None and probs is not scores:
                probs = jbu_upsample(probs, guide, backend=self.backend, **self.jbu_params)
            return self._labels(up, up if probs is scores else probs)

    def _run(self, image: ImageLike, class_names: str | Sequence[str], want: str,
             guide: ImageLike | None = None) -> Tensor | list[Tensor]:
        text, groups = self.text_features(class_names)
        text = text.to(self.device)
        batches, kind = as_image_batches(image)
        guides = None
        if guide is not None:
            guides, gkind = as_image_batches(guide)
            if gkind != kind or [g.shape[0] for g in guides] != [b.shape[0] for b in batches]:
                raise ValueError("guide must match image: one guide image per image (the same kind: single, batch "
                                 "or list of the same length)")
        # images of one size go through together (a list's entries are grouped by size, order kept)
        by_size: dict[tuple, list[int]] = {}
        for i, b in enumerate(batches):
            key = tuple(b.shape[-2:]) + (() if guides is None else tuple(guides[i].shape[-2:]))
            by_size.setdefault(key, []).append(i)
        outs: list[Tensor | None] = [None] * len(batches)
        for members in by_size.values():
            parts = [batches[i].to(self.device) for i in members]
            img = parts[0] if len(parts) == 1 else torch.cat(parts)
            if guides is None:
                g = img
            else:
                gparts = [guides[i].to(self.device) for i in members]
                g = gparts[0] if len(gparts) == 1 else torch.cat(gparts)
            out = self._finish(img, g, text, groups, want)
            sizes = [batches[i].shape[0] for i in members]
            for i, o in zip(members, out.split(sizes), strict=True):
                outs[i] = o
        if kind == "single":
            return outs[0][0]
        if kind == "batch":
            return outs[0]
        return [o[0] for o in outs]

    def seg(self, image: ImageLike, class_names: str | Sequence[str], *,
            guide: ImageLike | None = None) -> Tensor | list[Tensor]:
        """Labels: index into ``class_names`` per pixel, int64.

        image: a PIL image, numpy array ([H, W(, 3)] uint8 or float in [0, 1]), tensor
        [3, H, W], or file path -> [H, W]; a batch [B, H, W, 3] array or [B, 3, H, W]
        tensor -> [B, H, W]; a list of images -> a list of [H_i, W_i].
        class_names: one class per entry, synonyms separated by ";" (or one string with
        classes separated by ","). Labels are on ``self.device``.
        guide: the labels' size and JBU guide, when ``image`` is a resized copy (the
        evaluation protocol resizes, then predicts at the annotation's size guided by
        the original image); default the image itself.
        """
        return self._run(image, class_names, "labels", guide)

    __call__ = seg

    def scores(self, image: ImageLike, class_names: str | Sequence[str], *, upsample: bool = True,
               guide: ImageLike | None = None) -> Tensor | list[Tensor]:
        """Class scores (float32; larger means "this pixel is that class") for post-processing.

        upsample=True: joint-bilaterally upsampled to the image, [C, H, W] per image
        (argmax over C gives :meth:`seg`'s labels, ties aside). upsample=False: the
        window-averaged low-resolution scores on the patch grid, [C, gh, gw]. Batches
        and lists as in :meth:`seg`. Scores are on the scale of the chosen mode (head
        "logits": class probabilities). With aggregation "pixels", upsample=False gives
        the maps at the processed image's pixels. guide: as in :meth:`seg`.
        """
        return self._run(image, class_names, "scores" if upsample else "grid", guide)


__all__ = ["Segmenter", "WindowLayout", "as_image_batches", "build_open_clip", "load_image", "window_starts"]
