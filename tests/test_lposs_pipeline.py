"""LPOSS in the pipeline: head "lposs", refine "lposs+", the ``lposs`` protocol, the flags and the results file.

Tiny random-weight models only (a tiny open_clip config, a tiny timm ViT as DINO), synthetic images, no
network. The Segmenter's head "lposs" is checked against :func:`ovss_fast.label_propagation` called by hand on
the same windows (one graph over all windows of an image), refine "lposs+" against
:func:`ovss_fast.pixel_propagation` by hand.
"""

from __future__ import annotations

import argparse
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_segmenter

import ovss_fast
from ovss_fast.ops.api import refine_lposs_plus
from ovss_fast.ops.options import HeadOptions, flag

open_clip = pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")
timm = pytest.importorskip("timm", reason="DINO features need timm (pip install 'ovss_fast[dino]')")

from ovss_fast.models.affinity import DinoAffinity  # noqa: E402
from ovss_fast.models.clip_features import normalise  # noqa: E402
from ovss_fast.pipeline.windows import window_starts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=None", "ignore:DinoAffinity with RANDOM weights")

TEMPLATES = ("a photo of a {}.",)
CLASSES = ["cat; kitten", "dog", "grass"]
GROUPS = [[0, 1], [2], [3]]
LP = {"lposs_k": 12}  # k below N, so the kNN graph is not complete


def _image(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(B, 3, H, W, generator=g), 5, 1, 2).clamp(0, 1)


@pytest.fixture(scope="module")
def dino():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True).eval()
    return DinoAffinity(model=vit, device="cpu")


