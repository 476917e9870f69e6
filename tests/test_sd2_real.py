"""Stable Diffusion 2's affinity at its real size, offline: the published architecture
(ovss_fast.models.sd2_config, stabilityai/stable-diffusion-2-1-base) with random weights, run at the
voc21 whole-image size (a 375x500 image at short side 336, whole 16-px patches: 336x448 pixels,
CLIP grid 21x28, N = 588). Nothing is downloaded. The real-size test builds an 866M-parameter
UNet (3.5 GB in float32) once for the module and takes minutes on 2 cores (bench/bench_sd2.py
times it)."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

HAS_SD = importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("transformers") is not None
pytestmark = pytest.mark.skipif(not HAS_SD, reason="diffusers/transformers not installed (pip install 'ovss_fast[sd]')")

from ovss_fast.models import sd2_config  # noqa: E402
from ovss_fast.models.affinity import SD2_RANDOM, SD2Affinity, _CaptureSelfAttention, build_affinity  # noqa: E402

GRID = (21, 28)  # voc21 whole image: 375x500 -> short side 336 -> 336x448 pixels, 16-px patches
IMAGE = (1, 3, 336, 448)


def captured_processors(unet) -> list[str]:
    """The attention modules of ``unet`` whose processor captures maps (attn_processors names end in .processor)."""
    return [name.removesuffix(".processor") for name, p in unet.attn_processors.items()
            if isinstance(p, _CaptureSelfAttention)]


def test_empty_prompt_ids_are_bos_eos_then_pad():
    ids = sd2_config.empty_prompt_ids()
    assert len(ids) == 77 and ids[:3] == [49406, 49407, 0] and set(ids[2:]) == {0}


def test_random_weights_spec_is_checked():
    with pytest.raises(ValueError, match="random:sd2:SEED"):
        SD2Affinity("random:sd2:x", device="cpu")


def small_sd2_layout():
    """The published UNet's block layout and attention settings at small widths (fast)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(sd2_config.UNET, block_out_channels=[16, 16, 32, 32],
                                                 attention_head_dim=[1, 2, 2, 2], norm_num_groups=8,
                                                 cross_attention_dim=24))
    vae = AutoencoderKL.from_config(dict(sd2_config.VAE, block_out_channels=[8, 8, 8, 8], norm_num_groups=4))
    return unet, vae, torch.randn(1, 77, 24)


def test_stopping_early_gives_the_same_affinity_on_the_published_layout():
    unet, vae, uncond = small_sd2_layout()
    sd = SD2Affinity(None, unet=unet, vae=vae, uncond_embedding=uncond, device="cpu")
    assert sd.hooked_blocks == ["up_blocks.1", "up_blocks.2"]
    assert captured_processors(sd.unet) == sd.hooked and len(sd.hooked) == 6  # 3 transformer layers per up-block
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    sd.stop_early = False
    full = sd(x, (3, 5))
    sd.stop_early = True
    early = sd(x, (3, 5))
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    assert [name for name, _ in sd.last_captured] == sd.hooked
    # the stop hook is removed after the call: a plain forward pass still runs to the end
    latent = torch.randn(1, 4, 16, 16)
    assert sd.unet(latent, torch.tensor([0]), encoder_hidden_states=uncond).sample.shape == latent.shape


@pytest.fixture(scope="module")
def sd2_real():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        sd = SD2Affinity.from_config(seed=0, device="cpu")
    yield sd
    del sd
    gc.collect()


@pytest.mark.slow
def test_sd2_real_size_affinity_on_the_voc21_whole_image(sd2_real):
    sd = sd2_real
    # the published architecture: parameter counts of stable-diffusion-2-1-base's unet/ and vae/
    assert sum(p.numel() for p in sd.unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in sd.vae.parameters()) == 83_653_863
    assert tuple(sd.uncond.shape) == (1, 77, 1024) and bool(torch.isfinite(sd.uncond).all())
    # the first two attention-carrying up-blocks are up_blocks.1 and .2 (up_blocks.0 is a plain UpBlock2D)
    assert not getattr(sd.unet.up_blocks[0], "attentions", None)
    assert sd.hooked_blocks == ["up_blocks.1", "up_blocks.2"]
    assert captured_processors(sd.unet) == sd.hooked
    assert sd.hooked == [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1" for i in (1, 2) for j in range(3)]

    x = torch.rand(*IMAGE, generator=torch.Generator().manual_seed(0))
    a = sd(x, GRID)
    n = GRID[0] * GRID[1]
    assert tuple(a.shape) == (1, n, n) == (1, 588, 588)
    assert bool(torch.isfinite(a).all()) and bool((a >= 0).all())
    assert bool((a.sum(-1) > 0).all())  # every patch attends somewhere
    # the hooks fired once each, in order, on exactly those up-blocks; the crop is resized to 32 x (22, 28) pixels,
    # latent 88x112: up_blocks.1 runs on 22x28 tokens, up_blocks.2 on 44x56
    assert [name for name, _ in sd.last_captured] == sd.hooked
    assert [tokens for _, tokens in sd.last_captured] == [22 * 28] * 3 + [44 * 56] * 3


def test_random_weights_reach_the_segmenter_by_name(monkeypatch):
    """``affinity_weights="random:sd2"`` (the CLI's --affinity-weights) builds from configuration, without
    building the real size here (the builder is replaced by the small layout)."""
    import ovss_fast.models.affinity as affinity

    seen = []

    def small(seed, device):
        seen.append(seed)
        return small_sd2_layout()

    monkeypatch.setattr(affinity, "_random_sd2", small)
    sd = build_affinity("sd2", weights=f"{SD2_RANDOM}:7", device=torch.device("cpu"), dtype=None)
    assert isinstance(sd, SD2Affinity) and seen == [7] and sd.layers == 6
