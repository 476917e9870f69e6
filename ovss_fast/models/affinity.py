"""Patch-to-patch affinity sources for the segmentation pipeline.

Every source returns a non-negative affinity [B, N, N] on the CLIP patch grid
(h, w), N = h * w, for the crop the CLIP features were computed on:

- "clip" (default, no extra weights): head-averaged self-attention of CLIP's last
  block, patch-to-patch part, computed in the same forward pass as the features
  (:class:`ovss_fast.models.clip_features.DenseCLIP`); it has no object here.
- "sd2" (:class:`SD2Affinity`, needs ``pip install 'ovss_fast[sd]'``): Stable
  Diffusion 2 UNet self-attention, the paper's choice.
- "dino" (:class:`DinoAffinity`, needs timm): cosine affinity of DINO ViT patch
  features, clamped at 0.
- for head "lposs" the source hands patch FEATURES [B, N, D] for LPOSS's kNN graph instead
  (:func:`patch_features_of`): "dino" builds LPOSS's DINO ViT-B/16 (:data:`LPOSS_DINO`) and gives
  its last block's value features (:meth:`DinoAffinity.features`), a callable gives what it returns.
- any callable ``fn(image, grid) -> [B, N, N]``, where ``image`` is the crop as
  [B, 3, H, W] float32 RGB in [0, 1] (not normalised) and ``grid`` is (h, w). The
  Segmenter calls it once per chunk of windows (B = the chunk's crops); a source with a
  ``memory_per_crop(grid) -> bytes`` method has that counted when chunks are sized.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovss_fast.errors import InputError, InputTypeError, ModelLoadError
from ovss_fast.models.loading import load_failure

AffinityFn = Callable[[Tensor, tuple[int, int]], Tensor]

BUILTIN = ("clip", "sd2", "dino")

#: Hub id used by :class:`SD2Affinity` when no local directory is given.
SD2_DEFAULT = "stabilityai/stable-diffusion-2-1-base"
#: ``weights`` (or ``affinity_weights``) that build SD2 from its published configuration with RANDOM weights
#: (``random:sd2:SEED`` picks the seed; tests and timing only: the affinities are meaningless)
SD2_RANDOM = "random:sd2"
#: timm name used by :class:`DinoAffinity` when no model is given.
DINO_DEFAULT = "vit_small_patch16_224.dino"
#: timm name of LPOSS's DINO (torch hub ``dino_vitb16``: ViT-B/16), the "dino" source of head "lposs"
LPOSS_DINO = "vit_base_patch16_224.dino"
#: ``weights`` (or ``affinity_weights``) that build the DINO architecture with RANDOM weights (``random:dino:SEED``
#: picks the seed; tests and timing only: the features are meaningless)
DINO_RANDOM = "random:dino"
#: (image [B, 3, H, W] in [0, 1], grid (h, w)) -> patch features [B, h * w, D] (head "lposs"'s graph)
FeaturesFn = Callable[[Tensor, tuple[int, int]], Tensor]


def check_affinity(affinity: object, n: int, batch: int, source: str) -> Tensor:
    """Validate what an affinity source returned: [batch, n, n], finite, non-negative."""
    if not isinstance(affinity, Tensor):
        raise InputTypeError(f"affinity source {source} returned {type(affinity).__name__}, expected a tensor "
                             "[B, N, N]")
    if tuple(affinity.shape) != (batch, n, n):
        raise InputError(
            f"affinity source {source} returned shape {tuple(affinity.shape)}, expected [B, N, N] = "
            f"{(batch, n, n)} on the CLIP patch grid"
        )
    affinity = affinity.detach().float()
    if not bool(torch.isfinite(affinity).all()):
        raise InputError(f"affinity source {source} returned NaN or Inf values")
    if bool((affinity < 0).any()):
        raise InputError(
            f"affinity source {source} returned negative values (min {float(affinity.min()):g}); "
            "affinities must be non-negative"
        )
    return affinity


def resize_attention(attn: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Resize an attention map [B, n, n] on grid ``src`` to [B, N, N] on grid ``dst``.

    Both the key axis and the query axis are resized bilinearly (area-averaged when
    shrinking, which keeps each row's mass spread as in the source).
    """
    B, n, m = attn.shape
    sh, sw = src
    dh, dw = dst
    if n != sh * sw or m != sh * sw:
        raise ValueError(f"attention of shape {tuple(attn.shape)} does not match its grid {src}")
    if (sh, sw) == (dh, dw):
        return attn

    def resize(x: Tensor) -> Tensor:  # [M, 1, sh, sw] -> [M, 1, dh, dw]
        if dh <= sh and dw <= sw:
            return F.adaptive_avg_pool2d(x, (dh, dw))
        return F.interpolate(x, size=(dh, dw), mode="bilinear", align_corners=False)

    a = resize(attn.reshape(B * n, 1, sh, sw)).reshape(B, n, dh * dw)  # keys
    a = a.transpose(1, 2).reshape(B * dh * dw, 1, sh, sw)
    a = resize(a).reshape(B, dh * dw, dh * dw).transpose(1, 2)  # queries
    return a.clamp_min(0).contiguous()


