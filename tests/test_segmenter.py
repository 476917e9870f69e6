"""The open_clip segmentation pipeline (ovss_fast.Segmenter) on a tiny random-weight model.

No test downloads anything: models are built with pretrained=None from a tiny
registered open_clip config, or loaded from a checkpoint file written here.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")

from PIL import Image  # noqa: E402

from ovss_fast.models.affinity import DinoAffinity, SD2Affinity, resize_attention  # noqa: E402
from ovss_fast.models.clip_features import TINY_MODEL, DenseCLIP, parse_class_names  # noqa: E402
from ovss_fast.pipeline.image_inputs import as_image_batches  # noqa: E402
from ovss_fast.pipeline.segmenter import Segmenter  # noqa: E402
from ovss_fast.pipeline.windows import window_starts  # noqa: E402

# the spec backend keeps these tests independent of which compiled backends are built
BACKEND = "reference"
CLASSES = ["cat; kitten", "dog", "grass"]
TEMPLATES = ("a photo of a {}.", "a {}.")  # two templates keep text encoding fast; the default is tested once


def segmenter(tiny, **kw):
    model, tok = tiny
    kw.setdefault("backend", BACKEND)
    kw.setdefault("templates", TEMPLATES)
    kw.setdefault("device", "cpu")
    return Segmenter.from_model(model, tok, **kw)


def image(h=64, w=96, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (3, h, w) if batch is None else (batch, 3, h, w)
    # smooth-ish content so the JBU guide has structure
    x = torch.rand(shape, generator=g)
    return torch.nn.functional.avg_pool2d(x.reshape(-1, 3, h, w), 5, 1, 2).reshape(shape).clamp(0, 1)


# --------------------------------------------------------------------------- dense features and "clip" affinity
def test_dense_features_match_open_clip_forward(tiny):
    model, _ = tiny
    x = torch.randn(2, 3, 64, 64)
    feats, attn = DenseCLIP(model.visual)(x)
    visual = model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(x)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(feats, tokens @ visual.proj, rtol=1e-5, atol=1e-5)
    # the attention is the last block's nn.MultiheadAttention weights, heads averaged, patches only
    with torch.no_grad():
        y = visual._embeds(x)  # conv, class token, positions, ln_pre
        for blk in visual.transformer.resblocks[:-1]:
            y = blk(y)
        last = visual.transformer.resblocks[-1]
        z = last.ln_1(y)
        _, w = last.attn(z, z, z, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(attn, w[:, 1:, 1:], rtol=1e-5, atol=1e-6)


def test_clip_affinity_is_nonnegative_on_the_patch_grid(tiny):
    model, _ = tiny
    dense = DenseCLIP(model.visual)
    feats, attn = dense(torch.randn(3, 3, 48, 80))  # grid 3 x 5, not the model's native 4 x 4
    assert feats.shape == (3, 15, 32)
    assert attn.shape == (3, 15, 15) and attn.dtype == torch.float32
    assert bool((attn >= 0).all()) and bool(torch.isfinite(attn).all())
    rows = attn.sum(-1)  # a row of softmax over CLS + patches, CLS column dropped
    assert bool((rows <= 1 + 1e-5).all()) and bool((rows > 0).all())
    assert dense._pos_embed((3, 5)).shape == (16, 64)
    assert dense._pos_embed((4, 4)) is model.visual.positional_embedding


def test_feature_presets_keep_the_clip_affinity(tiny):
    model, _ = tiny
    x = torch.randn(1, 3, 64, 64)
    plain, a1 = DenseCLIP(model.visual)(x)
    ss, a2 = DenseCLIP(model.visual, features="sclip")(x)
    assert ss.shape == plain.shape and bool(torch.isfinite(ss).all())
    assert not torch.allclose(ss, plain)
    torch.testing.assert_close(a1, a2)  # the affinity is the same last-block attention


# --------------------------------------------------------------------------- end to end
def test_shapes_and_dtypes_for_every_input_kind(tiny, tmp_path):
    seg = segmenter(tiny)
    x = image(70, 100)  # not multiples of the patch size
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "im.png"
    Image.fromarray(arr).save(path)
    inputs = [x, (x * 255).round().to(torch.uint8), arr, arr.astype(np.float32) / 255, Image.fromarray(arr),
              str(path), path, arr[..., 0]]
    for inp in inputs:
        labels = seg.seg(inp, CLASSES)
        assert labels.shape == (70, 100) and labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < 3
    scores = seg.scores(x, CLASSES)
    assert scores.shape == (3, 70, 100) and scores.dtype == torch.float32
    agree = (scores.argmax(0) == seg.seg(x, CLASSES)).float().mean()
    assert agree >= 0.999
    grid = seg.scores(x, CLASSES, upsample=False)
    assert grid.shape == (3, 4, 6) and grid.dtype == torch.float32  # round(70/16), round(100/16)
    assert seg.grid_for(70, 100) == (4, 6)


def test_class_string_and_default_templates(tiny):
    seg = segmenter(tiny, templates=None)
    assert len(seg.templates) == 80  # open_clip's OpenAI ImageNet templates
    a = seg.scores(image(), "cat; kitten, dog, grass", upsample=False)
    b = seg.scores(image(), CLASSES, upsample=False)
    assert torch.equal(a, b)


def test_deterministic(tiny):
    x = image()
    a = segmenter(tiny).scores(x, CLASSES)
    b = segmenter(tiny).scores(x, CLASSES)
    assert torch.equal(a, b)
    seg = segmenter(tiny, window=32, stride=16)
    assert torch.equal(seg.seg(x, CLASSES), seg.seg(x, CLASSES))


@pytest.mark.parametrize("mode", ["mv", "op", "kl"])
def test_window_covering_the_image_equals_no_window(tiny, mode):
    x = image(64, 96)
    whole = segmenter(tiny, mode=mode).scores(x, CLASSES)
    for window in (96, 128, (64, 96)):
        windowed = segmenter(tiny, mode=mode, window=window).scores(x, CLASSES)
        assert torch.equal(whole, windowed)


def test_window_scores_are_the_crops_scores_averaged(tiny):
    # per synonym (windows are averaged per synonym, the max over synonyms comes after)
    names = ["cat", "kitten", "dog", "grass"]
    x = image(64, 96)  # grid 4 x 6, no resize
    left = segmenter(tiny).scores(x[:, :, :64], names, upsample=False)  # columns 0-3
    right = segmenter(tiny).scores(x[:, :, 32:], names, upsample=False)  # columns 2-5
    tiled = segmenter(tiny, window=64, stride=32).scores(x, names, upsample=False)
    torch.testing.assert_close(tiled[..., :2], left[..., :2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled[..., 4:], right[..., 2:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled[..., 2:4], (left[..., 2:] + right[..., :2]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(100, 140), (37, 150), (130, 50)])
def test_windows_tile_sizes_not_multiple_of_the_stride(tiny, size):
    h, w = size
    seg = segmenter(tiny, window=48, stride=32)
    scores = seg.scores(image(h, w), CLASSES, upsample=False)
    gh, gw = seg.grid_for(h, w)
    assert scores.shape == (3, gh, gw) and bool(torch.isfinite(scores).all())
    labels = seg.seg(image(h, w), CLASSES)
    assert labels.shape == (h, w)


def test_window_starts_cover_every_cell():
    for size in range(1, 30):
        for window in range(1, 12):
            for stride in range(1, window + 1):
                starts = window_starts(size, window, stride)
                covered = set()
                for s in starts:
                    covered.update(range(s, min(size, s + window)))
                    assert s >= 0 and (s + window <= size or starts == [0])
                assert covered == set(range(size))
                assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 4) == [0, 4, 6]


def test_batch_of_two_equals_two_single_calls(tiny):
    seg = segmenter(tiny, window=48, stride=32)
    xb = image(80, 112, batch=2, seed=3)
    labels = seg.seg(xb, CLASSES)
    scores = seg.scores(xb, CLASSES)
    assert labels.shape == (2, 80, 112) and scores.shape == (2, 3, 80, 112)
    for i in range(2):
        single = seg.scores(xb[i], CLASSES)
        torch.testing.assert_close(scores[i], single, rtol=1e-4, atol=1e-4)
        assert (labels[i] == seg.seg(xb[i], CLASSES)).float().mean() >= 0.999
    arr = (xb.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    assert seg.seg(arr, CLASSES).shape == (2, 80, 112)
    listed = seg.seg([xb[0], image(50, 70)], CLASSES)
    assert isinstance(listed, list) and listed[0].shape == (80, 112) and listed[1].shape == (50, 70)


def test_synonyms_take_the_max(tiny):
    seg = segmenter(tiny)
    x = image(seed=5)
    expanded = seg.scores(x, ["cat", "kitten", "dog", "grass"], upsample=False)
    grouped = seg.scores(x, ["cat; kitten", "dog", "grass"], upsample=False)
    assert torch.equal(grouped[0], torch.maximum(expanded[0], expanded[1]))
    assert torch.equal(grouped[1:], expanded[2:])
    assert parse_class_names(" cat ;kitten , dog,grass") == [["cat", "kitten"], ["dog"], ["grass"]]


def test_text_embeddings_are_cached_per_class_list(tiny):
    seg = segmenter(tiny)
    t1, g1 = seg.text_features(CLASSES)
    t2, g2 = seg.text_features(list(CLASSES))
    assert t1 is t2 and g1 == g2 == [[0, 1], [2], [3]]
    assert t1.shape == (4, 32) and torch.allclose(t1.norm(dim=-1), torch.ones(4))
    t3, _ = seg.text_features(["dog"])
    torch.testing.assert_close(t3[0], t1[2])


def test_backend_auto_matches_reference(tiny):
    x = image(48, 64)
    ref = segmenter(tiny).scores(x, CLASSES, upsample=False)
    auto = segmenter(tiny, backend="auto").scores(x, CLASSES, upsample=False)
    torch.testing.assert_close(auto, ref, rtol=1e-4, atol=1e-4)


def test_local_checkpoint_file(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = Segmenter(TINY_MODEL, pretrained=str(path), device="cpu", backend=BACKEND, templates=TEMPLATES)
    x = image()
    assert torch.equal(loaded.scores(x, CLASSES), segmenter(tiny).scores(x, CLASSES))


def test_local_dir_model(tiny, tmp_path):
    import json

    from ovss_fast.models.clip_features import _TINY_CONFIG

    model, _ = tiny
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": _TINY_CONFIG}))
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = Segmenter(f"local-dir:{tmp_path}", device="cpu", backend=BACKEND, templates=TEMPLATES)
    x = image()
    assert torch.equal(loaded.scores(x, CLASSES), segmenter(tiny).scores(x, CLASSES))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        Segmenter(f"local-dir:{tmp_path / 'nothing'}", device="cpu")
    (tmp_path / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(RuntimeError, match="could not load open_clip model 'local-dir:"):
        Segmenter(f"local-dir:{tmp_path}", device="cpu")


def test_random_weights_warn(tiny):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        seg = Segmenter(TINY_MODEL, pretrained=None, device="cpu", backend=BACKEND, templates=TEMPLATES)
    assert seg.seg(image(), CLASSES).shape == (64, 96)


def test_callable_affinity(tiny):
    calls = []

    def uniform(img, grid):
        calls.append((tuple(img.shape), grid))
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        n = grid[0] * grid[1]
        return torch.ones(img.shape[0], n, n)

    seg = segmenter(tiny, affinity=uniform, window=48, stride=32)
    assert seg.seg(image(64, 96), CLASSES).shape == (64, 96)
    # grid 4 x 6, 3 x 3 windows: rows start at 0, 1 and columns at 0, 2, 3 -> the 6 crops in one call
    assert calls == [((6, 3, 48, 48), (3, 3))]

    with pytest.raises(ValueError, match=r"expected \[B, N, N\]"):
        segmenter(tiny, affinity=lambda img, grid: torch.ones(1, 3, 3)).seg(image(), CLASSES)
    with pytest.raises(ValueError, match="negative"):
        segmenter(tiny, affinity=lambda img, grid: -torch.ones(1, 24, 24)).seg(image(), CLASSES)


# --------------------------------------------------------------------------- memory estimate
def test_memory_estimate_refuses_and_suggests_a_window(tiny):
    seg = segmenter(tiny, memory_budget=2**20)  # 1 MiB
    # 256 x 256 -> 16 x 16 = 256 patches, T = 257 tokens; tiny tower: width 64, 2 heads, float32;
    # memory_estimate's docstring: tower 12 T W e + 2 h T^2 e, last block 2 h T^2 4 + n^2 4, mv head 6 n^2 4 + 8 n S 4
    n, t = 256, 257
    per_window = 12 * t * 64 * 4 + 2 * 2 * t * t * 4 + 2 * 2 * t * t * 4 + n * n * 4 + 6 * n * n * 4
    assert seg.memory_estimate(256, 256) == per_window  # about 4.5 MiB
    assert seg.memory_estimate(256, 256, batch=3, synonyms=4) == 3 * (per_window + 8 * n * 4 * 4)
    assert segmenter(tiny, mode="kl").memory_estimate(256, 256) == per_window - 6 * n * n * 4
    with pytest.raises(ValueError, match=r"pass window=(\d+), stride=(\d+)") as info:
        seg.seg(image(256, 256), CLASSES)
    import re

    window, stride = map(int, re.search(r"pass window=(\d+), stride=(\d+)", str(info.value)).groups())
    assert window % 16 == 0 and stride % 16 == 0
    ok = segmenter(tiny, memory_budget=2**20, window=window, stride=stride)
    assert ok.memory_estimate(256, 256) <= 2**20
    assert ok.seg(image(256, 256), CLASSES).shape == (256, 256)


# --------------------------------------------------------------------------- errors
def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'.*did you mean"):
        Segmenter("ViT-B-61", pretrained=None, device="cpu")


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found; pass pretrained='/path/to/checkpoint.pt'"):
        Segmenter(TINY_MODEL, pretrained=str(tmp_path / "missing.pt"), device="cpu")


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not load weights file"):
        Segmenter(TINY_MODEL, pretrained=str(path), device="cpu")


def test_unknown_pretrained_tag():
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'.*local checkpoint file"):
        Segmenter("ViT-B-16", pretrained="nope", device="cpu")


def test_hub_tag_offline_says_how_to_pass_a_local_file(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"could not get open_clip weights.*pretrained='/path/to/checkpoint.pt'"):
        Segmenter("ViT-B-16", pretrained="openai", device="cpu")


def test_openai_tag_builds_with_quickgelu(monkeypatch):
    # OpenAI's weights were trained with QuickGELU; open_clip's plain "ViT-B-16" config uses GELU
    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise OSError("offline")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="could not get open_clip weights"):
        Segmenter("ViT-B-16", pretrained="openai", device="cpu")
    assert seen["name"] == "ViT-B-16" and seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    assert seen["precision"] == "fp32"


@pytest.mark.parametrize("classes", [[], "", "  ", ["cat", " ; "]])
def test_empty_class_list(tiny, classes):
    with pytest.raises(ValueError, match="empty|names no class"):
        segmenter(tiny).seg(image(), classes)


def test_corrupt_and_missing_image_files(tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="could not read image file"):
        segmenter(tiny).seg(str(bad), CLASSES)
    with pytest.raises(FileNotFoundError, match="not found"):
        segmenter(tiny).seg(str(tmp_path / "nope.png"), CLASSES)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 32, 32), r"\[3, H, W\] or \[B, 3, H, W\]"),
    (torch.rand(32, 32), r"\[3, H, W\] or \[B, 3, H, W\]"),
    (np.zeros((3, 32, 32), np.uint8), "channels last"),
    (torch.rand(3, 32, 32) * 255, r"\[0, 1\]"),
    (torch.zeros(3, 0, 32), "empty"),
    (torch.full((3, 32, 32), float("nan")), "NaN"),
    (torch.zeros(3, 32, 32, dtype=torch.int32), "dtype"),
    ([], "empty list"),
    (42, "must be a PIL image"),
])
def test_wrong_image_inputs(tiny, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        segmenter(tiny).seg(bad, CLASSES)


@pytest.mark.parametrize("kw, error, message", [
    ({"window": 100}, ValueError, "window=100 is not a multiple of the patch size 16; use 96 or 112"),
    ({"window": 32, "stride": 48}, ValueError, "stride .* is larger than window"),
    ({"stride": 32}, ValueError, "stride is given without window"),
    ({"mode": "fast"}, ValueError, "mode must be one of"),
    ({"affinity": "sd3"}, ValueError, "affinity must be one of"),
    ({"features": "proxyclip"}, ValueError, "features must be one of"),
    ({"features": "self_self"}, ValueError, "self_self.*removed.*sclip"),
    ({"head": "argmax"}, ValueError, "head must be one of 'dslo', 'logits', 'lposs'"),
    ({"bg_threshold": 1.5}, ValueError, r"bg_threshold must lie in \(0, 1\]"),
    ({"bg_threshold": "0.1"}, TypeError, "bg_threshold must be a number"),
    ({"aggregation": "mean"}, ValueError, "aggregation must be one of 'grid', 'pixels'"),
    ({"crop": "resize"}, ValueError, "crop must be one of 'floor', 'pad'"),
    ({"antialias": 1}, TypeError, "antialias must be True or False"),
    ({"itres": 3}, TypeError, r"Segmenter got unknown parameters \['itres'\]"),
])
def test_bad_arguments(tiny, kw, error, message):
    with pytest.raises(error, match=message):
        segmenter(tiny, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny):
    with pytest.raises(ValueError, match="CUDA is not available"):
        segmenter(tiny, device="cuda")


def test_as_image_batches_kinds():
    assert as_image_batches(torch.rand(3, 8, 8))[1] == "single"
    assert as_image_batches(torch.rand(2, 3, 8, 8))[1] == "batch"
    assert as_image_batches([torch.rand(3, 8, 8)])[1] == "list"
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert as_image_batches(rgba)[0][0].shape == (1, 3, 8, 8)


# --------------------------------------------------------------------------- optional affinity sources
def test_resize_attention_keeps_rows_stochastic():
    a = torch.softmax(torch.randn(2, 64, 64), dim=-1)  # 8 x 8 grid
    for dst in [(4, 4), (8, 8), (3, 5), (16, 12)]:
        r = resize_attention(a, (8, 8), dst)
        n = dst[0] * dst[1]
        assert r.shape == (2, n, n) and bool((r >= 0).all())
    torch.testing.assert_close(resize_attention(a, (8, 8), (4, 4)).sum(-1), torch.full((2, 16), 0.25))


HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.skipif(HAS_DIFFUSERS, reason="diffusers is installed; the missing-extra error cannot be shown")
def test_sd2_without_diffusers_names_the_extra(tiny):
    with pytest.raises(ImportError, match=r"pip install 'ovss_fast\[sd\]'"):
        segmenter(tiny, affinity="sd2")


def tiny_sd2():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD2's block layout, tiny widths
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return unet, vae, torch.randn(1, 5, 16)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install 'ovss_fast[sd]')")
def test_sd2_affinity_on_a_tiny_random_unet(tiny):
    unet, vae, uncond = tiny_sd2()
    sd = SD2Affinity(None, unet=unet, vae=vae, uncond_embedding=uncond, device="cpu")
    assert sd.layers == 4  # two transformer layers in each of the first two attention-carrying up-blocks
    for grid in [(4, 4), (3, 5)]:
        a = sd(image(16 * grid[0], 16 * grid[1], batch=2), grid)
        n = grid[0] * grid[1]
        assert a.shape == (2, n, n) and bool((a >= 0).all()) and bool(torch.isfinite(a).all())
    seg = segmenter(tiny, affinity=sd)
    assert seg.seg(image(64, 96), CLASSES).shape == (64, 96)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install 'ovss_fast[sd]')")
def test_sd2_missing_weights_says_how_to_pass_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="affinity_weights=/path/to/stable-diffusion-2-1-base"):
        SD2Affinity(str(tmp_path / "no-such-dir"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="affinity_weights=/path/to/stable-diffusion-2-1-base"):
        SD2Affinity(str(empty), device="cpu")


def tiny_dino():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                             dynamic_img_size=True).eval()


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install 'ovss_fast[dino]')")
def test_dino_affinity_on_a_tiny_random_vit(tiny):
    dino = DinoAffinity(model=tiny_dino(), device="cpu")
    a = dino(image(48, 80, batch=2), (3, 5))
    assert a.shape == (2, 15, 15) and bool((a >= 0).all())
    torch.testing.assert_close(a, a.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(a, dim1=1, dim2=2), torch.ones(2, 15))
    seg = segmenter(tiny, affinity=dino, window=48, stride=32)
    assert seg.seg(image(64, 96), CLASSES).shape == (64, 96)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install 'ovss_fast[dino]')")
def test_dino_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    dino = DinoAffinity(str(path), arch="vit_tiny_patch16_224", device="cpu")
    for p, q in zip(dino.model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError, match="affinity_weights=/path/to/dino_checkpoint.pth"):
        DinoAffinity(str(tmp_path / "missing.pth"), device="cpu")
