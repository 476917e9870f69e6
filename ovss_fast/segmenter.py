"""``Segmenter``: open-vocabulary segmentation of images with open_clip and the DSLO head.

Pipeline for one image (method.md sections 1-4 on CLIP):

    image [3, H, W] in [0, 1]
      -> resized so both sides are multiples of the patch size P (optionally to a
         given shorter side), giving a low-resolution patch grid (gh, gw)
      -> windows of (wh, ww) patches every (sh, sw) patches (one window when none is given);
         per window: CLIP patch features [B, n, D] and affinity [B, n, n] (n = wh * ww),
         class distributions Q over synonym-expanded names, discrepancy scores [B, n, S]
      -> overlapping windows' scores averaged on the (gh, gw) grid
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
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
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
    FEATURES,
    TINY_MODEL,
    DenseCLIP,
    default_templates,
    normalise,
    parse_class_names,
    preprocess_stats,
    register_tiny_config,
    text_embeddings,
)
from .ops import class_distributions, discrepancy, jbu_argmax, jbu_upsample

ImageLike = Any  # PIL.Image.Image | np.ndarray | Tensor | str | os.PathLike, or a list of them

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
#: Default budget for the N x N tensors of one window (see ``Segmenter.memory_estimate``).
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


# --------------------------------------------------------------------------- model loading
def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(value)


def build_open_clip(model: str, pretrained: str | os.PathLike | None, *, device: torch.device,
                    dtype: torch.dtype, cache_dir: str | None = None) -> tuple[nn.Module, Callable]:
    """open_clip model (eval mode) and tokenizer, with errors that say what to do."""
    import open_clip

    if not isinstance(model, str):
        raise TypeError(f"model must be an open_clip model name or an nn.Module, got {type(model).__name__}")
    if model == TINY_MODEL:
        register_tiny_config()
    if model.startswith(("local-dir:", "hf-hub:")):
        return _build_from_schema(model, device=device, dtype=dtype, cache_dir=cache_dir)
    names = open_clip.list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"unknown open_clip model {model!r}; {hint}open_clip.list_models() lists the {len(names)} known "
            f"names (e.g. 'ViT-B-16', 'ViT-L-14'); '{TINY_MODEL}' is a tiny config for tests with pretrained=None"
        )
    kwargs: dict[str, Any] = {}
    source = "random"
    if pretrained is not None and os.fspath(pretrained).lower() == "none":
        pretrained = None
    if pretrained is None:
        warnings.warn(
            f"pretrained=None: open_clip model {model!r} has RANDOM weights; its segmentations are meaningless "
            "(use this for tests and smoke runs only)",
            UserWarning,
            stacklevel=3,
        )
    else:
        pretrained = os.fspath(pretrained)
        if _looks_like_path(pretrained):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"pretrained weights file {pretrained!r} not found; pass pretrained='/path/to/checkpoint.pt' "
                    f"(an open_clip or OpenAI checkpoint of {model!r}), an open_clip tag such as 'openai' "
                    "(downloaded by open_clip when online), or None for random weights"
                )
            source = "file"
        else:
            tags = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in tags:
                known = ", ".join(map(repr, tags)) if tags else "none"
                raise ValueError(
                    f"unknown pretrained tag {pretrained!r} for open_clip model {model!r} (known tags: {known}); "
                    "or pass a local checkpoint file as pretrained='/path/to/checkpoint.pt'"
                )
            source = "tag"
            tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
            model_cfg = open_clip.get_model_config(model) or {}
            if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
                kwargs["force_quick_gelu"] = True  # e.g. OpenAI's ViT-B-16 weights were trained with QuickGELU
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    try:
        clip = open_clip.create_model(model, pretrained=pretrained, precision=precision, device=device,
                                      cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # open_clip raises RuntimeError, OSError, KeyError, hub errors ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if source == "tag":
            raise RuntimeError(
                f"could not get open_clip weights {model!r} / {pretrained!r}: {first}. If this machine is offline, "
                "download them once when online (open_clip caches them), or pass a local file: "
                f"pretrained='/path/to/checkpoint.pt' (an open_clip or OpenAI checkpoint of {model!r}; "
                "for OpenAI's own .pt files use the '-quickgelu' model name, e.g. 'ViT-B-16-quickgelu')"
            ) from None
        if source == "file":
            raise RuntimeError(
                f"could not load weights file {pretrained!r} into open_clip model {model!r}: {first}. "
                f"The file must be an open_clip or OpenAI checkpoint (state dict) of {model!r}"
            ) from None
        raise RuntimeError(f"could not build open_clip model {model!r}: {first}") from None
    tokenizer = open_clip.get_tokenizer(model)
    return clip.eval(), tokenizer


def _build_from_schema(model: str, *, device: torch.device, dtype: torch.dtype,
                       cache_dir: str | None) -> tuple[nn.Module, Callable]:
    """open_clip's 'local-dir:/folder' (open_clip_config.json + weights) or 'hf-hub:org/repo' names."""
    import open_clip

    if model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(
                f"model={model!r}: {os.path.join(folder, 'open_clip_config.json')!r} not found; a 'local-dir:' "
                "folder holds open_clip_config.json and the weights (e.g. open_clip_model.safetensors)"
            )
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    try:
        clip = open_clip.create_model(model, precision=precision, device=device, cache_dir=cache_dir,
                                      require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
    except Exception as exc:  # hub, JSON and checkpoint errors of many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RuntimeError(
            f"could not load open_clip model {model!r}: {first}. Offline, pass a folder you downloaded: "
            "model='local-dir:/path/to/folder' (open_clip_config.json and weights), or a built-in name with "
            "pretrained='/path/to/checkpoint.pt'"
        ) from None
    return clip.eval(), tokenizer


