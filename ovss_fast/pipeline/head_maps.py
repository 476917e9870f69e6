"""The head of a Segmenter: what each window contributes per synonym, and how those maps become classes and labels.

Per window (features [M, n, D], affinity [M, n, n] or None, synonym embeddings [S, D]) the head
contributes K maps per synonym side by side (:attr:`HeadMaps.kinds`): "dslo", the discrepancy
scores (:func:`ovss_fast.ops.class_distributions` then :func:`~ovss_fast.ops.discrepancy`, with the
head's options), for head "dslo"; "cos", the cosine to each synonym, for head "logits" (the peers'
softmax(scale * cos)) or the background threshold; "lposs", for head "lposs", LPOSS's patch stage: each
window hands the raw cosines and its patch features (:meth:`HeadMaps.window_inputs`), and once every
window of an image is in, :func:`~ovss_fast.ops.label_propagation` runs over all of them as one graph
(:meth:`HeadMaps.propagate`). Once the windows are aggregated, a class's score
is the max over its synonyms (:meth:`HeadMaps.class_maps`) and labels are the argmax, with pixels
whose best class probability is under ``bg_threshold`` set to class 0 (:meth:`HeadMaps.labels`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss_fast.ops import validate as check
from ovss_fast.ops.api import class_distributions, discrepancy, label_propagation
from ovss_fast.ops.options import HeadOptions
from ovss_fast.pipeline.vocabulary import class_scores


@dataclass
class HeadMaps:
    """head "dslo" | "logits" | "lposs"; mode "mv" | "op" | "kl"; bg_threshold None | (0, 1]; backend of the ops."""

    head: str
    mode: str
    bg_threshold: float | None
    backend: str
    options: HeadOptions

    def __post_init__(self) -> None:
        check.choice("head", self.head, check.HEADS)
        check.choice("mode", self.mode, check.MODES)
        self.bg_threshold = check.threshold("bg_threshold", self.bg_threshold)

    @property
    def needs_affinity(self) -> bool:
        return self.mode != "kl" and self.head == "dslo"

    @property
    def needs_features(self) -> bool:
        """Whether the head needs patch features from the affinity source (head "lposs": its kNN graph)."""
        return self.head == "lposs"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The per-synonym maps each window contributes, in column order: "dslo" (discrepancy scores)
        for the DSLO head, "lposs" (the propagated cosines) for the LPOSS head, "cos" (cosine to each
        synonym) for the logits head or the background threshold."""
        kinds = (self.head,) if self.head in ("dslo", "lposs") else ()
        if self.head == "logits" or self.bg_threshold is not None:
            kinds += ("cos",)
        return kinds

    def window_maps(self, feats: Tensor, affinity: Tensor | None, text: Tensor,
                    stage: Callable[[str], AbstractContextManager]) -> Tensor:
        """feats [M, n, D], affinity [M, n, n] | None, text [S, D] -> [M, n, K * S]: the maps of
        :attr:`kinds` side by side; ``stage(name)`` times class_distributions and discrepancy."""
        maps = []
        for kind in self.kinds:
            if kind == "dslo":
                with stage("class_distributions"):
                    q = class_distributions(feats, text, backend=self.backend,
                                            **self.options.for_op("class_distributions"))
                with stage("discrepancy"):
                    maps.append(discrepancy(q, affinity, mode=self.mode, backend=self.backend,
                                            **self.options.for_op("discrepancy")).float())
            else:
                maps.append(F.normalize(feats, dim=-1) @ text.t().to(feats.dtype))
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=-1)

    def window_inputs(self, feats: Tensor, graph: Tensor, text: Tensor) -> Tensor:
        """Head "lposs", one chunk of windows: feats [M, n, D] (CLIP), graph [M, n, Dg] (the source's patch
        features), text [S, D] -> [M, n, S + Dg]: the raw cosines (LPOSS's y0, no softmax) and the graph's
        features side by side, for :meth:`propagate` once the image's windows are all in."""
        cos = F.normalize(feats, dim=-1) @ text.t().to(feats.dtype)
        return torch.cat([cos.float(), graph.to(cos.device, torch.float32)], dim=-1)

    def propagate(self, inputs: Tensor, positions: Tensor, synonyms: int,
                  stage: Callable[[str], AbstractContextManager]) -> Tensor:
        """Head "lposs", all windows of B images: inputs [B, N, S + Dg] (:meth:`window_inputs` of every
        window, N = windows x patches), positions [N, 2] patch centres in pixels (y, x) -> [B, N, K * S]:
        :func:`~ovss_fast.ops.label_propagation` of the cosines over one graph per image (the "lposs" maps),
        then the raw cosines again when "cos" is a kind (the background threshold)."""
        S = synonyms
        cos, graph = inputs[..., :S], inputs[..., S:]
        B, N = cos.shape[:2]
        with stage("label_propagation"):
            out = label_propagation(cos, graph, positions.to(cos).expand(B, N, 2), backend=self.backend,
                                    **self.options.label_propagation_params()).float()
        return torch.cat([out, cos], dim=-1) if "cos" in self.kinds else out

    def class_maps(self, maps: Tensor, groups: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        """Per-synonym maps [B, K * S, ...] -> (class scores [B, C, ...], class probabilities [B, C, ...] or None).

        Scores: the DSLO scores' (head "dslo") or the propagated cosines' (head "lposs") max over a class's
        synonyms, or the class probabilities (head "logits"). Probabilities: softmax over all synonyms of
        scale * cos, then the max over a class's synonyms (None unless head "logits" or
        bg_threshold need them).
        """
        kinds = self.kinds
        S = maps.shape[1] // len(kinds)
        probs = None
        if "cos" in kinds:
            cos = maps[:, -S:]
            probs = class_scores(torch.softmax(self.options.scale * cos, dim=1), groups)
        scores = probs if self.head == "logits" else class_scores(maps[:, :S], groups)
        return scores, probs

    def labels(self, scores: Tensor, probs: Tensor | None) -> Tensor:
        """argmax over classes, with the background threshold applied (class 0 where the best probability is low)."""
        labels = scores.argmax(dim=1)
        if self.bg_threshold is not None:
            labels = labels.masked_fill(probs.amax(dim=1) < self.bg_threshold, 0)
        return labels


__all__ = ["HeadMaps"]
