"""``refine`` in the pipeline: "jbu" | "bilinear" | "pamr" (issue 27), and NACLIP's tail.

- the head options ``refine``, ``pamr_iters``, ``pamr_dilations`` and :func:`ovss_fast.refine_scores`;
- ``segment_features`` and the Segmenter with each refiner against the same steps done by hand;
- NACLIP's tail (their pixel logits -> bilinear to the image -> their PAMR on the normalised image, resized
  the same way -> softmax(40 logits), max over a class's queries, argmax, prob_thd) against ours on the same
  logits and image: a transcription written here (always run), and NACLIP's own ``pamr.py`` from a fetched
  copy when ``OVSS_FAST_NACLIP=/path/to/NACLIP`` is set (skipped otherwise). Labels must agree except where
  the top two class probabilities are within 1e-4 of each other or the best one within 1e-4 of prob_thd.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_segmenter

import ovss_fast
from ovss_fast.kernels import reference as R
from ovss_fast.ops.options import HeadOptions, flag

open_clip = pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")

TEMPLATES = ("a photo of a {}.",)
NACLIP_PATH = os.environ.get("OVSS_FAST_NACLIP")
OPENAI_MEAN = (122.771 / 255, 116.746 / 255, 104.094 / 255)  # NACLIP's 0-255 constants (peers.md)
OPENAI_STD = (68.501 / 255, 66.632 / 255, 70.323 / 255)
NEAR = 1e-4


def _image(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=g)
    return F.avg_pool2d(x, 5, 1, 2).clamp(0, 1)  # some structure for PAMR's affinities


# --------------------------------------------------------------------------- the options and refine_scores
def test_refine_options_are_pamrs_keywords_and_flags():
    o = HeadOptions()
    assert (o.refine, o.pamr_iters, o.pamr_dilations) == ("jbu", 10, (8, 16))
    assert set(o.for_op("refine")) == {"refine", "pamr_iters", "pamr_dilations"}
    params = inspect.signature(ovss_fast.pamr).parameters
    for key, value in o.pamr_params().items():  # the same defaults as the op's own
        assert params[key].default == value, key
    assert HeadOptions(pamr_dilations=[1, 2, 4]).pamr_dilations == (1, 2, 4)
    with pytest.raises(ValueError, match=r"refine must be one of 'jbu', 'pamr', 'bilinear', 'lposs\+'; got 'crf'"):
        HeadOptions(refine="crf")
    with pytest.raises(ValueError, match="pamr_iters must be >= 0"):
        HeadOptions(pamr_iters=-1)
    with pytest.raises(ValueError, match=r"pamr_dilations\[1\] must be >= 1"):
        HeadOptions(pamr_dilations=(8, 0))
    from ovss_fast.apps import flags
    from ovss_fast.apps.segment import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["x.png", "--classes", "a, b", "--out", "l.png", "--refine", "pamr", "--pamr-iters", "50",
                       "--pamr-dilations", "1,2,4,8,12,24"])
    assert flags.method_kwargs(ns) == {"refine": "pamr", "pamr_iters": 50, "pamr_dilations": (1, 2, 4, 8, 12, 24)}
    ns.pamr_dilations = (8, -1)
    with pytest.raises(ValueError, match=rf"{flag('pamr_dilations')}\[1\] must be >= 1"):
        flags.check_method_arguments(ns)


def test_refine_scores():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g)
    s[0, 1, :2] = float("-inf")  # a class NMS emptied in part of an image
    up = ovss_fast.refine_scores(s, (9, 11))
    want = F.interpolate(s.clamp_min(ovss_fast.ops.api.REFINE_FLOOR), size=(9, 11), mode="bilinear",
                         align_corners=False)
    assert torch.equal(up, want) and not up.isnan().any()
    image = _image(2, 9, 11, 1)
    out = ovss_fast.refine_scores(s, (9, 11), image=image, iters=3, dilations=(1, 2), backend="reference")
    torch.testing.assert_close(out, R.pamr(want, image, iters=3, dilations=(1, 2)), rtol=0, atol=0)
    assert not out.isnan().any()
    assert torch.equal(ovss_fast.refine_scores(s, (4, 5)), s.clamp_min(ovss_fast.ops.api.REFINE_FLOOR))
    with pytest.raises(ValueError, match=r"image must be 9 x 11 \(the output size\) for PAMR"):
        ovss_fast.refine_scores(s, (9, 11), image=image[..., :10])


@pytest.mark.parametrize("refine", ["bilinear", "pamr"])
def test_segment_features_refines(refine):
    g = torch.Generator().manual_seed(2)
    feats, text = torch.randn(1, 12, 8, generator=g), torch.randn(3, 8, generator=g)
    guide = _image(1, 15, 20, 3)
    labels, scores = ovss_fast.segment_features(feats, text, None, grid=(3, 4), guide=guide, mode="kl",
                                                backend="reference", refine=refine, pamr_iters=2,
                                                return_scores=True)
    up = F.interpolate(scores, size=(15, 20), mode="bilinear", align_corners=False)
    if refine == "pamr":
        up = R.pamr(up, guide, iters=2, dilations=(8, 16))
    assert torch.equal(labels, up.argmax(1))


# --------------------------------------------------------------------------- the Segmenter
@pytest.mark.parametrize("refine", ["bilinear", "pamr"])
def test_segmenter_refines_the_maps(tiny, refine):
    """Head dslo, one name per class: the labels are the refined patch-grid scores' argmax at the guide's size,
    PAMR on the processed image normalised with the model's mean / std and resized to the guide."""
    classes = ["cat", "dog", "grass"]
    img, guide = _image(1, 32, 48, 4), _image(1, 45, 70, 5)
    seg = tiny_segmenter(tiny, TEMPLATES, mode="kl", refine=refine, pamr_iters=3, pamr_dilations=(1, 4))
    grid = seg.scores(img, classes, upsample=False)  # [1, C, gh, gw]
    image = None
    if refine == "pamr":
        mean, std = torch.tensor(seg.mean).view(1, 3, 1, 1), torch.tensor(seg.std).view(1, 3, 1, 1)
        image = F.interpolate((img - mean) / std, size=(45, 70), mode="bilinear", align_corners=False)
    want = ovss_fast.refine_scores(grid, (45, 70), image=image, iters=3, dilations=(1, 4), backend="reference")
    torch.testing.assert_close(seg.scores(img, classes, guide=guide), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(seg.seg(img, classes, guide=guide), want.argmax(1))
    assert seg.options.refine == refine


# --------------------------------------------------------------------------- NACLIP's tail
def _replicate_taps(t, dilations, centre):
    """[B, K, H, W] -> [B, K, P, H, W]: each pixel's dilated 3 x 3 neighbours (with or without the centre),
    replicate padding, in the peers' order (per dilation, row by row)."""
    H, W = t.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(t, [d] * 4, mode="replicate")
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == dx == 0 and not centre:
                    continue
                out.append(padded[..., d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W])
    return torch.stack(out, 2)


def _transcribed_pamr(iters, dilations):
    """The peers' PAMR module's computation (pamr.py in NACLIP and SCLIP), written out: ``(image, mask) -> mask``."""

    def run(x, mask):
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
        std = _replicate_taps(x, dilations, True).std(2, keepdim=True)
        aff = -(x.unsqueeze(2) - _replicate_taps(x, dilations, False)).abs() / (1e-8 + 0.1 * std)
        aff = torch.softmax(aff.mean(1, keepdim=True), 2)
        for _ in range(iters):
            mask = (_replicate_taps(mask, dilations, False) * aff).sum(2)
        return mask

    return run


def _naclip_tail(pamr_module, logits, inputs, size, scale, groups, prob_thd):
    """NACLIP's predict + postprocess_result after the logits: logits [1, Q, h, w] at the processed size,
    inputs [1, 3, h, w] the normalised processed image -> (labels [H, W], class probabilities [C, H, W])."""
    seg_logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    img = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)
    seg_logits = pamr_module(img, seg_logits.to(img.dtype))
    probs = torch.softmax(seg_logits[0] * scale, dim=0)
    probs = torch.stack([probs[g].max(0)[0] for g in groups])  # their one_hot(query_idx) max over queries
    pred = probs.argmax(0)
    pred[probs.max(0)[0] < prob_thd] = 0
    return pred, probs


