"""Dense CLIP features for segmentation, on open_clip or HuggingFace transformers Vision Transformers.

One forward of the visual tower gives, for a crop whose sides are multiples of the
patch size (P):

- patch features ``feats`` [B, N, D]: the last block's patch outputs through
  ``ln_post`` and ``proj``, with the last block as one of the field's dense-feature
  methods publishes it (``features=``: "clip" plain tokens as the DSLO paper uses,
  "maskclip", "sclip", "clearclip", "naclip"; :data:`FEATURE_PRESETS`);
- the last block's plain query-key self-attention averaged over heads,
  patch-to-patch part [B, N, N] (the "clip" affinity), from the same forward.

N = h * w with (h, w) = (crop height / P, crop width / P); the positional
embedding is interpolated bicubically for grids other than the model's own
(``pos_interp=``: "size", or the peers' "scale_factor=(g + 0.1) / g0").

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovss_fast.errors import InputError, InputTypeError

#: Name of a tiny open_clip config (ViT, width 64, 2 layers, patch 16, 64 px; text width 64, 2 layers;
#: embedding 32) registered by :func:`register_tiny_config`; for tests and offline smoke runs with
#: random weights only.
TINY_MODEL = "ovss-fast-tiny"

_TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

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
        raise InputTypeError(
            f"class_names must be a list of strings or a comma-separated string, got {type(class_names).__name__}"
        )
    if not entries:
        raise InputError("class_names is empty: give at least one class, e.g. ['cat; kitten', 'dog', 'grass']")
    classes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise InputTypeError(f"class_names[{i}] must be a string, got {type(entry).__name__}")
        synonyms = [s.strip() for s in entry.split(";") if s.strip()]
        if not synonyms:
            raise InputError(f"class_names[{i}] = {entry!r} names no class (empty after splitting on ';')")
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
                raise InputError(f"class_names has a duplicate name {name!r} ({where}); each name must belong to "
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
        raise InputError("templates is empty: give at least one prompt template such as '{}' or 'a photo of a {}.'")
    prompts = [_render(t, n) for n in names for t in templates]
    out = []
    for i in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[i:i + chunk]).to(device)
        emb = model.encode_text(tokens).float()
        out.append(F.normalize(emb, dim=-1))
    emb = torch.cat(out).reshape(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


# --------------------------------------------------------------------------- dense image features
@dataclass(frozen=True)
class FeaturePreset:
    """What a dense-feature method changes in the last ViT block (peers.md, "Dense features").

    attention: the attention applied to v, per head, with a = q, k and softmax(a b^T / sqrt(d)):
    "qk" softmax(q k^T); "qq+kk" softmax(q q^T) + softmax(k k^T), summed; "qq" softmax(q q^T);
    "kk+gauss" softmax(k k^T / sqrt(d) + G), G a Gaussian of the patch-grid distance; "identity"
    each token attends to itself only (v through out_proj).
    residual: x + out_proj(attn v) (kept) or out_proj(attn v) alone (removed).
    mlp: the block's feed-forward branch (ln_2, MLP, residual) kept or removed.
    """

    attention: str
    residual: bool
    mlp: bool
    method: str


#: The dense-feature presets: each published method's default last block (peers.md's table).
FEATURE_PRESETS: dict[str, FeaturePreset] = {
    "clip": FeaturePreset("qk", residual=True, mlp=True, method="plain CLIP patch tokens"),
    "maskclip": FeaturePreset("identity", residual=False, mlp=False,
                              method="MaskCLIP: v through out_proj, no residual, no MLP"),
    "maskclip-res": FeaturePreset("identity", residual=True, mlp=True,
                                  method="MaskCLIP as CLIP-DINOiser's and LPOSS's code run it: v through out_proj, "
                                         "residual and MLP kept"),
    "sclip": FeaturePreset("qq+kk", residual=True, mlp=True,
                           method="SCLIP correlative self-attention, softmax(qq^T) + softmax(kk^T)"),
    "clearclip": FeaturePreset("qq", residual=False, mlp=False,
                               method="ClearCLIP: softmax(qq^T), no residual, no MLP"),
    "naclip": FeaturePreset("kk+gauss", residual=False, mlp=False,
                            method="NACLIP: softmax(kk^T / sqrt(d) + Gaussian(std 5)), no residual, no MLP"),
}
FEATURES = tuple(FEATURE_PRESETS)
#: NACLIP's default standard deviation (in patches) of the Gaussian neighbourhood term.
NACLIP_STD = 5.0
#: Positional-embedding interpolation: "size" (F.interpolate(size=grid), HF's interpolate_pos_encoding too)
#: or "peers" (scale_factor=((h + 0.1) / g0, (w + 0.1) / g1), as SCLIP / ClearCLIP / NACLIP do).
POS_INTERP = ("size", "peers")

_REMOVED_FEATURES = {
    "self_self": "features='self_self' (the average of softmax(qq^T) and softmax(kk^T) without residual and MLP) "
                 "matched no published method and was removed; use 'sclip' (the two softmaxes summed, residual and "
                 "MLP kept) or 'clearclip' (softmax(qq^T), residual and MLP removed)",
}


def check_features(features: object) -> str:
    """``features`` if it names a preset of :data:`FEATURE_PRESETS`, else a ValueError listing them."""
    if isinstance(features, str) and features in _REMOVED_FEATURES:
        raise InputError(_REMOVED_FEATURES[features])
    if not isinstance(features, str) or features not in FEATURE_PRESETS:
        raise InputError(f"features must be one of {', '.join(map(repr, FEATURES))}; got {features!r}")
    return features


def check_pos_interp(pos_interp: object) -> str:
    if not isinstance(pos_interp, str) or pos_interp not in POS_INTERP:
        raise InputError(f"pos_interp must be one of {', '.join(map(repr, POS_INTERP))}; got {pos_interp!r}")
    return pos_interp


def interpolate_positions(pos: Tensor, grid0: tuple[int, int], grid: tuple[int, int], how: str = "size") -> Tensor:
    """[1 + g0*g1, W] positional embedding -> [1 + h*w, W] for grid (h, w), bicubic, class position kept.

    how "size": ``F.interpolate(size=(h, w))``; "peers": ``scale_factor=((h + 0.1) / g0, (w + 0.1) / g1)``
    without recompute_scale_factor (the legacy DINO/timm trick SCLIP, ClearCLIP and NACLIP use).
    Interpolated in float32, returned in pos's dtype.
    """
    g0, g1 = grid0
    h, w = int(grid[0]), int(grid[1])
    cls, patches = pos[:1], pos[1:]
    width = patches.shape[-1]
    patches = patches.float().reshape(1, g0, g1, width).permute(0, 3, 1, 2)
    if how == "size":
        patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
    elif how == "peers":
        patches = F.interpolate(patches, scale_factor=((h + 0.1) / g0, (w + 0.1) / g1), mode="bicubic",
                                align_corners=False)
    else:
        check_pos_interp(how)
    if tuple(patches.shape[-2:]) != (h, w):  # pragma: no cover - floor(g * (h + 0.1) / g) == h for h >= 1
        raise RuntimeError(f"positional interpolation gave a {tuple(patches.shape[-2:])} grid, expected {(h, w)}")
    patches = patches.permute(0, 2, 3, 1).reshape(h * w, width).to(pos.dtype)
    return torch.cat([cls, patches])


def naclip_gaussian(grid: tuple[int, int], std: float = NACLIP_STD, *, device: torch.device | None = None) -> Tensor:
    """[1 + N, 1 + N] float32: exp(-|p_i - p_j|^2 / (2 std^2)) for patches i, j at grid positions p (row-major),
    0 in the class token's row and column."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    p = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)  # [N, 2]
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    g = torch.zeros(h * w + 1, h * w + 1, device=device, dtype=torch.float32)
    g[1:, 1:] = torch.exp(-d2 / (2.0 * std * std))
    return g


