"""One request, one result: :class:`Prediction` (what
:meth:`~ovss_fast.pipeline.segmenter.Segmenter.predict` returns) and :class:`RunRecord` (what one call
collects on its way: stage timings and window fallbacks).

A :class:`RunRecord` is made per call and passed down the pipeline (the windows, the head), so two
threads segmenting with one Segmenter at once each get their own timings and fallbacks; nothing is
counted or timed on the shared Segmenter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ovss_fast.ops.options import HeadOptions

#: the stages a Prediction's timings name, in pipeline order ("text": the class names' embeddings, cached
#: per class list; "affinity" only for a separate affinity source such as "sd2" / "dino" (head "lposs": its
#: patch features); "label_propagation" head "lposs"'s patch stage; "jbu" the joint bilateral upsampling and
#: argmax, "refine" the other refiners; "total" the whole call)
STAGES = ("text", "visual", "affinity", "class_distributions", "discrepancy", "label_propagation", "jbu", "refine",
          "total")

Labels = Tensor | list[Tensor]


@dataclass(frozen=True)
class Fallback:
    """Images that did not fit ``memory_budget`` with the Segmenter's window and went through ``fallback_window``.

    images: their indices in the request (0 for a single image; the batch or list index otherwise);
    size: their (H, W) as segmented (after ``resize``); window: the window asked, (h, w) pixels, None for
    the whole image; fallback: the window used instead, (h, w) pixels (stride half of it); reason: the
    memory guard's estimate against the budget.
    """

    images: tuple[int, ...]
    size: tuple[int, int]
    window: tuple[int, int] | None
    fallback: tuple[int, int]
    reason: str


class RunRecord:
    """What one call of the pipeline collects: seconds per stage and the window fallbacks.

    sync: synchronise CUDA at every stage boundary (exact per-stage times on a GPU, slower); without it
    a stage's time on CUDA is the host's (kernel launches), the total is still right once the result
    is read. ``images``: the request's indices of the images going through now (set per size group).
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = bool(sync)
        self.timings: dict[str, float] = {}
        self.fallbacks: list[Fallback] = []
        self.images: tuple[int, ...] = (0,)

    def _now(self) -> float:
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times one stage (added up over windows and chunks)."""
        t0 = self._now()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + self._now() - t0

    def fell_back(self, size: tuple[int, int], window: tuple[int, int] | None, fallback: tuple[int, int],
                  reason: str) -> None:
        """The images going through now used the fallback window (called by the memory guard)."""
        self.fallbacks.append(Fallback(self.images, size, window, fallback, reason))


@dataclass
class Prediction:
    """The result of :meth:`ovss_fast.Segmenter.predict`: everything one request produces.

    Shapes follow the input, as :meth:`~ovss_fast.Segmenter.seg` does: a single image gives [H, W]
    labels and [C, gh, gw] scores, a batch [B, H, W] and [B, C, gh, gw], a list a list of these.

    labels: int64 class index per pixel, at the image's size (or the guide's), on the Segmenter's device.
    scores: float32 class scores [C, gh, gw] on the patch grid, the windows averaged (aggregation
    "pixels": at the processed image's pixels); larger means "this pixel is that class".
    scores_full: the scores at the labels' size ([C, H, W], the joint bilateral upsampling that gives
    the labels), when asked with ``upsample_scores=True``; else None.
    class_names: one entry per class (its synonyms joined by "; "), in the order of the labels' indices.
    timings: seconds per stage (:data:`STAGES`: "text", "visual", "affinity", "class_distributions",
    "discrepancy", "label_propagation", "jbu", "refine" as they ran, and "total").
    fallbacks: the images that went through ``fallback_window`` and why (:class:`Fallback`).
    options: the head's options used (:class:`~ovss_fast.ops.options.HeadOptions`).
    settings: the Segmenter's other settings used (:attr:`ovss_fast.Segmenter.settings`).
    """

    labels: Labels
    scores: Labels
    class_names: list[str]
    timings: dict[str, float]
    fallbacks: list[Fallback]
    options: HeadOptions
    settings: dict[str, Any]
    scores_full: Labels | None = None

    @property
    def fell_back(self) -> bool:
        """Whether any image of the request went through the fallback window."""
        return bool(self.fallbacks)


__all__ = ["STAGES", "Fallback", "Prediction", "RunRecord"]