def _compare_with_naclip(tiny, pamr_module, iters, dilations):
    classes = ["background; sky; wall", "cat; kitten", "dog", "grass"]
    groups = [[0, 1, 2], [3, 4], [5], [6]]
    img, guide = _image(1, 24, 40, 6), _image(1, 37, 61, 7)
    g = torch.Generator().manual_seed(8)
    low = torch.rand(1, 7, 6, 10, generator=g) * 0.1 + 0.15  # cosine-like pixel logits, smooth at pixel scale
    logits = F.interpolate(low, size=(24, 40), mode="bilinear", align_corners=False)
    seg = tiny_segmenter(tiny, TEMPLATES, head="logits", aggregation="pixels", refine="pamr", scale=40.0,
                         bg_threshold=0.1, pamr_iters=iters, pamr_dilations=dilations)
    assert seg.mean == pytest.approx(OPENAI_MEAN, abs=1e-5) and seg.std == pytest.approx(OPENAI_STD, abs=1e-5)
    seg._grid_maps = lambda img, text, record=None, pixels=False: logits  # ours from the same logits on
    ours = seg.seg(img, classes, guide=guide)[0]
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    theirs, probs = _naclip_tail(pamr_module, logits, (img - mean) / std, (37, 61), 40.0, groups, 0.1)
    top2 = probs.topk(2, dim=0).values
    settled = ((top2[0] - top2[1]) > NEAR) & ((top2[0] - 0.1).abs() > NEAR)
    assert settled.float().mean() > 0.9 and len(ours[settled].unique()) >= 2
    assert torch.equal(ours[settled], theirs[settled])
    return ours, theirs


