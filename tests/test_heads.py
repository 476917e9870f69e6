"""Segmenter heads ("dslo", "logits"), the background threshold and the two window aggregations.

The peers' pipeline (slide inference with bilinear upsampling to pixels, softmax over
synonyms of scale * cos, max over a class's synonyms, prob_thd) is written out here
from DenseCLIP's features and compared with Segmenter(aggregation="pixels", head="logits").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")

from conftest import tiny_segmenter  # noqa: E402

from ovss_fast.models.clip_features import DenseCLIP, normalise  # noqa: E402
from ovss_fast.ops.api import class_distributions, discrepancy, jbu_upsample  # noqa: E402
from ovss_fast.pipeline.windows import window_starts  # noqa: E402

CLASSES = ["background; sky", "cat; kitten", "dog", "grass"]
GROUPS = [[0, 1], [2, 3], [4], [5]]
TEMPLATES = ("a photo of a {}.",)


def make(tiny, **kw):
    return tiny_segmenter(tiny, TEMPLATES, **kw)


def image(h, w, seed=0):
    x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(x[None], 5, 1, 2)[0].clamp(0, 1)


def class_max(x, groups=GROUPS):
    return torch.stack([x[:, g].amax(1) for g in groups], 1)


def peers_logits(seg, x, window, stride, crop="floor"):
    """[1, S, H, W] cosine logits by the peers' slide inference, written out."""
    text, _ = seg.text_features(CLASSES)
    dense = DenseCLIP(seg.model.visual, features=seg.features)
    _, H, W = x.shape
    hc, wc = (H, W) if window is None else (min(window, H), min(window, W))
    sy, sx = (H, W) if window is None else (stride, stride)
    acc = torch.zeros(1, text.shape[0], H, W, dtype=torch.float64)
    cnt = torch.zeros(1, 1, H, W, dtype=torch.float64)
    for y in window_starts(H, hc, sy):
        for x0 in window_starts(W, wc, sx):
            c = normalise(x[None, :, y:y + hc, x0:x0 + wc], seg.mean, seg.std)
            if crop == "pad":
                ph, pw = -(-hc // 16) * 16, -(-wc // 16) * 16
                c = F.pad(c, (0, pw - wc, 0, ph - hc))  # zeros in normalised space
            else:
                c = c[:, :, :hc // 16 * 16, :wc // 16 * 16]
            f, _ = dense(c, need_attention=False)
            gh, gw = c.shape[-2] // 16, c.shape[-1] // 16
            cos = (F.normalize(f, dim=-1) @ text.T).transpose(1, 2).reshape(1, -1, gh, gw).double()
            if crop == "pad":
                up = F.interpolate(cos, size=c.shape[-2:], mode="bilinear", align_corners=False)[:, :, :hc, :wc]
            else:
                up = F.interpolate(cos, size=(hc, wc), mode="bilinear", align_corners=False)
            acc[:, :, y:y + hc, x0:x0 + wc] += up
            cnt[:, :, y:y + hc, x0:x0 + wc] += 1
    return acc / cnt


@pytest.mark.parametrize("window,stride,crop", [(48, 32, "floor"), (None, None, "floor"), (None, None, "pad"),
                                                 (64, 32, "pad")])
def test_peers_pixel_pipeline(tiny, window, stride, crop):
    x = image(70, 100)  # not whole patches: the peers do not snap
    seg = make(tiny, head="logits", aggregation="pixels", window=window, stride=stride, crop=crop, scale=40.0)
    logits = peers_logits(seg, x, window, stride, crop)
    probs = class_max(torch.softmax(40.0 * logits, dim=1))
    got = seg.scores(x, CLASSES)
    assert got.shape == (4, 70, 100)
    torch.testing.assert_close(got.double(), probs[0], rtol=1e-4, atol=1e-5)
    labels = seg.seg(x, CLASSES)
    assert (labels == probs[0].argmax(0)).float().mean() >= 0.999
    # a guide of another size: the logits go there bilinearly before the softmax (the peers' order)
    big = seg.seg(x, CLASSES, guide=image(140, 200))
    want = class_max(torch.softmax(40.0 * F.interpolate(logits, size=(140, 200), mode="bilinear",
                                                        align_corners=False), dim=1))[0].argmax(0)
    assert big.shape == (140, 200) and (big == want).float().mean() >= 0.999


def test_background_threshold_on_the_peers_pipeline(tiny):
    x = image(70, 100, seed=3)
    seg0 = make(tiny, head="logits", aggregation="pixels", window=48, stride=32, scale=40.0)
    probs = class_max(torch.softmax(40.0 * peers_logits(seg0, x, 48, 32), dim=1))[0]
    best = probs.amax(0)
    thd = float(best.median())  # about half the pixels fall below it
    seg = make(tiny, head="logits", aggregation="pixels", window=48, stride=32, scale=40.0, bg_threshold=thd)
    labels = seg.seg(x, CLASSES)
    want = probs.argmax(0).masked_fill(best < thd, 0)
    assert (labels == want).float().mean() >= 0.999
    assert 0.3 < float((labels == 0).float().mean()) < 0.9
    assert bool((make(tiny, head="logits", bg_threshold=1.0).seg(x, CLASSES) == 0).all())


def test_logits_head_on_the_grid_is_jbu_of_the_class_probabilities(tiny):
    x = image(64, 96)
    seg = make(tiny, head="logits", scale=50.0)
    text, _ = seg.text_features(CLASSES)
    f, _ = DenseCLIP(seg.model.visual)(normalise(x[None], seg.mean, seg.std), need_attention=False)
    cos = (F.normalize(f, dim=-1) @ text.T).transpose(1, 2).reshape(1, -1, 4, 6)
    probs = class_max(torch.softmax(50.0 * cos, dim=1))
    torch.testing.assert_close(seg.scores(x, CLASSES, upsample=False), probs[0], rtol=1e-5, atol=1e-6)
    up = jbu_upsample(probs, x[None], backend="reference")[0]
    assert (seg.seg(x, CLASSES) == up.argmax(0)).float().mean() >= 0.999
    assert seg.affinity_fn is None  # the logits head computes no affinity


def test_dslo_head_with_background_threshold(tiny):
    """The DSLO scores decide the class; the probabilities brought up by the same JBU decide background."""
    x = image(64, 96, seed=5)
    seg = make(tiny, mode="op", iters=10)
    text, _ = seg.text_features(CLASSES)
    f, attn = DenseCLIP(seg.model.visual)(normalise(x[None], seg.mean, seg.std))
    q = class_distributions(f, text, scale=100.0, backend="reference")
    s = discrepancy(q, attn, mode="op", iters=10, backend="reference").transpose(1, 2).reshape(1, -1, 4, 6)
    cos = (F.normalize(f, dim=-1) @ text.T).transpose(1, 2).reshape(1, -1, 4, 6)
    probs_up = jbu_upsample(class_max(torch.softmax(100.0 * cos, dim=1)), x[None], backend="reference")[0]
    scores_up = jbu_upsample(class_max(s), x[None], backend="reference")[0]
    thd = float(probs_up.amax(0).median())
    labels = make(tiny, mode="op", iters=10, bg_threshold=thd).seg(x, CLASSES)
    want = scores_up.argmax(0).masked_fill(probs_up.amax(0) < thd, 0)
    assert (labels == want).float().mean() >= 0.999
    plain = seg.seg(x, CLASSES)  # no threshold: the DSLO labels as before
    assert (plain == scores_up.argmax(0)).float().mean() >= 0.999


def test_dslo_head_with_pixel_aggregation(tiny):
    x = image(64, 96)
    seg = make(tiny, aggregation="pixels")  # one window of 4 x 6 patches
    g = make(tiny)
    syn = g._grid_maps(x[None], g.text_features(CLASSES)[0])  # [1, S, 4, 6] synonym scores on the grid
    # each synonym's map goes to pixels bilinearly, then the max over a class's synonyms
    want = class_max(F.interpolate(syn, size=(64, 96), mode="bilinear", align_corners=False))[0]
    got = seg.scores(x, CLASSES)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_per_window_and_batched_paths_agree_for_every_head(tiny):
    x = image(70, 100)
    for kw in ({"head": "logits"}, {"bg_threshold": 0.3}):
        a = make(tiny, window=48, stride=32, **kw).scores(x, CLASSES, upsample=False)
        b = make(tiny, window=48, stride=32, batch_windows=False, **kw).scores(x, CLASSES, upsample=False)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # softmax(100 cos) amplifies float32 noise


def test_guide_must_match_the_image(tiny):  # the bad head keywords: test_segmenter.test_bad_arguments
    seg = make(tiny)
    with pytest.raises(ValueError, match="guide must match image"):
        seg.seg(image(32, 32), CLASSES, guide=[image(32, 32)])
