"""The CLIP-like scenes (issue 29): shapes, reproducibility, exact cosines, a photo-like guide, and the
calibration in smoke form (few seeds, loose bounds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.calibrate_scenes import predict
from ovss_fast.synthetic import (
    BASE_COSINE,
    CLIP_LIKE,
    DATASETS,
    ClipLikeParams,
    boundary_auc,
    clip_like_layout,
    make_clip_like_scene,
    make_dataset_scene,
    miou,
)


@pytest.mark.parametrize("kind", ["voc", "stuff"])
def test_shapes_seeds_and_exact_cosines(kind):
    spec = DATASETS[kind]
    s = make_clip_like_scene(3, kind, "hard", grid=(8, 10), dtype=torch.float64)
    n, c = 80, spec.num_classes
    assert s.feats.shape == (1, n, 512) and s.text.shape == (c, 512) and s.affinity.shape == (1, n, n)
    assert s.guide.shape == (1, 3, 64, 80) and s.labels.shape == (1, 8, 10) and s.labels_full.shape == (1, 64, 80)
    assert 0 <= float(s.guide.min()) and float(s.guide.max()) <= 1
    assert torch.allclose(s.affinity.sum(-1), torch.ones(1, n, dtype=torch.float64))
    if spec.background:
        assert (s.labels_full == 0).any()
    # cosines are BASE_COSINE + logit / 100, the logits centred per patch
    lay = clip_like_layout(3, kind, "hard", grid=(8, 10))
    lg = lay.logits(CLIP_LIKE[kind])
    cos = torch.einsum("nd,cd->nc", s.feats[0], s.text)
    torch.testing.assert_close(cos, BASE_COSINE + (lg - lg.mean(1, keepdim=True)) / 100, rtol=0, atol=1e-9)
    assert torch.equal(lay.labels_full, s.labels_full[0]) and torch.equal(lay.labels.reshape(8, 10), s.labels[0])
    again = make_clip_like_scene(3, kind, "hard", grid=(8, 10), dtype=torch.float64)
    assert torch.equal(again.feats, s.feats) and torch.equal(again.guide, s.guide)
    assert not make_clip_like_scene(4, kind, "hard", grid=(8, 10)).guide.equal(s.guide.float())
    # the text embeddings are the family's, whatever the seed
    assert torch.equal(make_clip_like_scene(5, kind, grid=(4, 4), dtype=torch.float64).text, s.text)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        make_clip_like_scene(0, "ade")
    with pytest.raises(ValueError, match="difficulty"):
        make_clip_like_scene(0, "voc", "medium")
    with pytest.raises(ValueError, match="grid"):
        make_clip_like_scene(0, "voc", grid=(1, 5))
    with pytest.raises(ValueError, match="dim"):
        make_clip_like_scene(0, "stuff", dim=64, grid=(4, 4))
    with pytest.raises(TypeError, match="params"):
        make_clip_like_scene(0, "voc", params={"evidence": 1.0}, grid=(4, 4))
    with pytest.raises(ValueError, match="boundary"):
        boundary_auc(torch.rand(3, 8, 8), torch.zeros(8, 8, dtype=torch.long))


def test_guide_edges_only_partly_follow_class_boundaries():
    """The old scenes' guide finds boundaries almost perfectly; the CLIP-like one as photographs do (0.8-0.9)."""
    new = [boundary_auc(s.guide[0], s.labels_full[0]) for s in
           (make_clip_like_scene(seed, kind) for seed in (0, 1) for kind in ("voc", "stuff"))]
    old = [boundary_auc(s.guide[0], s.labels_full[0]) for s in
           (make_dataset_scene(seed, kind) for seed in (0, 1) for kind in ("voc", "stuff"))]
    assert min(old) > 0.95
    assert 0.72 < sum(new) / len(new) < 0.92, new


def test_calibration_smoke():
    """raw argmax and + KL near the paper's levels (VOC21 0.19 / 0.44, Stuff 0.07 / 0.12), loosely: 4 seeds per
    difficulty on the calibration's own seeds, and KL above raw."""
    bounds = {"voc": (0.08, 0.32, 0.25, 0.62), "stuff": (0.02, 0.16, 0.05, 0.24)}
    for kind, (raw_lo, raw_hi, kl_lo, kl_hi) in bounds.items():
        raw, kl = [], []
        for difficulty in ("easy", "hard"):
            for seed in range(4):
                lay = clip_like_layout(50_000 + seed, kind, difficulty)
                lg = lay.logits(CLIP_LIKE[kind])
                raw.append(miou(predict(lay, lg, "raw"), lay.labels_full, lg.shape[1]))
                kl.append(miou(predict(lay, lg, "kl"), lay.labels_full, lg.shape[1]))
        r, k = sum(raw) / len(raw), sum(kl) / len(kl)
        assert raw_lo < r < raw_hi and kl_lo < k < kl_hi and k > r, (kind, r, k)


def test_logits_follow_the_strengths():
    lay = clip_like_layout(0, "voc", "easy", grid=(6, 6))
    p = ClipLikeParams(evidence=2.0, bias=0.0, noise=0.0)
    lg = lay.logits(p)
    assert torch.equal(lg.argmax(1), lay.labels)  # evidence alone: raw argmax is the truth
    q = dataclasses.replace(p, bias=3.0)
    diff = lay.logits(q) - lg  # the bias terms are the same on every patch
    assert torch.allclose(diff, diff[:1].expand_as(diff))
