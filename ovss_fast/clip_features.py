"""Dense CLIP features for segmentation, on open_clip Vision Transformers.

One forward of the visual tower gives, for a crop whose sides are multiples of the
patch size (P):

- patch features ``feats`` [B, N, D]: the last block's patch outputs through
  ``ln_post`` and ``proj`` (plain CLIP patch tokens, as the DSLO paper uses), or,
  with ``features="self_self"``, a self-self attention variant of the last block;
- the last block's self-attention averaged over heads, patch-to-patch part
  [B, N, N] (the "clip" affinity), from the same forward.

N = h * w with (h, w) = (crop height / P, crop width / P); the positional
embedding is interpolated bicubically for grids other than the model's own.

Also here: class-name parsing (one class per entry, synonyms separated by ";"),
prompt ensembling over open_clip's OpenAI ImageNet templates, and a tiny
open_clip config (``TINY_MODEL``) that tests and offline demos build with random
weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Name of a tiny open_clip config (ViT, width 64, 2 layers, patch 16, 64 px; text width 64, 2 layers;
#: embedding 32) registered by :func:`register_tiny_config`; for tests and offline smoke runs with
#: random weights only.
TINY_MODEL = "ovss-fast-tiny"

_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

FEATURES = ("clip", "self_self")

_registered_dir: str | None = None


def register_tiny_config() -> str:
    """Register :data:`TINY_MODEL` with open_clip (idempotent) and return its name.

    Uses open_clip's public ``add_model_config`` with a JSON file in a private
    temporary directory.
    """
    global _registered_dir
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return TINY_MODEL
    if _registered_dir is None:
        _registered_dir = tempfile.mkdtemp(prefix="ovss_fast_configs_")
        with open(os.path.join(_registered_dir, f"{TINY_MODEL}.json"), "w") as f:
            json.dump(_TINY_CONFIG, f)
    open_clip.add_model_config(_registered_dir)
    return TINY_MODEL


# --------------------------------------------------------------------------- class names
def parse_class_names(class_names: str | Sequence[str]) -> list[list[str]]:
    """Class names -> one list of synonyms per class.

    A sequence has one class per entry, synonyms separated by ";" ("person; people; man").
    A single string lists classes separated by "," ("cat; kitten, dog, grass").
    """
    if isinstance(class_names, str):
        entries = class_names.split(",") if class_names.strip() else []
    elif isinstance(class_names, Sequence):
        entries = list(class_names)
    else:
        raise TypeError(
            f"class_names must be a list of strings or a comma-separated string, got {type(class_names).__name__}"
        )
    if not entries:
        raise ValueError("class_names is empty: give at least one class, e.g. ['cat; kitten', 'dog', 'grass']")
    classes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise TypeError(f"class_names[{i}] must be a string, got {type(entry).__name__}")
        synonyms = [s.strip() for s in entry.split(";") if s.strip()]
        if not synonyms:
            raise ValueError(f"class_names[{i}] = {entry!r} names no class (empty after splitting on ';')")
        classes.append(synonyms)
    _reject_duplicates(classes, entries)
    return classes


def _reject_duplicates(classes: list[list[str]], entries: list[str]) -> None:
    """A name (case and inner spaces ignored, as CLIP's tokenizer does) may appear once: a second
    copy splits the softmax with the first and, its score equal, could never win (ties go to the
    lower class)."""
    seen: dict[str, int] = {}
    for i, synonyms in enumerate(classes):
        for name in synonyms:
            key = " ".join(name.casefold().split())
            if key in seen:
                j = seen[key]
                where = (f"twice in class_names[{i}] = {entries[i]!r}" if j == i else
                         f"in class_names[{j}] = {entries[j]!r} and class_names[{i}] = {entries[i]!r}")
                raise ValueError(f"class_names has a duplicate name {name!r} ({where}); each name must belong to "
                                 "one class (a duplicate's score equals the first's, so it could never win)")
            seen[key] = i


def default_templates() -> tuple[Callable[[str], str], ...]:
    """open_clip's 80 OpenAI ImageNet prompt templates."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


def _render(template: str | Callable[[str], str], name: str) -> str:
    if callable(template):
        return template(name)
    return template.format(name)


@torch.no_grad()
def text_embeddings(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    *,
    device: torch.device,
    chunk: int = 512,
) -> Tensor:
    """Prompt-ensembled text embeddings: [len(names), D] float32, unit norm.

    Each name is put in every template, encoded, L2-normalised; the mean over
    templates is L2-normalised again (CLIP's zero-shot recipe).
    """
    if not templates:
        raise ValueError("templates is empty: give at least one prompt template such as '{}' or 'a photo of a {}.'")
    prompts = [_render(t, n) for n in names for t in templates]
    out = []
    for i in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[i:i + chunk]).to(device)
        emb = model.encode_text(tokens).float()
        out.append(F.normalize(emb, dim=-1))
    emb = torch.cat(out).reshape(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


# --------------------------------------------------------------------------- dense image features
def check_visual(visual: nn.Module) -> None:
    """Raise a clear error unless ``visual`` is an open_clip ViT we can run densely."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"dense features need an open_clip VisionTransformer image tower, got {type(visual).__name__}; "
            "use a ViT model such as 'ViT-B-16' (ResNet and timm towers are not supported)"
        )
    last = visual.transformer.resblocks[-1]
    if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
        raise ValueError(
            f"the last vision block is a {type(last).__name__}; ovss_fast supports open_clip ViTs whose blocks use "
            "nn.MultiheadAttention (e.g. 'ViT-B-16', 'ViT-L-14')"
        )
    if visual.attn_pool is not None:
        raise ValueError("open_clip ViTs with an attentional pooler (CoCa) are not supported for dense features")


class DenseCLIP:
    """Dense features and last-block attention of an open_clip ViT image tower.

    ``DenseCLIP(visual, features="clip")(x, need_attention=True)`` with x [B, 3, hP, wP]
    (already normalised with CLIP's mean/std) returns (feats [B, N, D] in the model's
    dtype, attention [B, N, N] float32 or None).

    features "clip": plain CLIP patch tokens (final block output -> ln_post -> proj).
    features "self_self": in the last block, the query-key attention is replaced by
    (softmax(q q^T) + softmax(k k^T)) / 2 applied to v, through out_proj, and the
    block's residual and MLP are skipped (SCLIP's correlative self-attention with
    ClearCLIP's removal of the residual and feed-forward paths); then ln_post -> proj.
    """

    def __init__(self, visual: nn.Module, *, features: str = "clip") -> None:
        check_visual(visual)
        if features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(map(repr, FEATURES))}; got {features!r}")
        self.visual = visual
        self.features = features
        self.patch = tuple(visual.patch_size)
        self.heads = visual.transformer.resblocks[-1].attn.num_heads
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """[1 + h*w, width]: the class position plus the patch grid, bicubically resized."""
        pos = self.visual.positional_embedding
        if tuple(grid) == tuple(self.visual.grid_size):
            return pos
        key = (int(grid[0]), int(grid[1]))
        cached = self._pos_cache.get(key)
        if cached is not None and cached.device == pos.device and cached.dtype == pos.dtype:
            return cached
        g0, g1 = self.visual.grid_size
        cls, patches = pos[:1], pos[1:]
        width = patches.shape[-1]
        patches = patches.float().reshape(1, g0, g1, width).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=key, mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(key[0] * key[1], width).to(pos.dtype)
        out = torch.cat([cls, patches])
        self._pos_cache[key] = out
        return out

    def _heads(self, t: Tensor) -> Tensor:
        B, L, W = t.shape
        return t.reshape(B, L, self.heads, W // self.heads).transpose(1, 2)  # [B, H, L, dh]

    @torch.no_grad()
    def __call__(self, x: Tensor, *, need_attention: bool = True) -> tuple[Tensor, Tensor | None]:
        v = self.visual
        B, _, H, W = x.shape
        ph, pw = self.patch
        if H % ph or W % pw or H == 0 or W == 0:
            raise ValueError(f"image crop of size {H}x{W} is not a positive multiple of the patch size {ph}x{pw}")
        grid = (H // ph, W // pw)
        x = v.conv1(x.to(self.dtype))  # [B, width, h, w]
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)  # [B, N, width]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        x = v.ln_pre(x)

        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)

        last = blocks[-1]
        mha = last.attn
        y = last.ln_1(x)
        q, k, val = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, val = self._heads(q), self._heads(k), self._heads(val)  # [B, H, L, dh]
        scale = q.shape[-1] ** -0.5

        def probs(a: Tensor, b: Tensor) -> Tensor:  # softmax in float32 whatever the model dtype
            return torch.softmax((a.float() * scale) @ b.float().transpose(-1, -2), dim=-1)

        attn_qk = probs(q, k)  # [B, H, L, L]
        attention = attn_qk[:, :, 1:, 1:].mean(dim=1) if need_attention else None  # [B, N, N]
        if self.features == "clip":
            o = (attn_qk.to(val.dtype) @ val).transpose(1, 2).reshape(x.shape)
            x = x + last.ls_1(mha.out_proj(o))
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        else:
            del attn_qk
            ss = (probs(q, q) + probs(k, k)) * 0.5
            o = (ss.to(val.dtype) @ val).transpose(1, 2).reshape(x.shape)
            x = mha.out_proj(o)
        tokens = v.ln_post(x[:, 1:])
        if v.proj is not None:
            tokens = tokens @ v.proj.to(tokens.dtype)
        return tokens, attention


def normalise(x01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP input, (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


def preprocess_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the model's open_clip preprocess config, else OpenAI's."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg: dict[str, Any] = getattr(getattr(model, "visual", model), "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean") or OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or OPENAI_DATASET_STD)
    return mean, std
