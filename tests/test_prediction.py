"""``Segmenter.predict``: one model run per request, everything in one Prediction (issue 26, item 2).

Labels and scores equal ``seg`` / ``scores`` (which are views of it); the window fallbacks and the
stage timings belong to the call, so two threads segmenting at once each get their own.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")

from ovss_fast.ops.options import HeadOptions  # noqa: E402
from ovss_fast.pipeline.prediction import Fallback, Prediction  # noqa: E402
from ovss_fast.pipeline.segmenter import Segmenter  # noqa: E402

CLASSES = ["cat; kitten", "dog", "grass"]
TEMPLATES = ("a {}.",)


def segmenter(tiny, **kw):
    model, tok = tiny
    kw.setdefault("backend", "auto")  # the compiled CPU ops when built: fast; predict vs seg holds on any
    return Segmenter.from_model(model, tok, templates=TEMPLATES, device="cpu", **kw)


def image(h, w, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch or 1, 3, h, w), generator=g)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2).clamp(0, 1)
    return x[0] if batch is None else x


def same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.mark.parametrize("kw", [{"window": 32, "stride": 16}, {"bg_threshold": 0.3},
                                {"aggregation": "pixels", "resize": 48}])
def test_predict_is_seg_and_scores_in_one_run(tiny, kw):
    seg = segmenter(tiny, **kw)
    for x in (image(48, 64), image(48, 64, batch=2), [image(48, 64), image(32, 48, seed=1), image(48, 64, seed=2)]):
        pred = seg.predict(x, CLASSES, upsample_scores=True)
        assert isinstance(pred, Prediction)
        assert same(pred.labels, seg.seg(x, CLASSES))
        assert same(pred.scores, seg.scores(x, CLASSES, upsample=False))
        assert same(pred.scores_full, seg.scores(x, CLASSES))
        assert seg.predict(x, CLASSES).scores_full is None
    assert pred.class_names == ["cat; kitten", "dog", "grass"]
    assert pred.options == seg.options and isinstance(pred.options, HeadOptions)
    assert pred.settings["mode"] == "mv" and pred.settings["device"] == "cpu"
    assert pred.fallbacks == [] and not pred.fell_back


def test_predict_with_a_guide_answers_at_the_guide_size(tiny):
    seg = segmenter(tiny)
    x, guide = image(32, 48), image(50, 70, seed=3)
    pred = seg.predict(x, CLASSES, guide=guide, upsample_scores=True)
    assert pred.labels.shape == (50, 70) and pred.scores_full.shape == (3, 50, 70)
    assert torch.equal(pred.labels, seg.seg(x, CLASSES, guide=guide))


def test_one_model_run_per_predict(tiny, monkeypatch):
    seg = segmenter(tiny, window=32, stride=16)
    calls = []

    class Counted:
        def __init__(self, dense):
            self.dense = dense

        def __call__(self, *a, **k):
            calls.append(1)
            return self.dense(*a, **k)

        def __getattr__(self, name):
            return getattr(self.dense, name)

    seg.dense = Counted(seg.dense)
    seg.predict(image(48, 64), CLASSES, upsample_scores=True)
    assert len(calls) == 1  # the four windows in one chunk, once: labels, grid and full scores from it


def budget_for(seg, h, w):
    """A memory budget that holds an (h, w) image as one window and nothing larger."""
    synonyms = 4
    return seg.memory_estimate(h, w, synonyms=synonyms)


def test_fallbacks_name_the_images_and_why(tiny):
    probe = segmenter(tiny)
    budget = budget_for(probe, 48, 48)
    seg = segmenter(tiny, memory_budget=budget, fallback_window=32)
    small, large = image(48, 48), image(64, 96, seed=1)
    pred = seg.predict([small, large, small, large], CLASSES)
    assert len(pred.fallbacks) == 1
    fb = pred.fallbacks[0]
    assert isinstance(fb, Fallback) and fb.images == (1, 3) and fb.size == (64, 96)
    assert (fb.window, fb.fallback) == (None, (32, 32)) and "over memory_budget" in fb.reason
    assert seg.predict(small, CLASSES).fallbacks == []  # nothing left over from the previous call
    assert not hasattr(seg.windows, "fallbacks")
    single = seg.predict(large, CLASSES)
    assert [f.images for f in single.fallbacks] == [(0,)]
    assert torch.equal(single.labels, pred.labels[1])


def test_the_eval_predictor_records_fallbacks_from_the_prediction(tiny):
    from ovss_fast.eval import SegmenterPredictor

    seg = segmenter(tiny, memory_budget=budget_for(segmenter(tiny), 48, 48), fallback_window=32)
    predict = SegmenterPredictor(seg, CLASSES, short_side=48)
    predict({"image": torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8), "name": "fits"})
    predict({"image": torch.randint(0, 256, (3, 48, 100), dtype=torch.uint8), "name": "wide"})
    assert predict.fell_back == [{"name": "wide", "size": [48, 100], "resized": [48, 96]}]


def test_two_threads_at_once_get_their_own_timings_and_fallbacks(tiny):
    """Both calls are inside the pipeline at the same time (a barrier in the affinity source): each
    Prediction holds its own fallbacks, and its timings include the wait at the barrier."""
    barrier = threading.Barrier(2, timeout=120)
    waited = threading.local()

    def affinity(crops, grid):
        if not getattr(waited, "done", False):  # once per thread: both threads are in the pipeline now
            waited.done = True
            barrier.wait()
        n = grid[0] * grid[1]
        return torch.softmax(torch.randn(crops.shape[0], n, n, generator=torch.Generator().manual_seed(n)), -1)

    affinity.memory_per_crop = lambda cells: 0
    probe = segmenter(tiny, affinity=affinity)
    seg = segmenter(tiny, affinity=affinity, memory_budget=budget_for(probe, 48, 48), fallback_window=32)
    small, large = image(48, 48), image(64, 96, seed=1)
    waited.done = True  # the main thread does not take part in the barrier
    want_small = seg.predict(small, CLASSES)
    results = {}

    def run(name, x):
        results[name] = seg.predict(x, CLASSES)

    threads = [threading.Thread(target=run, args=("small", small)), threading.Thread(target=run, args=("large", large))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == {"small", "large"}
    assert results["small"].fallbacks == [] and [f.images for f in results["large"].fallbacks] == [(0,)]
    assert torch.equal(results["small"].labels, want_small.labels)
    for pred in results.values():
        assert set(pred.timings) >= {"text", "visual", "affinity", "discrepancy", "jbu", "total"}
        assert pred.timings["total"] >= sum(t for k, t in pred.timings.items() if k != "total")
    assert results["small"].timings is not results["large"].timings