class _OpenCLIPTower:
    """An open_clip VisionTransformer seen as what DenseCLIP needs."""

    def __init__(self, visual: nn.Module) -> None:
        check_visual(visual)
        self.module = visual
        self.patch = tuple(visual.patch_size)
        self.grid_size = tuple(visual.grid_size)
        last = visual.transformer.resblocks[-1]
        self.heads = last.attn.num_heads
        self.last = last
        self.conv = visual.conv1
        self.class_embedding = visual.class_embedding
        self.ln_pre = visual.ln_pre

    @property
    def positions(self) -> Tensor:
        return self.module.positional_embedding

    def blocks(self, x: Tensor) -> Tensor:
        tr = self.module.transformer
        batch_first = getattr(tr, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in tr.resblocks[:-1]:
            x = blk(x)
        return x if batch_first else x.transpose(0, 1)

    def ln_1(self, x: Tensor) -> Tensor:
        return self.last.ln_1(x)

    def qkv(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mha = self.last.attn
        return F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)

    def out_proj(self, o: Tensor) -> Tensor:
        return self.last.attn.out_proj(o)

    def residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + self.last.ls_1(out)

    def mlp(self, x: Tensor) -> Tensor:
        return x + self.last.ls_2(self.last.mlp(self.last.ln_2(x)))

    def head(self, tokens: Tensor) -> Tensor:
        tokens = self.module.ln_post(tokens)
        proj = self.module.proj
        return tokens if proj is None else tokens @ proj.to(tokens.dtype)


class _HFTower:
    """A HuggingFace transformers CLIP vision tower (plus its visual_projection) seen as what DenseCLIP needs."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None) -> None:
        emb = vision.embeddings
        p = emb.patch_size
        self.module = vision
        self.patch = (p, p) if isinstance(p, int) else tuple(p)
        g = emb.image_size // self.patch[0]
        self.grid_size = (g, emb.image_size // self.patch[1])
        self.layers = vision.encoder.layers
        self.last = self.layers[-1]
        self.heads = int(self.last.self_attn.num_heads)
        self.conv = emb.patch_embedding
        self.class_embedding = emb.class_embedding
        self.ln_pre = vision.pre_layrnorm
        self.projection = projection

    @property
    def positions(self) -> Tensor:
        return self.module.embeddings.position_embedding.weight

    def blocks(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            try:
                out = layer(x, attention_mask=None)  # transformers 5
            except TypeError:
                out = layer(x, None, None)  # transformers 4: (hidden, attention_mask, causal_attention_mask)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def ln_1(self, x: Tensor) -> Tensor:
        return self.last.layer_norm1(x)

    def qkv(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.last.self_attn
        return a.q_proj(y), a.k_proj(y), a.v_proj(y)

    def out_proj(self, o: Tensor) -> Tensor:
        return self.last.self_attn.out_proj(o)

    def residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + out

    def mlp(self, x: Tensor) -> Tensor:
        return x + self.last.mlp(self.last.layer_norm2(x))

    def head(self, tokens: Tensor) -> Tensor:
        tokens = self.module.post_layernorm(tokens)
        return tokens if self.projection is None else self.projection(tokens)


def hf_vision_parts(module: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """(vision tower, visual_projection) of a transformers CLIP model / vision model, or None if it is not one."""
    projection = getattr(module, "visual_projection", None)
    vision = module
    for _ in range(3):  # CLIPModel.vision_model(.vision_model in transformers 4) -> the tower with .embeddings
        if all(hasattr(vision, a) for a in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")):
            return vision, projection
        vision = getattr(vision, "vision_model", None)
        if vision is None:
            return None
    return None


def _tower(visual: nn.Module) -> _OpenCLIPTower | _HFTower:
    hf = hf_vision_parts(visual)
    if hf is not None:
        return _HFTower(*hf)
    return _OpenCLIPTower(visual)


def check_visual(visual: nn.Module) -> None:
    """Raise a clear error unless ``visual`` is an open_clip ViT we can run densely."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise InputError(
            f"dense features need an open_clip VisionTransformer image tower or a transformers CLIP model, got "
            f"{type(visual).__name__}; use a ViT model such as 'ViT-B-16' or 'hf:openai/clip-vit-base-patch16' "
            "(ResNet and timm towers are not supported)"
        )
    last = visual.transformer.resblocks[-1]
    if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
        raise InputError(
            f"the last vision block is a {type(last).__name__}; ovss_fast supports open_clip ViTs whose blocks use "
            "nn.MultiheadAttention (e.g. 'ViT-B-16', 'ViT-L-14')"
        )
    if visual.attn_pool is not None:
        raise InputError("open_clip ViTs with an attentional pooler (CoCa) are not supported for dense features")


