"""``Segmenter``: open-vocabulary segmentation of images with CLIP (open_clip or transformers) and the DSLO head.

Pipeline for one image (method.md sections 1-4 on CLIP), and the module of each part:

    image [3, H, W] in [0, 1]                                              image_inputs
      -> resized to whole patches (optionally to a given shorter side): patch grid (gh, gw)
      -> windows of (wh, ww) patches every (sh, sw) (one window when none is given),
         chunked to fit memory_budget                                          windows
      -> per chunk of M crops: patch features [M, n, D] and affinity [M, n, n]
                                                    models, clip_features, affinity
      -> per synonym of the class names: Q and discrepancy scores [M, n, S]
                                                     vocabulary, head_maps, options, ops
      -> windows' scores averaged on the grid, class score = max over its synonyms
      -> joint bilateral upsampling to (H, W) guided by the full-resolution image, argmax
         (refine "bilinear": the per-synonym maps bilinear to (H, W); "pamr": then PAMR, NACLIP's tail;
         "lposs+": bilinear to the processed image, LPOSS+'s pixel stage on it, then bilinear to (H, W))

Head "lposs" (LPOSS's patch stage) replaces the per-window head: each window hands its raw cosines and
the affinity source's patch features, and label propagation runs over all windows of an image as one
graph before the windows are aggregated (windows, head_maps).

One call, one result: :meth:`Segmenter.predict` returns a :class:`~ovss_fast.pipeline.prediction.Prediction`
(labels, scores, timings, fallbacks, the options used); :meth:`Segmenter.seg` and :meth:`Segmenter.scores`
are views of it. What a call collects (stage timings, window fallbacks) goes into its own
:class:`~ovss_fast.pipeline.prediction.RunRecord`, passed down; nothing on the shared Segmenter changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovss_fast.errors import InputError
from ovss_fast.kernels.dispatch import BACKENDS
from ovss_fast.models.affinity import (
    BUILTIN,
    DINO_DEFAULT,
    LPOSS_DINO,
    AffinityFn,
    build_affinity,
    check_affinity,
    check_patch_features,
    patch_features_of,
)
from ovss_fast.models.clip_features import (
    DenseCLIP,
    check_features,
    check_pos_interp,
    normalise,
    parse_class_names,
    preprocess_stats,
)
from ovss_fast.models.loading import (
    build_open_clip,
    load_frozen,
)
from ovss_fast.ops import validate as check
from ovss_fast.ops.api import jbu_argmax, jbu_upsample, refine_lposs_plus, refine_scores
from ovss_fast.pipeline.head_maps import HeadMaps
from ovss_fast.pipeline.image_inputs import (
    ImageLike,
    as_image_batches,
    load_image,
    map_by_size,
)  # noqa: F401
from ovss_fast.pipeline.prediction import Prediction, RunRecord
from ovss_fast.pipeline.presets import resolve_preset
from ovss_fast.pipeline.vocabulary import Vocabulary
from ovss_fast.pipeline.windows import (
    DEFAULT_MEMORY_BUDGET,
    WindowLayout,
    Windows,
    window_bytes,
    window_starts,
)

#: the DINO architecture the "dino" affinity source builds for heads other than "lposs"
DINO_ARCH = DINO_DEFAULT


def _check_feature_source(affinity: str | AffinityFn) -> None:
    """Head "lposs"'s source of patch features: "dino" or a callable; "clip" / "sd2" give none."""
    if isinstance(affinity, str) and affinity != "dino":
        raise InputError(f"head 'lposs' needs patch features for its kNN graph, which affinity={affinity!r} does not "
                         "give: use affinity='dino' (LPOSS's DINO ViT-B/16 last-block value features, the default "
                         "for this head; --affinity dino) or a callable (image [B, 3, H, W] in [0, 1], grid) -> "
                         "[B, N, D]")