# --------------------------------------------------------------------------- Stable Diffusion 2
class _CaptureSelfAttention:
    """diffusers attention processor that computes attention like ``AttnProcessor``
    and appends (``name``, the head-averaged probabilities [B, n, n] in float32) to ``store``."""

    def __init__(self, store: list[tuple[str, Tensor]], name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif getattr(attn, "norm_cross", False):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [batch * heads, seq, seq]
        self.store.append((self.name, probs.float().reshape(batch, -1, seq, probs.shape[-1]).mean(dim=1)))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if getattr(attn, "residual_connection", False):
            hidden_states = hidden_states + residual
        return hidden_states / getattr(attn, "rescale_output_factor", 1.0)


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "affinity='sd2' needs diffusers and transformers, which are not installed: "
            "pip install 'ovss_fast[sd]' (or use affinity='clip', which needs no extra weights)"
        ) from err
    return diffusers


def _to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module


class _UNetStopped(Exception):
    """Raised by :func:`_stop_unet` to end the UNet's forward pass once the captured blocks have run."""


def _stop_unet(module: nn.Module, args: Any, output: Any) -> None:
    raise _UNetStopped


def _random_seed(weights: str, prefix: str = SD2_RANDOM) -> int:
    """The seed of ``random:sd2`` (0) or ``random:sd2:SEED`` (``prefix``: the source's, ``random:dino``)."""
    rest = weights[len(prefix):]
    if rest == "":
        return 0
    if rest.startswith(":") and rest[1:].lstrip("-").isdigit():
        return int(rest[1:])
    what = "SD2" if prefix == SD2_RANDOM else "DINO"
    raise InputError(f"{what} random weights are {prefix!r} or '{prefix}:SEED' (an integer), got {weights!r}")