class DenseCLIP:
    """Dense features and last-block attention of a CLIP ViT image tower (open_clip or transformers).

    ``DenseCLIP(visual, features="clip")(x, need_attention=True)`` with x [B, 3, hP, wP]
    (already normalised with CLIP's mean/std) returns (feats [B, N, D] in the model's
    dtype, attention [B, N, N] float32 or None).

    visual: an open_clip ``VisionTransformer`` (``model.visual``), or a transformers
    ``CLIPModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPVisionModel`` (no projection:
    features of the tower's width).

    features: a preset of :data:`FEATURE_PRESETS` - the last block's attention, residual
    and MLP as each method publishes them ("clip", "maskclip", "sclip", "clearclip",
    "naclip"); blocks 1..L-1 run unchanged and every preset ends with ln_post and proj.
    Softmaxes are taken in float32 whatever the model dtype.

    The attention returned (the "clip" affinity) is always the last block's plain
    softmax(q k^T / sqrt(d)), averaged over heads, patch-to-patch part, whatever the preset.

    pos_interp: how the positional embedding is resized for grids other than the
    model's own (:data:`POS_INTERP`; see :func:`interpolate_positions`).
    """

    def __init__(self, visual: nn.Module, *, features: str = "clip", pos_interp: str = "size",
                 naclip_std: float = NACLIP_STD) -> None:
        self.features = check_features(features)
        self.preset = FEATURE_PRESETS[features]
        self.pos_interp = check_pos_interp(pos_interp)
        if isinstance(naclip_std, bool) or not isinstance(naclip_std, (int, float)) or not naclip_std > 0:
            raise InputError(f"naclip_std must be a positive number, got {naclip_std!r}")
        self.naclip_std = float(naclip_std)
        self.tower = _tower(visual)
        self.visual = visual
        self.patch = self.tower.patch
        self.heads = self.tower.heads
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self._gauss_cache: dict[tuple[int, int], Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.conv.weight.dtype

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """[1 + h*w, width]: the class position plus the patch grid, bicubically resized."""
        pos = self.tower.positions
        if tuple(grid) == tuple(self.tower.grid_size):
            return pos
        key = (int(grid[0]), int(grid[1]))
        cached = self._pos_cache.get(key)
        if cached is not None and cached.device == pos.device and cached.dtype == pos.dtype:
            return cached
        out = interpolate_positions(pos, self.tower.grid_size, key, self.pos_interp)
        self._pos_cache[key] = out
        return out

    def _gaussian(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        g = self._gauss_cache.get(grid)
        if g is None or g.device != device:
            g = naclip_gaussian(grid, self.naclip_std, device=device)
            self._gauss_cache[grid] = g
        return g

    def _heads(self, t: Tensor) -> Tensor:
        B, L, W = t.shape
        return t.reshape(B, L, self.heads, W // self.heads).transpose(1, 2)  # [B, H, L, dh]

    @torch.no_grad()
    def __call__(self, x: Tensor, *, need_attention: bool = True) -> tuple[Tensor, Tensor | None]:
        t = self.tower
        B, _, H, W = x.shape
        ph, pw = self.patch
        if H % ph or W % pw or H == 0 or W == 0:
            raise InputError(f"image crop of size {H}x{W} is not a positive multiple of the patch size {ph}x{pw}")
        grid = (H // ph, W // pw)
        x = t.conv(x.to(self.dtype))  # [B, width, h, w]
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)  # [B, N, width]
        cls = t.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        x = t.blocks(t.ln_pre(x))

        y = t.ln_1(x)
        q, k, val = (self._heads(a) for a in t.qkv(y))  # [B, H, L, dh]
        scale = q.shape[-1] ** -0.5

        def logits(a: Tensor, b: Tensor) -> Tensor:  # in float32 whatever the model dtype
            return (a.float() * scale) @ b.float().transpose(-1, -2)

        kind = self.preset.attention
        attention = None
        if need_attention or kind == "qk":
            attn_qk = torch.softmax(logits(q, k), dim=-1)  # [B, H, L, L]
            if need_attention:
                attention = attn_qk[:, :, 1:, 1:].mean(dim=1)  # [B, N, N]
        if kind == "qk":
            attn = attn_qk
        elif kind == "qq+kk":
            attn = torch.softmax(logits(q, q), dim=-1) + torch.softmax(logits(k, k), dim=-1)
        elif kind == "qq":
            attn = torch.softmax(logits(q, q), dim=-1)
        elif kind == "kk+gauss":
            attn = torch.softmax(logits(k, k) + self._gaussian(grid, x.device), dim=-1)
        else:  # "identity": each token attends to itself
            attn = None
        o = val if attn is None else attn.to(val.dtype) @ val
        out = t.out_proj(o.transpose(1, 2).reshape(x.shape))
        x = t.residual(x, out) if self.preset.residual else out
        if self.preset.mlp:
            x = t.mlp(x)
        return t.head(x[:, 1:]), attention


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