def _held_by(part: str, name: str, doc: str) -> property:
    """A Segmenter attribute that lives in one of its parts (self.windows, self.maps, self.vocabulary, self.loaded)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Segmenter:
    """Open-vocabulary segmentation: CLIP dense features + an affinity + the DSLO head (or the peers' logits).

    ``Segmenter(model="ViT-B-16", pretrained="openai", affinity="clip", mode="mv")``;
    ``Segmenter(preset="paper")``: the paper's configuration (:mod:`ovss_fast.pipeline.presets`).

    model: an open_clip model name (``open_clip.list_models()``), an open_clip
    'local-dir:/folder' (open_clip_config.json + weights) or 'hf-hub:org/repo' name
    (``pretrained`` is then ignored), a HuggingFace transformers CLIP as
    'hf:openai/clip-vit-base-patch16' (downloaded by transformers when online) or
    'hf:/path/to/folder' (a save_pretrained folder; ``pip install 'ovss_fast[hf]'``),
    or an already-built open_clip or transformers CLIP model (nn.Module; then pass
    ``tokenizer`` too, or use :meth:`from_model`). See :mod:`ovss_fast.models.loading`.
    pretrained: an open_clip tag (downloaded by open_clip when online), a local
    checkpoint path, or None (random weights, for tests; warns).
    preset: "ours" (default) or "paper" (mode mv, affinity sd2, the whole image, ``HeadOptions.paper()``);
    mode, affinity and the head's options given explicitly override the preset's (None: the preset's).
    affinity: "clip" (last-block self-attention, no extra weights; ours), "sd2" (Stable
    Diffusion 2 self-attention, ``pip install 'ovss_fast[sd]'``), "dino" (timm DINO
    ViT), or a callable ``(image [B, 3, H, W] in [0, 1], grid (h, w)) -> [B, N, N]``;
    ``affinity_weights`` is the local weights path for "sd2"/"dino".
    mode: "mv", "op" or "kl" (method.md section 3). device: default CUDA if available;
    dtype: default float16 on CUDA, float32 on CPU (the DSLO ops run in float32).
    window / stride: sliding windows in pixels (int or (h, w), multiples of the patch
    size; stride defaults to half the window); None: the whole image as one window.
    resize: the shorter side in pixels before windowing (None: native, to whole patches).
    features: the dense-feature preset, "clip" (plain patch tokens, the paper's),
    "maskclip", "sclip", "clearclip" or "naclip", each as its method publishes it
    (:data:`~ovss_fast.models.clip_features.FEATURE_PRESETS`). pos_interp: "size" (default) or
    "peers" (the peers' ``scale_factor=(g + 0.1) / g0`` positional interpolation).
    head: "dslo" (the discrepancy scores, default), "logits" (the peers' plain
    argmax of softmax(scale * cos) over synonyms, max over a class's synonyms; no
    affinity is computed) or "lposs" (LPOSS's patch stage: the raw cosines of every synonym
    propagated by :func:`~ovss_fast.ops.label_propagation` over one kNN graph of all patches of all
    windows of an image, options ``lposs_k`` ... ``lposs_tol``; the graph's features come from
    ``affinity``: "dino", the default for this head, is LPOSS's DINO ViT-B/16 last-block value
    features (:data:`~ovss_fast.models.affinity.LPOSS_DINO`), a callable ``(image, grid) -> [B, N, D]``
    or an object with such a ``features`` method gives its own; "clip" and "sd2" give none).
    bg_threshold: None (default, off) or the peers' prob_thd: pixels whose highest class
    probability (softmax over synonyms of scale * cos, max over a class's synonyms, brought to
    pixels by the same upsampling as the scores) is below it become class 0, so the first class
    must be the background.
    aggregation: "grid" (default: windows averaged on the patch grid, then joint bilateral
    upsampling) or "pixels" (the peers': each window's maps bilinear to its pixels,
    averaged, then bilinear to the output; not snapped to whole patches, and crops that
    are not whole patches follow ``crop``: "floor" or "pad"). antialias: whether internal
    resizes antialias. templates: prompt templates (callables or "{}" format strings;
    default open_clip's 80 OpenAI ImageNet ones). memory_budget: bytes for one chunk of
    windows (:meth:`memory_estimate`); when one window does not fit, ``fallback_window``
    (pixels, stride half of it) is used if given, else a ValueError names one that fits.
    batch_windows: False runs one window at a time (the older path). backend: the ops'
    ("auto", "reference", "cpu", "cuda", "triton"). Other keywords: the head's options
    (scale, nms, eps, iters, sk_iters, steps, readout, tau, sigma_spatial, sigma_range,
    radius, refine, pamr_iters, pamr_dilations; :class:`~ovss_fast.ops.options.HeadOptions`).
    refine: how the maps reach the output size, "jbu" (default: joint bilateral upsampling
    of the patch grid; bilinear with aggregation "pixels", which keeps no grid), "bilinear"
    (each synonym's map bilinear, the peers' resize) or "pamr" (bilinear, then PAMR,
    ``pamr_iters`` steps at ``pamr_dilations``, on the image normalised as the model sees
    it: NACLIP's default tail) or "lposs+" (LPOSS+: the per-synonym maps bilinear to the processed image,
    ``img`` at ``resize``, LPOSS+'s pixel-stage label propagation on it, ``lposs_radius``, ``lposs_tau`` and
    the patch stage's alpha / iters / tol, then the class maps bilinear to (H, W); after head "dslo" it
    propagates the discrepancy scores, after "logits" the raw cosines; its memory is checked against
    ``memory_budget``).
    """


    def __init__(self, model: str | nn.Module = "ViT-B-16", pretrained: str | os.PathLike | None = "openai",
                 affinity: str | AffinityFn | None = None, mode: str | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 window: int | tuple[int, int] | None = None,
                 stride: int | tuple[int, int] | None = None, *, features: str = "clip", pos_interp: str = "size",
                 head: str = "dslo", bg_threshold: float | None = None, aggregation: str = "grid",
                 crop: str = "floor", antialias: bool = True, resize: int | None = None,
                 tokenizer: Callable | None = None, templates: Sequence[str | Callable[[str], str]] | None = None,
                 affinity_weights: str | os.PathLike | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                 batch_windows: bool = True, cache_dir: str | None = None, backend: str = "auto",
                 fallback_window: int | tuple[int, int] | None = None, preset: str = "ours", **options: Any) -> None:
        # every argument is checked before the model is built and the text embedded
        check.choice("backend", backend, ("auto", *BACKENDS))
        if head == "lposs" and affinity is None:
            affinity = "dino"  # LPOSS's graph features (the presets' "clip" / "sd2" give none)
        #: the preset with the explicit arguments applied (``self.preset.record()`` for a results file)
        self.preset = resolve_preset(preset, mode=mode, affinity=affinity, window=window, options=options)
        mode, affinity = self.preset.mode, self.preset.affinity
        self.maps = HeadMaps(head, mode, bg_threshold, backend, self.preset.options)
        if self.maps.needs_features:
            _check_feature_source(affinity)
        self.features, self.pos_interp = check_features(features), check_pos_interp(pos_interp)
        self.aggregation = check.choice("aggregation", aggregation, check.AGGREGATIONS)
        if not callable(affinity):
            check.choice("affinity", affinity, BUILTIN)
        windows = {"crop": check.choice("crop", crop, check.CROPS), "antialias": check.flag("antialias", antialias),
                   "resize": None if resize is None else check.count("resize", resize, minimum=1),
                   "memory_budget": check.positive("memory_budget", memory_budget),
                   "batch_windows": check.flag("batch_windows", batch_windows)}
        self.loaded = load_frozen(model, pretrained, device=device, dtype=dtype, tokenizer=tokenizer,
                                  cache_dir=cache_dir)
        self.dense = DenseCLIP(self.model.visual, features=features, pos_interp=pos_interp)
        self.patch = self.dense.patch
        self.mean, self.std = preprocess_stats(self.model)
        self.windows = Windows.from_pixels(self.patch, window, stride, fallback_window,
                                           one_window_bytes=self._window_bytes, **windows)
        self.vocabulary = Vocabulary(self.model, self.tokenizer, self.device, templates)
        self.affinity_name = affinity if isinstance(affinity, str) else getattr(affinity, "__name__", "callable")
        self.affinity_fn = build_affinity(
            affinity, weights=None if affinity_weights is None else os.fspath(affinity_weights),
            device=self.device, dtype=self.dtype, dino_arch=LPOSS_DINO if self.maps.needs_features else DINO_ARCH,
        ) if self.maps.needs_affinity or self.maps.needs_features else None

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Callable | None = None, **kwargs: Any) -> Segmenter:
        """A Segmenter on an already-built model and its tokenizer: an open_clip CLIP model (tokenizer
        optional) or a transformers ``CLIPModel`` (with its tokenizer, e.g. ``CLIPTokenizer``, or an
        open_clip tokenizer of the same vocabulary)."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.model_name!r}, affinity={self.affinity_name!r}, mode={self.mode!r}, "
                f"features={self.features!r}, head={self.head!r}, bg_threshold={self.bg_threshold!r}, "
                f"aggregation={self.aggregation!r}, window/stride={self.windows.describe()}, "
                f"device={str(self.device)!r}, dtype={self.dtype})")

    model = _held_by("loaded", "model", "the CLIP model (eval mode, frozen)")
    tokenizer = _held_by("loaded", "tokenizer", "the text tokenizer")
    model_name = _held_by("loaded", "name", "the model's name")
    device = _held_by("loaded", "device", "where the model and the ops run")
    dtype = _held_by("loaded", "dtype", "the model's dtype (the DSLO ops run in float32)")
    mode = _held_by("maps", "mode", 'the discrepancy mode, "mv", "op" or "kl"')
    head = _held_by("maps", "head", 'the head, "dslo", "logits" or "lposs"')
    bg_threshold = _held_by("maps", "bg_threshold", "the background threshold (None: off)")
    backend = _held_by("maps", "backend", "the ops' backend")
    options = _held_by("maps", "options", "the head's options (:class:`~ovss_fast.ops.options.HeadOptions`)")
    window = _held_by("windows", "window", "(wh, ww) window in patches, None for the whole image")
    stride = _held_by("windows", "stride", "(sh, sw) window stride in patches, None for the whole image")
    resize = _held_by("windows", "resize", "shorter side in pixels images are resized to (None: native size)")
    crop = _held_by("windows", "crop", 'aggregation "pixels": crops that are not whole patches, "floor" or "pad"')
    antialias = _held_by("windows", "antialias", "whether internal resizes antialias")
    memory_budget = _held_by("windows", "memory_budget", "bytes allowed for one chunk of windows")
    batch_windows = _held_by("windows", "batch_windows", "all windows in a few batched calls (False: one by one)")
    fallback_window = _held_by("windows", "fallback", "window in patches for images too large (None: refuse them)")
    templates = _held_by("vocabulary", "templates", "the prompt templates")

    @property
    def settings(self) -> dict[str, Any]:
        """The Segmenter's settings besides the head's options (windows and strides in pixels, None for the
        whole image); a :class:`~ovss_fast.pipeline.prediction.Prediction` carries them."""
        def px(cells: tuple[int, int] | None) -> tuple[int, int] | None:
            return None if cells is None else self.windows.px_pair(cells)

        return {"model": self.model_name, "affinity": self.affinity_name, "mode": self.mode, "head": self.head,
                "features": self.features, "pos_interp": self.pos_interp, "bg_threshold": self.bg_threshold,
                "aggregation": self.aggregation, "crop": self.crop, "antialias": self.antialias,
                "resize": self.resize, "window": px(self.window), "stride": px(self.stride),
                "fallback_window": px(self.fallback_window), "memory_budget": self.memory_budget,
                "batch_windows": self.batch_windows, "backend": self.backend, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "patch": tuple(self.patch)}

    @property
    def op_params(self) -> dict[str, Any]:
        """The options of class_distributions and discrepancy (scale, nms, eps, ..., tau)."""
        return {**self.options.for_op("class_distributions"), **self.options.for_op("discrepancy")}

    @property
    def jbu_params(self) -> dict[str, Any]:
        """The options of the joint bilateral upsampling (sigma_spatial, sigma_range, radius)."""
        return self.options.for_op("jbu")

    def text_features(self, class_names: str | Sequence[str]) -> tuple[Tensor, list[list[int]]]:
        """Embeddings of every synonym [S, D] (float32, unit norm) and, per class, its rows (cached)."""
        return self.vocabulary(class_names)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Low-resolution patch grid (gh, gw) of an image of height x width pixels."""
        return self.windows.grid_for(height, width)

    def window_layout(self, grid: tuple[int, int], device: torch.device | str = "cpu") -> WindowLayout:
        """The windows of a (gh, gw) patch grid: their starts, patch indices and coverage counts."""
        return self.windows.layout(grid, device)

    def memory_estimate(self, height: int, width: int, batch: int = 1, synonyms: int = 0) -> int:
        """Bytes alive while ``batch`` windows of an image of height x width go through together
        (``synonyms`` head columns); the terms are :func:`ovss_fast.pipeline.windows.window_bytes`'."""
        return self.windows.memory_estimate(height, width, batch, synonyms)

    def _window_bytes(self, cells: tuple[int, int], synonyms: int) -> int:
        mode = "kl" if self.head == "lposs" else self.mode  # head lposs holds no N x N head tensors per window
        return window_bytes(self.dense, mode, getattr(self, "affinity_fn", None), cells, synonyms)

    def _window_features(self, crops01: Tensor, record: RunRecord) -> tuple[Tensor, Tensor | None]:
        """crops01 [M, 3, wh * ph, ww * pw] -> (feats [M, n, D] float32, affinity [M, n, n] or None).

        One forward of the visual tower for all M windows; the affinity source is called
        once with the whole batch (None for mode "kl" and head "logits").
        """
        M = crops01.shape[0]
        grid = (crops01.shape[-2] // self.patch[0], crops01.shape[-1] // self.patch[1])
        need_attention = self.maps.needs_affinity and self.affinity_fn is None
        with record.stage("visual"):
            feats, attention = self.dense(normalise(crops01, self.mean, self.std), need_attention=need_attention)
            feats = feats.float()
        if not self.maps.needs_affinity:
            return feats, None
        if self.affinity_fn is None:
            return feats, attention
        with record.stage("affinity"):
            affinity = check_affinity(self.affinity_fn(crops01, grid), grid[0] * grid[1], M,
                                      repr(self.affinity_name))
            return feats, affinity.to(crops01.device)

    def _window_maps(self, crops01: Tensor, text: Tensor, record: RunRecord) -> Tensor:
        """crops01 [M, 3, h, w] -> the head's per-synonym maps [M, n, K * S] (:meth:`HeadMaps.window_maps`);
        head "lposs": the cosines and the source's patch features [M, n, S + Dg] (:meth:`HeadMaps.window_inputs`)."""
        feats, affinity = self._window_features(crops01, record)
        if self.maps.needs_features:
            grid = (crops01.shape[-2] // self.patch[0], crops01.shape[-1] // self.patch[1])
            with record.stage("affinity"):
                graph = check_patch_features(patch_features_of(self.affinity_fn)(crops01, grid), grid[0] * grid[1],
                                             crops01.shape[0], repr(self.affinity_name))
            return self.maps.window_inputs(feats, graph.to(feats.device), text)
        return self.maps.window_maps(feats, affinity, text, record.stage)

    @torch.no_grad()
    def _grid_maps(self, img: Tensor, text: Tensor, record: RunRecord | None = None, pixels: bool = False) -> Tensor:
        """img [B, 3, H, W] -> per-synonym maps [B, K * S, gh, gw] averaged over windows on the patch grid
        (:meth:`Windows.grid_maps`), or with ``pixels`` [B, K * S, h, w] at the processed size (the peers');
        ``record``: the call's (a fresh one when None)."""
        K = len(self.maps.kinds) * text.shape[0]
        record = RunRecord() if record is None else record

        def maps(crops: Tensor) -> Tensor:
            return self._window_maps(crops, text, record)

        joint = None
        if self.maps.needs_features:  # head lposs: one graph over all windows of an image
            def joint(inputs: Tensor, positions: Tensor) -> Tensor:
                return self.maps.propagate(inputs, positions, text.shape[0], record.stage)

        if pixels:
            return self.windows.pixel_maps(img, K, maps, self.mean, record, joint=joint)
        return self.windows.grid_maps(img, K, maps, record, joint=joint)

    def _finish(self, img: Tensor, guide: Tensor, text: Tensor, groups: list[list[int]], record: RunRecord,
                labels: bool, full: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """img [B, 3, H, W] -> (labels [B, H', W'] if ``labels``, class scores at the aggregation's resolution,
        class scores at the guide's size [B, C, H', W'] if ``full``): JBU guided by the guide (aggregation
        "grid", refine "jbu"), else the per-synonym maps bilinear to the guide's size and, for refine "pamr",
        refined by PAMR (:meth:`_refine`) before the class maps."""
        if self.aggregation == "pixels" or self.options.refine != "jbu":
            maps = self._grid_maps(img, text, record, pixels=self.aggregation == "pixels")
            scores, probs = self.maps.class_maps(maps, groups)
            if not (labels or full):
                return None, scores, None
            up, up_probs = scores, probs
            if self.options.refine == "lposs+":
                with record.stage("refine"):
                    up, up_probs = self._refine_lposs_plus(maps, img, guide, groups)
            elif self.options.refine == "pamr" or tuple(maps.shape[-2:]) != tuple(guide.shape[-2:]):
                with record.stage("refine"):
                    maps = self._refine(maps, img, guide)
                up, up_probs = self.maps.class_maps(maps, groups)
            return (self.maps.labels(up, up_probs) if labels else None), scores, (up if full else None)
        scores, probs = self.maps.class_maps(self._grid_maps(img, text, record), groups)
        if not (labels or full):
            return None, scores, None
        out, up = None, None
        with record.stage("jbu"):
            if labels and self.bg_threshold is None:
                out = jbu_argmax(scores, guide, backend=self.backend, **self.jbu_params)
            if full or out is None:
                up = jbu_upsample(scores, guide, backend=self.backend, **self.jbu_params)
            if out is None:
                if probs is not None and probs is not scores:
                    probs = jbu_upsample(probs, guide, backend=self.backend, **self.jbu_params)
                out = self.maps.labels(up, up if probs is scores else probs)
        return (out if labels else None), scores, (up if full else None)

    @torch.no_grad()
    def _predict(self, image: ImageLike, class_names: str | Sequence[str], guide: ImageLike | None, *,
                 labels: bool, upsample_scores: bool, sync_timings: bool) -> Prediction:
        """The one path of :meth:`predict`, :meth:`seg` and :meth:`scores` (``labels=False``: no labels)."""
        record = RunRecord(sync=sync_timings)
        with record.stage("total"):
            with record.stage("text"):
                text, groups = self.text_features(class_names)  # embedded on self.device, cached per class list

            def finish(img: Tensor, g: Tensor, images: tuple[int, ...]) -> tuple[Tensor | None, ...]:
                record.images = images
                return self._finish(img, g, text, groups, record, labels, upsample_scores)

            out, scores, full = map_by_size(image, guide, finish, self.device)
        names = ["; ".join(c) for c in parse_class_names(class_names)]
        total = record.timings.pop("total")
        return Prediction(labels=out, scores=scores, scores_full=full, class_names=names,
                          timings={**record.timings, "total": total}, fallbacks=record.fallbacks,
                          options=self.options, settings=self.settings)

    def predict(self, image: ImageLike, class_names: str | Sequence[str], *, upsample_scores: bool = False,
                guide: ImageLike | None = None, sync_timings: bool = False) -> Prediction:
        """Segment once, get everything: a :class:`~ovss_fast.pipeline.prediction.Prediction` with the labels
        (as :meth:`seg`), the class scores on the patch grid (as ``scores(upsample=False)``), with
        ``upsample_scores`` the scores at the labels' size too (as ``scores(upsample=True)``), the class
        names, seconds per stage, the images that fell back to ``fallback_window`` and why, and the options
        and settings used. The model runs once per call.

        image, class_names, guide: as in :meth:`seg`. sync_timings: synchronise CUDA at every stage
        boundary, so the per-stage seconds are exact on a GPU (slower; on the CPU nothing changes).
        Each call collects its own timings and fallbacks: calls from several threads do not mix them.
        """
        return self._predict(image, class_names, guide, labels=True, upsample_scores=upsample_scores,
                             sync_timings=check.flag("sync_timings", sync_timings))

    def _refine(self, maps: Tensor, img: Tensor, guide: Tensor) -> Tensor:
        """Per-synonym maps [B, K * S, h, w] -> [B, K * S, H, W] at the guide's size, the peers' tail: bilinear
        (align_corners=False), then for refine "pamr" PAMR on the image as NACLIP gives it: ``img`` (in eval the
        protocol-resized image) normalised with the model's mean / std and resized bilinearly to H x W.
        Refine "jbu" with aggregation "pixels" is bilinear (JBU upsamples a patch grid, "pixels" keeps none)."""
        size = tuple(guide.shape[-2:])
        image = None
        if self.options.refine == "pamr":
            image = normalise(img.float(), self.mean, self.std)
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return refine_scores(maps, size, image=image, backend=self.backend, **self.options.pamr_params())

    def _refine_lposs_plus(self, maps: Tensor, img: Tensor, guide: Tensor,
                           groups: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        """Refine "lposs+", LPOSS+'s order: per-synonym maps [B, K * S, h, w] bilinear to the processed image
        (``img`` at the Segmenter's ``resize``, in [0, 1]), the pixel stage on it (:func:`refine_lposs_plus`),
        the class maps (max over synonyms), then bilinear to the guide's size -> (scores, probabilities)."""
        size = self.windows.pixel_size(*img.shape[-2:])
        image = img.float()
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                                  antialias=self.antialias).clamp(0, 1)
        params = self.options.pixel_propagation_params()
        step = self.windows.pixel_stage_images(img.shape[0], maps.shape[1], size[0], size[1], params["radius"])
        refined = torch.cat([refine_lposs_plus(maps[i:i + step], image[i:i + step], backend=self.backend, **params)
                             for i in range(0, img.shape[0], step)])
        up, up_probs = self.maps.class_maps(refined, groups)
        out = tuple(guide.shape[-2:])
        if out != size:
            same = up_probs is up
            up = refine_scores(up, out)
            up_probs = up if same else (None if up_probs is None else refine_scores(up_probs, out))
        return up, up_probs

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
        return self.predict(image, class_names, guide=guide).labels

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
        pred = self._predict(image, class_names, guide, labels=False, upsample_scores=check.flag("upsample", upsample),
                             sync_timings=False)
        return pred.scores_full if upsample else pred.scores


__all__ = ["Prediction", "Segmenter", "WindowLayout", "as_image_batches", "build_open_clip", "load_image",
           "window_starts"]