def _default_tokenizer(model: nn.Module) -> Callable:
    import open_clip

    return open_clip.SimpleTokenizer(context_length=int(getattr(model, "context_length", 77) or 77))


# --------------------------------------------------------------------------- Segmenter
class Segmenter:
    """Open-vocabulary segmentation: open_clip dense features + an affinity + the DSLO head.

    ``Segmenter(model="ViT-B-16", pretrained="openai", affinity="clip", mode="mv")``

    model: an open_clip model name (``open_clip.list_models()``), an open_clip
    'local-dir:/folder' (open_clip_config.json + weights) or 'hf-hub:org/repo' name
    (``pretrained`` is then ignored), or an already-built open_clip CLIP model
    (nn.Module; then pass ``tokenizer`` too, or use :meth:`from_model`).
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
    features: "clip" (plain patch tokens, the paper's) or "self_self" (see
    :class:`~ovss_fast.clip_features.DenseCLIP`). templates: prompt templates
    (callables or "{}" format strings; default open_clip's 80 OpenAI ImageNet ones).
    memory_budget: bytes allowed for one window's N x N tensors; over it, a
    ValueError says which window to use. Remaining keywords (scale, nms, eps, iters,
    sk_iters, steps, readout, tau, sigma_spatial, sigma_range, radius, backend) go to
    the ops of :mod:`ovss_fast.ops`.
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
        resize: int | None = None,
        tokenizer: Callable | None = None,
        templates: Sequence[str | Callable[[str], str]] | None = None,
        affinity_weights: str | os.PathLike | None = None,
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
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
        check.choice("features", features, FEATURES)
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
        if resize is not None:
            resize = check.count("resize", resize, minimum=1)
        self.resize = resize

        if isinstance(model, nn.Module):
            self.dtype = dtype or next(model.parameters()).dtype
            self.model = model.to(self.device).eval()
            if dtype is not None:
                self.model = self.model.to(dtype)
            self.tokenizer = tokenizer or _default_tokenizer(model)
            self.model_name = type(model).__name__
        else:
            self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
            self.model, tok = build_open_clip(model, pretrained, device=self.device, dtype=self.dtype,
                                              cache_dir=cache_dir)
            self.tokenizer = tokenizer or tok
            self.model_name = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        visual = getattr(self.model, "visual", None)
        if visual is None:
            raise ValueError("model has no .visual image tower; pass an open_clip CLIP model")
        self.dense = DenseCLIP(visual, features=features)
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
            device=self.device, dtype=self.dtype) if mode != "kl" else None
        self._text_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Callable | None = None, **kwargs: Any) -> Segmenter:
        """A Segmenter on an already-built open_clip CLIP model (and its tokenizer)."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    def __repr__(self) -> str:
        win = "whole image" if self.window is None else f"{self._px(self.window)} / {self._px(self.stride)}"
        return (f"Segmenter(model={self.model_name!r}, affinity={self.affinity_name!r}, mode={self.mode!r}, "
                f"features={self.features!r}, window/stride={win}, device={str(self.device)!r}, dtype={self.dtype})")

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

    def memory_estimate(self, height: int, width: int, batch: int = 1) -> int:
        """Bytes of the N x N tensors alive for one window of an image of height x width.

        float32 [B, N, N]: the attention probabilities of CLIP's last block (one per
        head) and, for "op"/"mv", the affinity, cost, kernel and transition (4).
        """
        (wh, ww), _ = self._window_cells(self.grid_for(height, width))
        n = wh * ww
        return int(batch) * n * n * 4 * self._nn_tensors()

    def _nn_tensors(self) -> int:
        return self.dense.heads + (0 if self.mode == "kl" else 4)

    def _check_memory(self, height: int, width: int, batch: int) -> None:
        need = self.memory_estimate(height, width, batch)
        if need <= self.memory_budget:
            return
        grid = self.grid_for(height, width)
        (wh, ww), _ = self._window_cells(grid)
        per_cell2 = batch * 4 * self._nn_tensors()
        side = int((self.memory_budget / per_cell2) ** 0.25)
        what = "as one window" if self.window is None else f"with window {self._px(self.window)}"
        msg = (
            f"segmenting a {height}x{width} image {what} (a {wh}x{ww} patch window, N = {wh * ww}, batch {batch}) "
            f"needs about {need / 2**30:.2f} GiB for its N x N tensors ({self._nn_tensors()} float32 [B, N, N]), "
            f"over memory_budget = {self.memory_budget / 2**30:.2f} GiB; "
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
    @torch.no_grad()
    def _grid_scores(self, img: Tensor, text: Tensor, groups: list[list[int]]) -> Tensor:
        """img [B, 3, H, W] in [0, 1] on self.device -> class scores [B, C, gh, gw] (float32)."""
        B, _, H, W = img.shape
        self._check_memory(H, W, B)
        gh, gw = self.grid_for(H, W)
        ph, pw = self.patch
        x01 = img
        if (gh * ph, gw * pw) != (H, W):
            x01 = F.interpolate(img, size=(gh * ph, gw * pw), mode="bilinear", align_corners=False,
                                antialias=True).clamp(0, 1)
        (wh, ww), (sh, sw) = self._window_cells((gh, gw))
        S = text.shape[0]
        acc = torch.zeros(B, S, gh, gw, device=img.device, dtype=torch.float32)
        count = torch.zeros(1, 1, gh, gw, device=img.device, dtype=torch.float32)
        need_attention = self.mode != "kl" and self.affinity_fn is None
        for y0 in window_starts(gh, wh, sh):
            for x0 in window_starts(gw, ww, sw):
                crop01 = x01[:, :, y0 * ph:(y0 + wh) * ph, x0 * pw:(x0 + ww) * pw]
                feats, attention = self.dense(normalise(crop01, self.mean, self.std), need_attention=need_attention)
                if self.mode == "kl":
                    affinity = None
                elif self.affinity_fn is None:
                    affinity = attention
                else:
                    affinity = check_affinity(self.affinity_fn(crop01, (wh, ww)), wh * ww, B,
                                              repr(self.affinity_name))
                    affinity = affinity.to(img.device)
                q = class_distributions(feats.float(), text, scale=self.op_params["scale"],
                                        nms=self.op_params["nms"], backend=self.backend)
                s = discrepancy(q, affinity, mode=self.mode, eps=self.op_params["eps"],
                                iters=self.op_params["iters"], sk_iters=self.op_params["sk_iters"],
                                steps=self.op_params["steps"], readout=self.op_params["readout"],
                                tau=self.op_params["tau"], backend=self.backend)  # [B, n, S]
                acc[:, :, y0:y0 + wh, x0:x0 + ww] += s.float().transpose(1, 2).reshape(B, S, wh, ww)
                count[:, :, y0:y0 + wh, x0:x0 + ww] += 1
        syn = acc / count
        return torch.stack([syn[:, g].amax(dim=1) for g in groups], dim=1)  # max over synonyms

    def _run(self, image: ImageLike, class_names: str | Sequence[str], want: str) -> Tensor | list[Tensor]:
        text, groups = self.text_features(class_names)
        batches, kind = as_image_batches(image)
        outs = []
        for b in batches:
            img = b.to(self.device)
            scores = self._grid_scores(img, text.to(self.device), groups)
            if want == "grid":
                outs.append(scores)
            elif want == "scores":
                outs.append(jbu_upsample(scores, img, backend=self.backend, **self.jbu_params))
            else:
                outs.append(jbu_argmax(scores, img, backend=self.backend, **self.jbu_params))
        if kind == "single":
            return outs[0][0]
        if kind == "batch":
            return outs[0]
        return [o[0] for o in outs]

    def seg(self, image: ImageLike, class_names: str | Sequence[str]) -> Tensor | list[Tensor]:
        """Labels: index into ``class_names`` per pixel, int64.

        image: a PIL image, numpy array ([H, W(, 3)] uint8 or float in [0, 1]), tensor
        [3, H, W], or file path -> [H, W]; a batch [B, H, W, 3] array or [B, 3, H, W]
        tensor -> [B, H, W]; a list of images -> a list of [H_i, W_i].
        class_names: one class per entry, synonyms separated by ";" (or one string with
        classes separated by ","). Labels are on ``self.device``.
        """
        return self._run(image, class_names, "labels")

    __call__ = seg

    def scores(self, image: ImageLike, class_names: str | Sequence[str], *,
               upsample: bool = True) -> Tensor | list[Tensor]:
        """Class scores (float32; larger means "this pixel is that class") for post-processing.

        upsample=True: joint-bilaterally upsampled to the image, [C, H, W] per image
        (argmax over C gives :meth:`seg`'s labels, ties aside). upsample=False: the
        window-averaged low-resolution scores on the patch grid, [C, gh, gw]. Batches
        and lists as in :meth:`seg`. Scores are on the scale of the chosen mode.
        """
        return self._run(image, class_names, "scores" if upsample else "grid")


__all__ = ["Segmenter", "as_image_batches", "build_open_clip", "load_image", "window_starts"]