@pytest.mark.parametrize("iters, dilations", [(10, (8, 16)), (50, (1, 2, 4, 8, 12, 24))])
def test_naclip_tail_transcribed(tiny, iters, dilations):
    _compare_with_naclip(tiny, _transcribed_pamr(iters, dilations), iters, dilations)


@pytest.mark.skipif(not NACLIP_PATH, reason="set OVSS_FAST_NACLIP to a fetched copy of sinahmr/NACLIP")
@pytest.mark.parametrize("iters, dilations", [(10, (8, 16)), (50, (1, 2, 4, 8, 12, 24))])
def test_naclip_tail_their_pamr(tiny, iters, dilations):
    """Their own PAMR module, imported from the fetched copy (only torch needed)."""
    path = Path(NACLIP_PATH) / "pamr.py"
    assert path.exists(), f"OVSS_FAST_NACLIP={NACLIP_PATH} has no pamr.py"
    spec = importlib.util.spec_from_file_location("naclip_pamr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _compare_with_naclip(tiny, module.PAMR(iters, dilations=list(dilations)), iters, dilations)


def test_web_page_has_the_refine_control():
    from ovss_fast.apps import web

    assert "refine" in [c.name for c in web.CONTROLS] and web.segmenter_accepts("refine")
    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    args = parser.parse_args(["--model", "ovss-fast-tiny", "--backend", "reference", "--refine", "pamr",
                              "--pamr-dilations", "1,2"])
    control = next(c for c in web.CONTROLS if c.name == "refine")
    assert web.control_choices(control, args) == (["pamr", "jbu", "bilinear", "lposs+"], "pamr")  # the start first
    ns, kw = web.request_options(args, {"refine": "bilinear"})
    assert kw["refine"] == "bilinear" and ns.pamr_dilations == (1, 2)
    with pytest.raises(ValueError, match=r"refine must be one of 'pamr', 'jbu', 'bilinear', 'lposs\+', got 'crf'"):
        web.request_options(args, {"refine": "crf"})


@pytest.mark.parametrize("refine", ["bilinear", "pamr"])
def test_synthetic_predictor_refines_the_cosines(refine):
    """``eval --synthetic`` with head logits: the scene's cosines refined (PAMR on the scene's guide), argmax."""
    from ovss_fast.eval.harness import SyntheticScenes, synthetic_predictor

    item = SyntheticScenes(1, seed=0)[0]
    s = item["scene"]
    cos = F.normalize(s.feats.float(), dim=-1) @ F.normalize(s.text.float(), dim=-1).t()
    cos = cos.transpose(1, 2).reshape(1, -1, *s.grid)
    size = tuple(s.guide.shape[-2:])
    want = ovss_fast.refine_scores(cos, size, image=s.guide if refine == "pamr" else None, iters=2,
                                   backend="reference").argmax(1)[0]
    got = synthetic_predictor("kl", "reference", head="logits", refine=refine, pamr_iters=2)(item)
    assert torch.equal(got, want)
    jbu = synthetic_predictor("kl", "reference", head="logits")(item)
    assert not torch.equal(got, jbu)  # the refiner is used, not JBU
