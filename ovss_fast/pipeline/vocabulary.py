"""The vocabulary side of a Segmenter: class names and their synonyms, prompt templates, the text embeddings.

Class names come as one entry per class with synonyms separated by ";" (or one string with
classes separated by ","; :func:`~ovss_fast.models.clip_features.parse_class_names`). Every synonym is a
column of the head (a column of the softmax and a distribution over patches); a class's score is
the maximum over its synonyms' scores (:func:`class_scores`), taken on the low-resolution grid
before upsampling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.models.clip_features import default_templates, parse_class_names, text_embeddings

#: how many class lists the text-embedding cache keeps
CACHE_SIZE = 16


def synonym_groups(classes: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per class, the rows of its synonyms in the flat synonym list: [["cat", "kitten"], ["dog"]] -> [[0, 1], [2]]."""
    groups, i = [], 0
    for c in classes:
        groups.append(list(range(i, i + len(c))))
        i += len(c)
    return groups


def class_scores(syn: Tensor, groups: list[list[int]]) -> Tensor:
    """Synonym maps [B, S, ...] -> class maps [B, C, ...]: the max over each class's synonyms."""
    return torch.stack([syn[:, g].amax(dim=1) for g in groups], dim=1)


class Vocabulary:
    """Text embeddings of class lists through a CLIP text tower, cached per class list (the most recent 16).

    templates: prompt templates (callables or "{}" format strings; default open_clip's 80 OpenAI
    ImageNet ones); each synonym's embedding is the normalised mean over templates.
    """

    def __init__(self, model: Any, tokenizer: Callable, device: torch.device,
                 templates: Sequence[str | Callable[[str], str]] | None = None) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.templates = tuple(templates) if templates is not None else default_templates()
        if not self.templates:
            raise InputError("templates is empty: give at least one prompt template such as '{}'")
        self.cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def __call__(self, class_names: str | Sequence[str]) -> tuple[Tensor, list[list[int]]]:
        """Embeddings of every synonym [S, D] (float32, unit norm) and, per class, its rows."""
        classes = parse_class_names(class_names)
        key = tuple(tuple(c) for c in classes)
        cached = self.cache.get(key)
        if cached is None:
            names = [s for c in classes for s in c]
            cached = text_embeddings(self.model, self.tokenizer, names, self.templates, device=self.device)
            self.cache[key] = cached
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return cached, synonym_groups(classes)


__all__ = ["CACHE_SIZE", "Vocabulary", "class_scores", "synonym_groups"]