def _by_hand(seg, dino, img, text, window, stride):
    """LPOSS's slide inference written out: the windows' raw cosines and DINO value features stacked, one
    label_propagation call, each window's result bilinear to its pixels and averaged -> [B, S, H, W]."""
    B, _, H, W = img.shape
    p = seg.patch[0]
    starts = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    crops = torch.stack([img[b, :, y:y + window, x:x + window] for b in range(B) for y, x in starts])
    g = window // p
    feats, _ = seg.dense(normalise(crops, seg.mean, seg.std), need_attention=False)
    cos = F.normalize(feats.float(), dim=-1) @ text.t()  # [B * nw, n, S]
    graph = dino.features(crops, (g, g))  # [B * nw, n, Dg]
    r = torch.arange(g)
    pos = torch.cat([torch.stack(torch.meshgrid(y + p // 2 + p * r, x + p // 2 + p * r, indexing="ij"), -1)
                     .reshape(-1, 2) for y, x in starts]).float()
    S, nw = text.shape[0], len(starts)
    x = ovss_fast.label_propagation(cos.reshape(B, nw * g * g, S), graph.reshape(B, nw * g * g, -1),
                                    pos.expand(B, -1, -1), backend="reference", k=LP["lposs_k"])
    x = x.reshape(B * nw, g, g, S).permute(0, 3, 1, 2)
    acc, count = torch.zeros(B, S, H, W), torch.zeros(1, 1, H, W)
    for i, (b, (y, x0)) in enumerate((b, s) for b in range(B) for s in starts):
        acc[b, :, y:y + window, x0:x0 + window] += F.interpolate(x[i:i + 1], size=(window, window),
                                                                 mode="bilinear", align_corners=False)[0]
        count[:, :, y:y + window, x0:x0 + window] += b == 0
    return acc / count, (cos, graph, pos)


def _classes(maps):
    return torch.stack([maps[:, g].amax(dim=1) for g in GROUPS], dim=1)


# --------------------------------------------------------------------------- the options
def test_lposs_options_are_the_ops_keywords_with_their_defaults():
    o = HeadOptions()
    for fn, params in ((ovss_fast.label_propagation, o.label_propagation_params()),
                       (ovss_fast.pixel_propagation, o.pixel_propagation_params())):
        sig = inspect.signature(fn).parameters
        assert {n for n, q in sig.items() if q.kind is q.KEYWORD_ONLY} - {"backend"} == set(params), fn.__name__
        assert all(sig[k].default == v for k, v in params.items()), fn.__name__
    assert set(o.for_op("label_propagation")) | set(o.for_op("pixel_propagation")) == {
        f"lposs_{k}" for k in ("k", "gamma", "sigma", "dist_pow", "alpha", "iters", "tol", "radius", "tau")}
    for kw, msg in (({"lposs_k": 0}, "lposs_k must be >= 1"), ({"lposs_alpha": 1.0}, r"lposs_alpha must lie in \[0, 1"),
                    ({"lposs_iters": 0}, "lposs_iters must be >= 1"), ({"lposs_tau": 0}, "lposs_tau must be"),
                    ({"lposs_radius": 65}, "lposs_radius must be <= 64"),
                    ({"refine": "lposs"}, "refine must be one of")):
        with pytest.raises(ValueError, match=msg):
            HeadOptions(**kw)


# --------------------------------------------------------------------------- head "lposs"
def test_dino_value_features_are_lposs_hook(dino):
    """LPOSS's extract_feats("v"): the last block's qkv output, reshaped (B, T, 3, heads, d), its v, heads side by
    side, class token dropped, L2-normalised."""
    x = _image(2, 32, 48, 1)
    got = dino.features(x, (4, 6))
    seen = {}
    handle = dino.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, o: seen.setdefault("qkv", o))
    with torch.no_grad():
        dino.model(dino._input(x, (4, 6)))
    handle.remove()
    qkv = seen["qkv"]
    B, T, C = qkv.shape
    nh = dino.model.blocks[-1].attn.num_heads
    v = qkv.reshape(B, T, 3, nh, C // nh // 3).permute(2, 0, 3, 1, 4)[2].transpose(1, 2).flatten(-2)[:, 1:]
    torch.testing.assert_close(got, F.normalize(v, dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("aggregation", ["pixels", "grid"])
def test_lposs_head_is_label_propagation_over_all_windows(tiny, dino, aggregation):
    img = _image(2, 48, 80, 2)
    seg = tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=dino, window=32, stride=16, aggregation=aggregation,
                         refine="bilinear", **LP)
    text, _ = seg.text_features(CLASSES)
    want, (cos, graph, pos) = _by_hand(seg, dino, img, text, 32, 16)
    got = seg.scores(img, CLASSES, upsample=False)
    if aggregation == "pixels":  # LPOSS's aggregation: the windows' results at their pixels, averaged
        torch.testing.assert_close(got, _classes(want), rtol=1e-4, atol=1e-5)
    else:  # averaged on the patch grid: the same propagated patches, averaged per cell
        x = ovss_fast.label_propagation(cos.reshape(2, -1, 4), graph.reshape(2, cos.shape[0] // 2 * 4, -1),
                                        pos.expand(2, -1, -1), backend="reference", k=12)
        layout = seg.window_layout((3, 5))
        acc = torch.zeros(2, 15, 4).index_add_(1, layout.cell_index.reshape(-1), x) / layout.count.view(1, -1, 1)
        torch.testing.assert_close(got, _classes(acc.transpose(1, 2).reshape(2, 4, 3, 5)), rtol=1e-4, atol=1e-5)
    # one graph across windows: propagating window by window gives other scores
    alone = torch.cat([ovss_fast.label_propagation(cos[i], graph[i], pos[:4], backend="reference", k=12)
                       for i in range(cos.shape[0])])
    joint = ovss_fast.label_propagation(cos.reshape(2, -1, 4), graph.reshape(2, -1, graph.shape[-1]),
                                        pos.expand(2, -1, -1), backend="reference", k=12).reshape_as(alone)
    assert (alone - joint).abs().max() > 1e-3
    pred = seg.predict(img, CLASSES)
    assert "label_propagation" in pred.timings and pred.settings["head"] == "lposs"
    assert pred.options.lposs_k == 12


def test_lposs_head_one_window_at_a_time_gives_the_same(tiny, dino):
    img = _image(1, 48, 80, 3)
    kw = {"head": "lposs", "affinity": dino, "window": 32, "stride": 16, "refine": "bilinear", **LP}
    a = tiny_segmenter(tiny, TEMPLATES, **kw).scores(img, CLASSES, upsample=False)
    b = tiny_segmenter(tiny, TEMPLATES, batch_windows=False, **kw).scores(img, CLASSES, upsample=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_callable_gives_the_graph_features(tiny, dino):
    img = _image(1, 48, 80, 4)
    calls = []

    def value_features(image, grid):
        calls.append(tuple(image.shape))
        return dino.features(image, grid)

    kw = {"head": "lposs", "window": 32, "stride": 16, "aggregation": "pixels", "refine": "bilinear", **LP}
    a = tiny_segmenter(tiny, TEMPLATES, affinity=value_features, **kw).scores(img, CLASSES, upsample=False)
    b = tiny_segmenter(tiny, TEMPLATES, affinity=dino, **kw).scores(img, CLASSES, upsample=False)
    assert calls and calls[0][1:] == (3, 32, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- refine "lposs+"
def test_refine_lposs_plus_is_pixel_propagation_on_the_processed_image(tiny, dino):
    img, guide = _image(1, 48, 80, 5), _image(1, 61, 90, 6)
    seg = tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=dino, window=32, stride=16, aggregation="pixels",
                         refine="lposs+", lposs_radius=2, **LP)
    text, _ = seg.text_features(CLASSES)
    maps, _ = _by_hand(seg, dino, img, text, 32, 16)
    refined = ovss_fast.pixel_propagation(maps, img, radius=2, backend="reference")  # LPOSS+: raw scores, no softmax
    want = F.interpolate(_classes(refined), size=(61, 90), mode="bilinear", align_corners=False)
    got = seg.scores(img, CLASSES, guide=guide)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(seg.seg(img, CLASSES, guide=guide), got.argmax(1))
    # with resize, the pixel stage runs on the image at the processed size
    small = tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=dino, window=32, stride=16, aggregation="pixels",
                           refine="lposs+", lposs_radius=2, resize=48, **LP)
    big = F.interpolate(img, size=(96, 160), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    back = F.interpolate(big, size=(48, 80), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    maps, _ = _by_hand(small, dino, back, text, 32, 16)
    refined = ovss_fast.pixel_propagation(maps, back, radius=2, backend="reference")
    want = F.interpolate(_classes(refined), size=(96, 160), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small.scores(big, CLASSES), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["logits", "dslo"])
def test_refine_lposs_plus_after_the_other_heads(tiny, head):
    """After head "logits" the pixel stage propagates the raw cosines (LPOSS+ without the patch stage), then
    softmax(scale * cos); after "dslo" it propagates the discrepancy scores (bilinear to the image first)."""
    img = _image(1, 32, 48, 7)
    kw = {"head": head, "mode": "kl", "refine": "lposs+", "lposs_radius": 2}
    seg = tiny_segmenter(tiny, TEMPLATES, **kw)
    text, groups = seg.text_features(CLASSES)
    if head == "logits":
        feats, _ = seg.dense(normalise(img, seg.mean, seg.std), need_attention=False)
        cos = (F.normalize(feats.float(), dim=-1) @ text.t()).transpose(1, 2).reshape(1, 4, 2, 3)
        up = F.interpolate(cos, size=(32, 48), mode="bilinear", align_corners=False)
        refined = ovss_fast.pixel_propagation(up, img, radius=2, backend="reference")
        want = _classes(torch.softmax(seg.options.scale * refined, dim=1))
    else:
        grid = tiny_segmenter(tiny, TEMPLATES, **{**kw, "refine": "bilinear"})._grid_maps(img, text)
        up = F.interpolate(grid, size=(32, 48), mode="bilinear", align_corners=False)
        want = _classes(ovss_fast.pixel_propagation(up, img, radius=2, backend="reference"))
    got = seg.scores(img, CLASSES)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(seg.seg(img, CLASSES), got.argmax(1))


def test_refine_lposs_plus_takes_neg_inf_scores_and_segment_features():
    s = torch.randn(1, 3, 4, 5)
    s[0, 1, :2] = float("-inf")  # a class NMS emptied in part of the image
    image = _image(1, 8, 10, 8)
    out = refine_lposs_plus(s, image, radius=2, backend="reference")
    floor = s.clone()
    floor[0, 1, :2] = s[torch.isfinite(s)].min()
    want = ovss_fast.pixel_propagation(F.interpolate(floor, size=(8, 10), mode="bilinear", align_corners=False),
                                       image, radius=2, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    feats, text = torch.randn(1, 20, 8), torch.randn(3, 8)
    labels, scores = ovss_fast.segment_features(feats, text, None, grid=(4, 5), guide=image, mode="kl",
                                                refine="lposs+", lposs_radius=2, backend="reference",
                                                return_scores=True)
    assert torch.equal(labels, refine_lposs_plus(scores, image, radius=2, backend="reference").argmax(1))


def test_the_pixel_stage_memory_is_checked():
    from ovss_fast.pipeline.windows import Windows, pixel_stage_bytes

    assert pixel_stage_bytes(1, 21, 448, 597, 6) == 448 * 597 * 4 * (168 + 8 + 6 * 21)
    w = Windows((16, 16), None, None, None, True, "floor", 2**30, True, lambda cells, s: 1)
    assert w.pixel_stage_images(4, 21, 448, 597, 6) == 3  # 0.30 GiB per image
    with pytest.raises(ValueError, match="refine 'lposs\\+' on a 2048x2048 image .* over memory_budget = 1.00 GiB"):
        w.pixel_stage_images(1, 21, 2048, 2048, 6)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("affinity", ["clip", "sd2"])
def test_head_lposs_needs_a_feature_source(tiny, affinity):
    with pytest.raises(ValueError, match=f"head 'lposs' needs patch features .* affinity='{affinity}' does not give"):
        tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=affinity)


def test_bad_knobs_and_bad_features_name_the_argument(tiny, dino):
    with pytest.raises(ValueError, match="lposs_k must be >= 1"):
        tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=dino, lposs_k=0)
    with pytest.raises(ValueError, match=r"lposs_alpha must lie in \[0, 1\)"):
        tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=dino, lposs_alpha=1.5)

    def flat(image, grid):
        return torch.zeros(image.shape[0], grid[0] * grid[1])

    seg = tiny_segmenter(tiny, TEMPLATES, head="lposs", affinity=flat)
    with pytest.raises(ValueError, match=r"feature source 'flat' returned shape \(1, 6\), expected \[B, N, D\]"):
        seg.seg(_image(1, 32, 48, 9), CLASSES)
    from ovss_fast.eval.harness import synthetic_predictor

    with pytest.raises(ValueError, match="head 'lposs' needs patch features"):
        synthetic_predictor(head="lposs")


# --------------------------------------------------------------------------- front ends
def test_flags_parse_and_are_checked():
    from ovss_fast.apps import flags
    from ovss_fast.apps.segment import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["x.png", "--classes", "a, b", "--out", "l.png", "--head", "lposs", "--refine", "lposs+",
                       "--lposs-k", "50", "--lposs-radius", "3", "--lposs-tau", "0.05", "--features", "maskclip-res"])
    flags.check_method_arguments(ns)
    assert flags.method_kwargs(ns) == {"features": "maskclip-res", "head": "lposs", "refine": "lposs+", "lposs_k": 50,
                                       "lposs_radius": 3, "lposs_tau": 0.05}
    ns.lposs_alpha = 1.0
    with pytest.raises(ValueError, match=rf"{flag('lposs_alpha')} must lie in \[0, 1\)"):
        flags.check_method_arguments(ns)
    from ovss_fast.apps import web

    choices = {c.name: c.choices for c in web.CONTROLS}
    assert "lposs" in choices["head"] and "lposs+" in choices["refine"]
    args = argparse.Namespace(model="ovss-fast-tiny", pretrained=None, mode=None, affinity=None, preset="ours",
                              transition=None, refine=None, head=None)
    ns, kw = web.request_options(args, {"head": "lposs", "refine": "lposs+", "affinity": "dino"})
    assert (kw["head"], kw["refine"], ns.affinity) == ("lposs", "lposs+", "dino")


def test_the_lposs_protocol_has_lposs_published_settings():
    from ovss_fast.apps.evaluate import _resolved
    from ovss_fast.apps.evaluate import add_arguments as eval_arguments
    from ovss_fast.eval.datasets import DATASETS
    from ovss_fast.eval.protocols import resolve_protocol

    for name in DATASETS:
        p = resolve_protocol("lposs", name)
        assert (p["short_side"], p["window"], p["stride"], p["bg_threshold"]) == (448, 224, 112, None), name
        assert (p["head"], p["refine"], p["aggregation"], p["features"], p["antialias"], p["snap"]) == \
            ("lposs", "lposs+", "pixels", "maskclip-res", False, False)
        assert p["head_options"] == {"lposs_k": 400, "lposs_gamma": 3.0, "lposs_sigma": 0.01, "lposs_dist_pow": 1.0,
                                     "lposs_alpha": 0.95, "lposs_iters": 10, "lposs_tol": 1e-6, "lposs_radius": 6,
                                     "lposs_tau": 0.01}
    parser = argparse.ArgumentParser()
    eval_arguments(parser)
    args = parser.parse_args(["--dataset", "voc21", "--root", "x", "--protocol", "lposs", "--lposs-k", "100"])
    proto, kwargs, overridden = _resolved(args, "voc21")
    assert (kwargs["head"], kwargs["refine"], kwargs["features"], kwargs["lposs_k"], kwargs["lposs_tau"]) == \
        ("lposs", "lposs+", "maskclip-res", 100, 0.01)
    assert overridden == ["lposs_k"] and proto["head_options"]["lposs_k"] == 100


@pytest.mark.slow  # about 10 s on 2 busy cores (the 80 templates of 21 classes, a random ViT)
def test_eval_records_the_lposs_settings(tmp_path, monkeypatch):
    """``ovss-fast eval --protocol lposs`` end to end on a fake VOC (random DINO weights, built offline; a tiny
    ViT stands in for ViT-B/16 to keep the test fast), and the results file records every LPOSS setting."""
    from test_eval import make_layout

    from ovss_fast.apps.cli import main
    from ovss_fast.pipeline import segmenter

    monkeypatch.setattr(segmenter, "LPOSS_DINO", "vit_tiny_patch16_224")
    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", "voc21", "--root", str(tmp_path), "--model", "ovss-fast-tiny", "--pretrained",
                 "none", "--backend", "reference", "--protocol", "lposs", "--short-side", "48", "--window", "32",
                 "--stride", "16", "--affinity-weights", "random:dino", "--lposs-k", "20", "--lposs-radius", "2",
                 "--limit", "1", "--quiet", "--out", str(out)]) == 0
    c = json.loads(out.read_text())["config"]
    assert (c["head"], c["refine"], c["features"], c["affinity"], c["aggregation"]) == \
        ("lposs", "lposs+", "maskclip-res", "dino", "pixels")
    assert (c["lposs_k"], c["lposs_gamma"], c["lposs_sigma"], c["lposs_dist_pow"], c["lposs_alpha"], c["lposs_iters"],
            c["lposs_tol"], c["lposs_radius"], c["lposs_tau"]) == (20, 3.0, 0.01, 1.0, 0.95, 10, 1e-6, 2, 0.01)
    assert c["protocol"]["protocol"] == "lposs" and c["protocol"]["head_options"]["lposs_k"] == 20
    assert any("laion2b_s34b_b88k" in n for n in c["protocol"]["notes"])
    assert "LPOSS+'s pixel-stage label propagation" in c["prediction_to_annotation"]


def test_segment_says_in_one_line_what_head_lposs_needs(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ovss_fast.apps.cli import main

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(path)
    assert main(["segment", str(path), "--classes", "a, b", "--out", str(tmp_path / "l.png"), "--model",
                 "ovss-fast-tiny", "--pretrained", "none", "--head", "lposs", "--refine", "lposs+", "--affinity",
                 "clip"]) == 2
    err = capsys.readouterr().err
    assert "ovss-fast segment: error: head 'lposs' needs patch features" in err and "--affinity dino" in err


def test_the_web_page_runs_head_lposs_and_refine_lposs_plus(tmp_path, monkeypatch):
    """A page request with head lposs, refine lposs+ and affinity dino (random DINO weights from the start flag
    --affinity-weights random:dino; a tiny ViT stands in for ViT-B/16): labels like ``ovss-fast segment``'s."""
    import numpy as np
    from PIL import Image

    from ovss_fast.apps import web
    from ovss_fast.pipeline import segmenter

    monkeypatch.setattr(segmenter, "LPOSS_DINO", "vit_tiny_patch16_224")
    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    app = web.App(parser.parse_args(["--model", "ovss-fast-tiny", "--backend", "reference", "--affinity-weights",
                                     "random:dino", "--lposs-radius", "2"]))
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    values = {"head": "lposs", "refine": "lposs+", "affinity": "dino", "window": "32", "stride": "16"}
    r = app.run(str(path), "cat; kitten, dog, grass", values, want_scores=False)
    assert r.labels is not None and r.label_map.shape == (40, 56), r.message
    assert "label_propagation" in r.timings and "refine" in r.timings
    bad = app.run(str(path), "cat, dog", {**values, "affinity": "clip"}, want_scores=False)
    assert bad.labels is None and "head &#x27;lposs&#x27; needs patch features" in bad.message  # HTML-escaped


def test_synthetic_scenes_take_refine_lposs_plus():
    from ovss_fast.eval.harness import SyntheticScenes, synthetic_predictor

    item = SyntheticScenes(1, grid=(6, 6), image_size=(24, 24))[0]
    s = item["scene"]
    labels = synthetic_predictor(head="logits", backend="reference", refine="lposs+", lposs_radius=2)(item)
    cos = F.normalize(s.feats.float(), dim=-1) @ F.normalize(s.text.float(), dim=-1).t()
    cos = cos.transpose(1, 2).reshape(1, -1, 6, 6)
    want = refine_lposs_plus(cos, s.guide, radius=2, backend="reference").argmax(1)[0]
    assert torch.equal(labels, want)


def test_head_lposs_takes_the_background_threshold(tiny, dino):
    """The threshold reads softmax(scale * raw cosines) beside the propagated maps: a tiny one changes nothing,
    one above every probability makes every pixel class 0."""
    img = _image(1, 48, 80, 10)
    kw = {"head": "lposs", "affinity": dino, "window": 32, "stride": 16, "aggregation": "pixels",
          "refine": "bilinear", **LP}
    plain = tiny_segmenter(tiny, TEMPLATES, **kw).seg(img, CLASSES)
    assert int(plain.max()) > 0  # not all class 0 already
    assert torch.equal(tiny_segmenter(tiny, TEMPLATES, bg_threshold=1e-6, **kw).seg(img, CLASSES), plain)
    assert int(tiny_segmenter(tiny, TEMPLATES, bg_threshold=1.0, **kw).seg(img, CLASSES).max()) == 0