def _random_sd2(seed: int, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor]:
    """Stable Diffusion 2's UNet, VAE and empty-prompt embedding [1, 77, 1024] at their real size with random
    weights, from :mod:`ovss_fast.models.sd2_config` (float32; built on ``device``; the caller's RNG is left
    as it was)."""
    import warnings

    diffusers = _require_diffusers()
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as err:
        raise ImportError("affinity='sd2' needs transformers for the empty-prompt embedding: "
                          "pip install 'ovss_fast[sd]'") from err
    from ovss_fast.models import sd2_config

    warnings.warn(
        f"SD2Affinity with RANDOM weights ({sd2_config.MODEL} architecture, seed {seed}): the affinities are "
        "meaningless; use this for tests, timing and memory only (pass the real weights' directory for results)",
        UserWarning, stacklevel=3,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel.from_config(sd2_config.UNET)
        vae = diffusers.AutoencoderKL.from_config(sd2_config.VAE)
        encoder = CLIPTextModel(CLIPTextConfig(**sd2_config.TEXT_ENCODER)).eval()
        ids = torch.tensor([sd2_config.empty_prompt_ids()], device=device)
        with torch.no_grad():
            uncond = encoder(ids)[0]
        del encoder
    return unet, vae, uncond


class SD2Affinity:
    """Stable Diffusion 2 UNet self-attention as a patch affinity (the DSLO paper's choice).

    ``SD2Affinity(weights)(image, grid) -> [B, N, N]``: the crop (RGB in [0, 1]) is
    resized to (32 h', 32 w') pixels, h' and w' being h and w rounded up to even
    numbers (so the latent is a multiple of 8 and the first attention-carrying
    up-block runs on about the CLIP grid), encoded by the VAE (the latent
    distribution's mean times the scaling factor: noise-free), and the UNet runs one
    unconditional step (the empty prompt's text embedding) at ``timestep``. The
    self-attention (attn1) probabilities of every transformer layer in the first
    ``blocks`` attention-carrying up-blocks are averaged over heads, each resized to
    the CLIP grid, and averaged over layers. The UNet stops once those blocks have run
    (``stop_early``; its output is not used).

    weights: a local diffusers directory (with unet/, vae/, text_encoder/, tokenizer/)
    or a hub id (downloaded by diffusers when online), or ``"random:sd2[:SEED]"``
    (:meth:`from_config`: the published architecture with RANDOM weights, offline;
    meaningless affinities, for tests and timing). Researchers can pass ``unet``,
    ``vae`` and ``uncond_embedding`` [1, L, cross_attention_dim] directly.

    Needs ``pip install 'ovss_fast[sd]'``. Untested against the real SD2 weights in
    this repository's CI (no network there); the tests run the same code on a small
    random-weight UNet and VAE, and on the real-size architecture with random weights
    (tests/test_sd2_real.py), when diffusers is installed.
    """

    def __init__(self, weights: str | None = SD2_DEFAULT, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, timestep: int = 0, blocks: int = 2,
                 unet: nn.Module | None = None, vae: nn.Module | None = None,
                 uncond_embedding: Tensor | None = None) -> None:
        diffusers = _require_diffusers()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.timestep = int(timestep)
        #: stop the UNet once the last hooked block has run (its output is not used); False runs it to the end
        self.stop_early = True
        if isinstance(weights, str) and weights.startswith(SD2_RANDOM) and (unet is None or vae is None
                                                                            or uncond_embedding is None):
            seed = _random_seed(weights)
            r_unet, r_vae, r_uncond = _random_sd2(seed, self.device)
            unet = r_unet if unet is None else unet
            vae = r_vae if vae is None else vae
            uncond_embedding = r_uncond if uncond_embedding is None else uncond_embedding
        if unet is None or vae is None or uncond_embedding is None:
            if weights is None:
                raise InputError("SD2Affinity needs weights (a local diffusers directory or a hub id) "
                                 "unless unet, vae and uncond_embedding are all given")
            weights = os.fspath(weights)
            local = os.path.isabs(weights) or weights.startswith((".", "~")) or os.path.exists(weights)
            if local and not os.path.isdir(os.path.expanduser(weights)):
                raise FileNotFoundError(
                    f"Stable Diffusion 2 directory {weights!r} not found; pass "
                    "affinity_weights=/path/to/stable-diffusion-2-1-base, a local diffusers directory with unet/, "
                    "vae/, text_encoder/ and tokenizer/"
                )
            weights = os.path.expanduser(weights) if local else weights
        try:
            if unet is None:
                unet = diffusers.UNet2DConditionModel.from_pretrained(weights, subfolder="unet",
                                                                      torch_dtype=self.dtype)
            if vae is None:
                vae = diffusers.AutoencoderKL.from_pretrained(weights, subfolder="vae", torch_dtype=self.dtype)
            if uncond_embedding is None:
                uncond_embedding = self._empty_prompt_embedding(weights)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"could not load Stable Diffusion 2 weights from {weights!r}: {load_failure(exc)}. "
                "Pass affinity_weights=/path/to/stable-diffusion-2-1-base, a local diffusers directory with "
                "unet/, vae/, text_encoder/ and tokenizer/ (download it once when online, e.g. with "
                "huggingface-cli download stabilityai/stable-diffusion-2-1-base)"
            ) from exc
        self.unet = _to(unet, self.device, self.dtype).eval()
        self.vae = _to(vae, self.device, self.dtype).eval()
        self.uncond = uncond_embedding.to(self.device, self.dtype)
        self._store: list[tuple[str, Tensor]] = []
        carrying = [i for i, b in enumerate(self.unet.up_blocks) if getattr(b, "attentions", None)]
        if len(carrying) < blocks:
            raise InputError(f"the UNet has {len(carrying)} attention-carrying up-blocks, fewer than blocks={blocks}")
        #: the up-blocks whose self-attention is captured (the first ``blocks`` attention-carrying ones)
        self.hooked_blocks = [f"up_blocks.{i}" for i in carrying[:blocks]]
        #: the attn1 modules captured, in the order they run; ``last_captured`` lists (name, tokens) of the maps
        #: captured in the last call, tokens being the map's side n (it is [B, n, n])
        self.hooked: list[str] = []
        self.last_captured: list[tuple[str, int]] = []
        self._capture_sizes: list[tuple[int, int]] = []
        for i in carrying[:blocks]:
            for j, transformer in enumerate(self.unet.up_blocks[i].attentions):
                for k, tb in enumerate(transformer.transformer_blocks):
                    name = f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn1"
                    tb.attn1.set_processor(_CaptureSelfAttention(self._store, name))
                    self.hooked.append(name)
                    # (heads, the latent's tokens per captured token): block i runs at 1 / 2^(last - i) per side
                    self._capture_sizes.append((int(tb.attn1.heads), 4 ** (len(self.unet.up_blocks) - 1 - i)))
        self.layers = len(self.hooked)
        self._last_block = self.unet.up_blocks[carrying[blocks - 1]]

    @classmethod
    def from_config(cls, seed: int = 0, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, timestep: int = 0, blocks: int = 2) -> SD2Affinity:
        """Stable Diffusion 2 at its real size with RANDOM weights, built offline from its published
        configuration (:mod:`ovss_fast.models.sd2_config`; nothing is downloaded): the UNet, the VAE and the
        empty prompt's encoding by a random text encoder, all seeded by ``seed``. The affinities are
        meaningless (a warning says so): for tests, timing and memory only. Same as
        ``SD2Affinity(f"random:sd2:{seed}", ...)`` (``--affinity-weights random:sd2`` on the command line).
        """
        return cls(f"{SD2_RANDOM}:{int(seed)}", device=device, dtype=dtype, timestep=timestep, blocks=blocks)

    def memory_per_crop(self, grid: tuple[int, int]) -> int:
        """Rough, conservative bytes one crop holds in one call (Segmenter sizes its window chunks with it).

        In the models' dtype: the VAE encoder, 4 x 128 channels at the resized crop's P pixels; at
        the latent's L = P / 64 tokens, 30 x L x 320 UNet activations and one L x L score matrix
        (the uncaptured attention runs through scaled_dot_product_attention, which holds no L x L
        on its flash and memory-efficient kernels: one head's worth is a margin for its math
        kernel); the captured layers' scores and probabilities (2 x heads x n x n, n = L / 16 for
        up_blocks.1 and L / 4 for up_blocks.2 of SD2; the largest layer, they are transient). In
        float32: the maps kept (n x n per captured layer). Measured at the voc21 whole image (grid
        21x28, float32 CPU): 2.6 GB estimated, 1.6 GB held (bench/RESULTS.md).
        """
        h, w = grid
        pixels = 32 * (h + h % 2) * 32 * (w + w % 2)
        tokens = pixels // 64  # the latent is 1/8 of the crop on each side
        e = torch.empty((), dtype=self.dtype).element_size()
        scores = max(2 * heads * (tokens // div) ** 2 * e for heads, div in self._capture_sizes)
        kept = sum((tokens // div) ** 2 * 4 for _, div in self._capture_sizes)
        return 4 * 128 * pixels * e + 30 * tokens * 320 * e + tokens * tokens * e + scores + kept

    @staticmethod
    def _empty_prompt_embedding(weights: str | None) -> Tensor:
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError(
                "affinity='sd2' needs transformers for the empty-prompt embedding: pip install 'ovss_fast[sd]'"
            ) from err
        tokenizer = CLIPTokenizer.from_pretrained(weights, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(weights, subfolder="text_encoder").eval()
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0]

    @torch.no_grad()
    def __call__(self, image: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        B = image.shape[0]
        size = (32 * (h + h % 2), 32 * (w + w % 2))
        x = F.interpolate(image.to(self.device, torch.float32), size=size, mode="bilinear",
                          align_corners=False, antialias=True)
        x = (2 * x - 1).to(self.dtype)
        latent = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        t = torch.full((B,), self.timestep, device=self.device, dtype=torch.long)
        self._store.clear()
        stop = self._last_block.register_forward_hook(_stop_unet) if self.stop_early else None
        try:
            self.unet(latent, t, encoder_hidden_states=self.uncond.expand(B, -1, -1))
        except _UNetStopped:
            pass
        finally:
            if stop is not None:
                stop.remove()
            captured = list(self._store)
            self._store.clear()
        self.last_captured = [(name, a.shape[-1]) for name, a in captured]
        if len(captured) != self.layers:
            raise RuntimeError(f"captured {len(captured)} self-attention maps, expected {self.layers}")
        lh, lw = latent.shape[-2:]
        out = torch.zeros(B, h * w, h * w, device=self.device, dtype=torch.float32)
        for _, a in captured:
            n = a.shape[-1]
            f = round((lh * lw / n) ** 0.5)  # the map's downsampling factor relative to the latent
            out += resize_attention(a, (lh // f, lw // f), (h, w))
        return out / len(captured)


# --------------------------------------------------------------------------- DINO
def _require_timm() -> Any:
    try:
        import timm
    except ImportError as err:
        raise ImportError("affinity='dino' needs timm: pip install 'ovss_fast[dino]'") from err
    return timm


class _ValueCaptured(Exception):
    """Raised by the qkv hook of :meth:`DinoAffinity.features` once the last block's qkv is computed."""


class DinoAffinity:
    """Cosine affinity of DINO ViT patch features: ``relu(cos(f_i, f_j))`` [B, N, N].

    The crop is resized so the DINO patch grid equals the CLIP grid (h, w), normalised
    with the model's mean/std, and ``forward_features`` gives the patch tokens (prefix
    tokens dropped). Negative cosines are clamped to 0 (affinities are non-negative).
    :meth:`features` gives LPOSS's patch features instead (head "lposs").

    weights: a local checkpoint file for the timm architecture ``arch`` (DINO ViT-S/16
    by default; head "lposs" builds :data:`LPOSS_DINO`, ViT-B/16); None downloads timm's
    pretrained weights when online; ``"random:dino[:SEED]"`` builds ``arch`` with RANDOM
    weights (offline; meaningless, for tests and timing). ``model``: an already-built timm
    ViT created with ``dynamic_img_size=True``.
    """

    def __init__(self, weights: str | None = None, *, arch: str = DINO_DEFAULT,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 model: nn.Module | None = None) -> None:
        timm = _require_timm()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if model is None and isinstance(weights, str) and weights.startswith(DINO_RANDOM):
            model = _random_dino(arch, _random_seed(weights, DINO_RANDOM))
        if model is None:
            if weights is not None and not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"DINO weights file {weights!r} not found; pass affinity_weights=/path/to/dino_checkpoint.pth "
                    f"(a state dict for timm's {arch!r})"
                )
            try:
                overlay = {"file": os.fspath(weights)} if weights is not None else None
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay,
                                          num_classes=0, dynamic_img_size=True)
            except Exception as exc:  # timm raises many kinds (download, unknown name, key mismatch)
                raise ModelLoadError(
                    f"could not build DINO model {arch!r} with weights {weights or 'from the hub'}: "
                    f"{load_failure(exc)}. Pass "
                    "affinity_weights=/path/to/dino_checkpoint.pth (a local state dict for that architecture)"
                ) from exc
        if not getattr(model, "dynamic_img_size", False):
            raise InputError("the DINO model must be a timm ViT created with dynamic_img_size=True")
        self.model = model.to(self.device, self.dtype).eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        ps = model.patch_embed.patch_size
        self.patch = (ps, ps) if isinstance(ps, int) else tuple(ps)

    def memory_per_crop(self, grid: tuple[int, int]) -> int:
        """Rough bytes one crop holds in one call (Segmenter sizes its window chunks with it): as for the
        CLIP tower, 12 x T x D + 2 x heads x T x T in the model's dtype, plus the float32 features and N x N."""
        n = grid[0] * grid[1]
        t = n + int(getattr(self.model, "num_prefix_tokens", 1))
        d = int(getattr(self.model, "embed_dim", 768))
        heads = int(self.model.blocks[0].attn.num_heads) if hasattr(self.model, "blocks") else 12
        e = torch.empty((), dtype=self.dtype).element_size()
        return 12 * t * d * e + 2 * heads * t * t * e + n * d * 4 + n * n * 4

    def _input(self, image: Tensor, grid: tuple[int, int]) -> Tensor:
        """The crops [B, 3, H, W] in [0, 1] at the DINO patch grid (h, w) (resized only when not already there),
        normalised with the model's mean / std, in the model's dtype."""
        h, w = grid
        x = image.to(self.device, torch.float32)
        size = (h * self.patch[0], w * self.patch[1])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - m) / s).to(self.dtype)

    def _patches(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens [B, T, D] -> the patch tokens [B, N, D] in float32, L2-normalised (prefix tokens dropped)."""
        prefix = getattr(self.model, "num_prefix_tokens", 1)
        f = F.normalize(tokens[:, prefix:].float(), dim=-1)
        if f.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"DINO returned {f.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
        return f

    @torch.no_grad()
    def __call__(self, image: Tensor, grid: tuple[int, int]) -> Tensor:
        f = self._patches(self.model.forward_features(self._input(image, grid)), grid)  # [B, N, D]
        return (f @ f.transpose(1, 2)).clamp_min(0)

    @torch.no_grad()
    def features(self, image: Tensor, grid: tuple[int, int]) -> Tensor:
        """LPOSS's patch features: the last block's attention VALUES [B, N, D] (heads side by side, float32,
        L2-normalised), as LPOSS hooks ``blocks[-1].attn.qkv`` of DINO ViT-B/16 and keeps its third part.

        The crops go in as for the affinity (at the DINO grid equal to the CLIP grid (h, w), the model's
        mean / std; LPOSS's 224-pixel windows with patch 16 need no resize); the forward stops once the
        last block's qkv projection has run."""
        attn = getattr(self.model.blocks[-1], "attn", None) if hasattr(self.model, "blocks") else None
        if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise InputError("DINO value features need a timm ViT whose last block's attention has a qkv projection "
                             "(blocks[-1].attn.qkv)")
        store: list[Tensor] = []

        def capture(module: nn.Module, args: Any, output: Tensor) -> None:
            store.append(output)
            raise _ValueCaptured

        handle = attn.qkv.register_forward_hook(capture)
        try:
            self.model.forward_features(self._input(image, grid))
        except _ValueCaptured:
            pass
        finally:
            handle.remove()
        qkv = store[0]  # [B, T, 3 * D]: q, k, v, each heads x head_dim
        B, T, _ = qkv.shape
        v = qkv.reshape(B, T, 3, int(attn.num_heads), -1)[:, :, 2].reshape(B, T, -1)
        return self._patches(v, grid)


def _random_dino(arch: str, seed: int) -> nn.Module:
    """timm's ``arch`` with RANDOM weights (nothing downloaded; the caller's RNG is left as it was), warned."""
    import warnings

    timm = _require_timm()
    warnings.warn(f"DinoAffinity with RANDOM weights ({arch}, seed {seed}): the features are meaningless; use this "
                  "for tests, timing and memory only (pass a checkpoint file for results)", UserWarning, stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
        except Exception as exc:  # an unknown name
            raise ModelLoadError(f"could not build DINO model {arch!r} with random weights: "
                                 f"{load_failure(exc)}") from exc


def check_patch_features(features: object, n: int, batch: int, source: str) -> Tensor:
    """Validate what a feature source returned for head "lposs": [batch, n, D], finite -> float32."""
    if not isinstance(features, Tensor):
        raise InputTypeError(f"feature source {source} returned {type(features).__name__}, expected a tensor "
                             "[B, N, D] of patch features")
    if features.dim() != 3 or tuple(features.shape[:2]) != (batch, n) or features.shape[2] < 1:
        raise InputError(f"feature source {source} returned shape {tuple(features.shape)}, expected [B, N, D] with "
                         f"(B, N) = {(batch, n)} on the CLIP patch grid")
    features = features.detach().float()
    if not bool(torch.isfinite(features).all()):
        raise InputError(f"feature source {source} returned NaN or Inf values")
    return features


def patch_features_of(source: Any) -> FeaturesFn:
    """Head "lposs"'s feature callable of an affinity source: its ``features`` method when it has one
    (:class:`DinoAffinity`), else the source itself, called as ``(image, grid) -> [B, N, D]``."""
    features = getattr(source, "features", None)
    return features if callable(features) else source


def build_affinity(affinity: str | AffinityFn, *, weights: str | None, device: torch.device,
                   dtype: torch.dtype | None, dino_arch: str = DINO_DEFAULT) -> AffinityFn | None:
    """The affinity callable for a name or callable; None for "clip" (it comes from the CLIP forward).
    dino_arch: the timm architecture "dino" builds (head "lposs": :data:`LPOSS_DINO`)."""
    if callable(affinity):
        return affinity
    if affinity == "clip":
        return None
    if affinity == "sd2":
        return SD2Affinity(weights or SD2_DEFAULT, device=device, dtype=dtype)
    if affinity == "dino":
        return DinoAffinity(weights, arch=dino_arch, device=device, dtype=dtype)
    raise InputError(
        f"affinity must be one of {', '.join(map(repr, BUILTIN))} or a callable (image, grid) -> [B, N, N]; "
        f"got {affinity!r}"
    )
