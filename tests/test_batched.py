"""Batched windows (Segmenter._grid_scores): all windows of the images of one size go through the
visual tower and the DSLO head in a few chunked calls; the result must equal a per-window
computation written out here (float32: rel. error <= 1e-4, labels equal except near-ties).

Tiny random-weight open_clip model, CPU; every test runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the segmentation pipeline needs open_clip_torch")

from conftest import rel_err, tiny_segmenter  # noqa: E402

from ovss_fast.models.clip_features import normalise  # noqa: E402
from ovss_fast.ops.api import class_distributions, discrepancy, jbu_upsample  # noqa: E402
from ovss_fast.pipeline.segmenter import Segmenter  # noqa: E402
from ovss_fast.pipeline.windows import WindowLayout, window_starts  # noqa: E402

TOL = 1e-4
CLASSES = ["cat; kitten; kitty", "dog; puppy", "grass", "sky; clouds"]  # 8 synonym columns
TEMPLATES = ("a photo of a {}.",)


def segmenter(tiny, **kw):
    return tiny_segmenter(tiny, TEMPLATES, **kw)


def images(batch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, h, w, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2).clamp(0, 1)


@torch.no_grad()
def per_window(seg: Segmenter, img: torch.Tensor, class_names, affinity=None) -> torch.Tensor:
    """Synonym-max class scores [B, C, gh, gw] computed one window and one image at a time, spelled out."""
    text, groups = seg.text_features(class_names)
    text = text.to(img.device)
    B, _, H, W = img.shape
    gh, gw = seg.grid_for(H, W)
    ph, pw = seg.patch
    x = img if (gh * ph, gw * pw) == (H, W) else torch.nn.functional.interpolate(
        img, size=(gh * ph, gw * pw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    wh, ww = (gh, gw) if seg.window is None else (min(seg.window[0], gh), min(seg.window[1], gw))
    sh, sw = (gh, gw) if seg.window is None else seg.stride
    total = torch.zeros(B, text.shape[0], gh, gw, dtype=torch.float64, device=img.device)
    count = torch.zeros(gh, gw, dtype=torch.float64, device=img.device)
    for y0 in window_starts(gh, wh, sh):
        for x0 in window_starts(gw, ww, sw):
            count[y0:y0 + wh, x0:x0 + ww] += 1
            for b in range(B):
                crop = x[b:b + 1, :, y0 * ph:(y0 + wh) * ph, x0 * pw:(x0 + ww) * pw]
                feats, attn = seg.dense(normalise(crop, seg.mean, seg.std))
                aff = None if seg.mode == "kl" else attn if affinity is None else affinity(crop, (wh, ww))
                q = class_distributions(feats.float(), text, backend="reference")
                s = discrepancy(q, aff, mode=seg.mode, backend="reference")  # [1, n, S]
                total[b, :, y0:y0 + wh, x0:x0 + ww] += s[0].T.reshape(-1, wh, ww).double()
    syn = total / count
    return torch.stack([syn[:, g].amax(dim=1) for g in groups], dim=1).float()


def labels_agree_off_ties(labels: torch.Tensor, ref_scores: torch.Tensor) -> None:
    """labels [B, H, W] must be the argmax of ref_scores [B, C, H, W] except where its top two are within TOL."""
    ref = ref_scores.argmax(dim=1)
    differ = labels != ref
    if bool(differ.any()):
        top2 = ref_scores.topk(2, dim=1).values
        tie = (top2[:, 0] - top2[:, 1]) <= TOL * ref_scores.abs().amax()
        assert bool(tie[differ].all()), f"{int((differ & ~tie).sum())} labels differ away from near-ties"


class Recorder:
    """A callable affinity that records the batch it is called with: a Gaussian of the colour distance."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], tuple[int, int]]] = []

    def __call__(self, img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.calls.append((tuple(img.shape), tuple(grid)))
        assert float(img.min()) >= 0 and float(img.max()) <= 1  # the crops in [0, 1], not normalised
        pooled = torch.nn.functional.adaptive_avg_pool2d(img, grid).flatten(2).transpose(1, 2)  # [B, n, 3]
        return torch.exp(-torch.cdist(pooled, pooled) ** 2 / 0.02)


# --------------------------------------------------------------------------- equality with the per-window loop
@pytest.mark.parametrize("mode", ["mv", "op", "kl"])
def test_batched_equals_per_window_with_synonyms_and_two_images(tiny, mode):
    seg = segmenter(tiny, mode=mode, window=48, stride=32)
    x = images(2, 80, 112, seed=1)  # grid 5 x 7: windows at rows 0, 2 and columns 0, 2, 4 -> 6 per image
    batched = seg.scores(x, CLASSES, upsample=False)
    expected = per_window(seg, x, CLASSES)
    assert batched.shape == (2, 4, 5, 7)
    assert rel_err(batched, expected) <= TOL
    # the kept per-window path gives the same
    loop = segmenter(tiny, mode=mode, window=48, stride=32, batch_windows=False).scores(x, CLASSES, upsample=False)
    assert rel_err(loop, expected) <= TOL
    # labels: equal to the per-window scores' argmax after the same upsampling, except near-ties
    labels = seg.seg(x, CLASSES)
    labels_agree_off_ties(labels, jbu_upsample(expected, x, backend="reference"))


@pytest.mark.parametrize("mode", ["mv", "op"])
def test_forced_chunking_and_a_callable_affinity(tiny, mode):
    x = images(2, 80, 112, seed=2)
    probe = segmenter(tiny, mode=mode, window=48, stride=32)
    one = probe.memory_estimate(80, 112, synonyms=8)  # bytes of one window, 8 synonym columns
    rec = Recorder()
    seg = segmenter(tiny, mode=mode, window=48, stride=32, affinity=rec, memory_budget=2.5 * one)
    assert seg.memory_estimate(80, 112, batch=2, synonyms=8) <= seg.memory_budget
    got = seg.scores(x, CLASSES, upsample=False)
    # 2 images x 6 windows in chunks of 2: the affinity is called once per chunk with the chunk's crops
    assert rec.calls == [((2, 3, 48, 48), (3, 3))] * 6
    expected = per_window(seg, x, CLASSES, affinity=Recorder())
    assert rel_err(got, expected) <= TOL
    # without a small budget, the 12 windows go through as one chunk
    rec_all = Recorder()
    whole = segmenter(tiny, mode=mode, window=48, stride=32, affinity=rec_all).scores(x, CLASSES, upsample=False)
    assert rec_all.calls == [((12, 3, 48, 48), (3, 3))]
    assert rel_err(whole, expected) <= TOL


def test_chunk_of_odd_size_spans_two_images(tiny):
    # 3 windows per chunk: a chunk holds windows of both images
    x = images(2, 80, 112, seed=3)
    one = segmenter(tiny, window=48, stride=32).memory_estimate(80, 112, synonyms=8)
    rec = Recorder()
    seg = segmenter(tiny, window=48, stride=32, affinity=rec, memory_budget=3.2 * one)
    got = seg.scores(x, CLASSES, upsample=False)
    assert [c[0][0] for c in rec.calls] == [3, 3, 3, 3]
    assert rel_err(got, per_window(seg, x, CLASSES, affinity=Recorder())) <= TOL


def test_one_window_over_budget_names_a_window(tiny):
    x = images(1, 128, 128)
    seg = segmenter(tiny, memory_budget=segmenter(tiny).memory_estimate(128, 128, synonyms=8) * 0.9)
    with pytest.raises(ValueError, match=r"pass window=\d+, stride=\d+"):
        seg.scores(x, CLASSES, upsample=False)


def test_compiled_backend_on_window_batches(tiny):
    # the default backend gets B = windows in one call; it must match the per-window reference too
    x = images(2, 80, 112, seed=4)
    for mode in ("mv", "op"):
        seg = segmenter(tiny, mode=mode, window=48, stride=32, backend="auto")
        assert rel_err(seg.scores(x, CLASSES, upsample=False), per_window(seg, x, CLASSES)) <= TOL


# --------------------------------------------------------------------------- images of one size go together
def test_list_images_of_one_size_are_grouped(tiny):
    a, b, c = images(1, 80, 112, seed=5)[0], images(1, 64, 96, seed=6)[0], images(1, 80, 112, seed=7)[0]
    rec = Recorder()
    seg = segmenter(tiny, window=48, stride=32, affinity=rec)
    out = seg.scores([a, b, c], CLASSES, upsample=False)
    # a and c (80 x 112, 6 windows each) in one call, b (64 x 96, 6 windows) in another
    assert sorted(call[0][0] for call in rec.calls) == [6, 12]
    assert [o.shape for o in out] == [(4, 5, 7), (4, 4, 6), (4, 5, 7)]
    for img, o in zip((a, b, c), out, strict=True):
        assert rel_err(o, per_window(seg, img[None], CLASSES, affinity=Recorder())[0]) <= TOL
    labels = seg.seg([a, b, c], CLASSES)
    assert [tuple(lab.shape) for lab in labels] == [(80, 112), (64, 96), (80, 112)]


def test_whole_image_batch_is_one_call(tiny):
    rec = Recorder()
    seg = segmenter(tiny, affinity=rec)
    x = images(3, 64, 96, seed=8)
    got = seg.scores(x, CLASSES, upsample=False)
    assert rec.calls == [((3, 3, 64, 96), (4, 6))]
    assert rel_err(got, per_window(seg, x, CLASSES, affinity=Recorder())) <= TOL


# --------------------------------------------------------------------------- the window layout
@pytest.mark.parametrize("grid,cells,stride", [((5, 7), (3, 3), (2, 2)), ((4, 6), (4, 6), (2, 3)),
                                               ((9, 4), (4, 4), (3, 1)), ((1, 1), (1, 1), (1, 1))])
def test_window_layout_matches_slicing(grid, cells, stride):
    layout = WindowLayout.build(grid, cells, stride)
    (gh, gw), (wh, ww) = grid, cells
    starts = [(y, x) for y in window_starts(gh, wh, stride[0]) for x in window_starts(gw, ww, stride[1])]
    assert layout.starts.tolist() == [list(s) for s in starts]
    count = torch.zeros(gh, gw)
    for y, x in starts:
        count[y:y + wh, x:x + ww] += 1
    assert torch.equal(layout.count, count.flatten())
    x01 = torch.rand(2, 3, gh * 4, gw * 4)
    items = torch.arange(2 * len(starts))
    crops = layout.gather(x01, items, (4, 4))
    for i, (y, x) in enumerate(starts * 2):
        b = i // len(starts)
        assert torch.equal(crops[i], x01[b, :, y * 4:(y + wh) * 4, x * 4:(x + ww) * 4])
    flat = layout.flat_index(items)
    ids = torch.arange(2 * gh * gw).reshape(2, gh, gw)
    for i, (y, x) in enumerate(starts * 2):
        assert torch.equal(flat[i], ids[i // len(starts), y:y + wh, x:x + ww].flatten())


def test_prediction_times_every_stage(tiny):
    seg = segmenter(tiny, window=48, stride=32, affinity=Recorder())
    pred = seg.predict(images(1, 80, 112), CLASSES)
    assert list(pred.timings) == ["text", "visual", "affinity", "class_distributions", "discrepancy", "jbu", "total"]
    assert all(t >= 0 for t in pred.timings.values())
    assert pred.timings["total"] >= sum(t for k, t in pred.timings.items() if k != "total")
    assert not hasattr(seg, "stage_timer")  # nothing timed on the shared object
    with pytest.raises(TypeError, match="batch_windows"):
        segmenter(tiny, batch_windows="yes")


# --------------------------------------------------------------------------- the eval loop's clock
def test_run_loop_times_the_loader_wait_and_predicts_in_inference_mode():
    import time

    from ovss_fast.eval.harness import format_report, make_report, run_loop

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            time.sleep(0.05)  # a slow image decoder
            return {"label": torch.zeros(4, 4, dtype=torch.int64)}

    modes = []

    def predict(item):
        modes.append(torch.is_inference_mode_enabled())
        time.sleep(0.02)
        return torch.zeros(4, 4, dtype=torch.int64)

    out = run_loop(Slow(), predict, 2)
    assert modes == [True] * 3
    assert out.wait_seconds >= 3 * 0.05 and out.predict_seconds >= 3 * 0.02
    assert out.wait_seconds + out.predict_seconds <= out.seconds
    report = make_report(out, ["a", "b"], {})
    assert 0.5 < report["loader_wait_share"] < 1 and report["loader_wait_seconds"] >= 0.15
    assert "waiting on the data loader" in format_report(report)


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.float16, 1e-2)])
@pytest.mark.parametrize("mode", ["mv", "op"])
def test_batched_equals_per_window_on_cuda(tiny, mode, dtype, tol):
    model, tok = tiny
    import copy

    gpu = copy.deepcopy(model)
    seg = Segmenter.from_model(gpu, tok, templates=TEMPLATES, device="cuda", dtype=dtype, mode=mode, window=48,
                               stride=32)
    x = images(2, 80, 112, seed=9).cuda()
    got = seg.scores(x, CLASSES, upsample=False)
    assert got.is_cuda and got.dtype == torch.float32
    assert rel_err(got, per_window(seg, x, CLASSES)) <= tol
    loop = Segmenter.from_model(gpu, tok, templates=TEMPLATES, device="cuda", dtype=dtype, mode=mode, window=48,
                                stride=32, batch_windows=False)
    assert rel_err(loop.scores(x, CLASSES, upsample=False), got) <= tol


# --------------------------------------------------------------------------- affinity sources that declare their memory
def test_affinity_memory_per_crop_is_counted_in_the_chunks(tiny):
    class Heavy(Recorder):
        def memory_per_crop(self, grid):
            assert grid == (3, 3)
            return 10**6

    x = images(1, 80, 112, seed=10)
    plain = segmenter(tiny, window=48, stride=32, affinity=Recorder()).memory_estimate(80, 112, synonyms=8)
    rec = Heavy()
    seg = segmenter(tiny, window=48, stride=32, affinity=rec, memory_budget=3 * (plain + 10**6) + 1)
    assert seg.memory_estimate(80, 112, synonyms=8) == plain + 10**6
    got = seg.scores(x, CLASSES, upsample=False)
    assert [c[0][0] for c in rec.calls] == [3, 3]  # without the 1 MB per crop, 6 windows would fit in one call
    assert rel_err(got, per_window(seg, x, CLASSES, affinity=Recorder())) <= TOL


def test_dino_declares_its_memory_per_crop():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'ovss_fast[dino]')")
    from ovss_fast.models.affinity import DinoAffinity

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                              depth=2)
    dino = DinoAffinity(model=model, device="cpu")
    n, t, d, heads = 9, 10, 192, 3  # vit_tiny: width 192, 3 heads, one class token
    assert dino.memory_per_crop((3, 3)) == 12 * t * d * 4 + 2 * heads * t * t * 4 + n * d * 4 + n * n * 4


def test_sd2_memory_per_crop_arithmetic():
    # the formula alone (diffusers is optional): an object with the attributes memory_per_crop reads
    from ovss_fast.models.affinity import SD2Affinity

    sd2 = SD2Affinity.__new__(SD2Affinity)
    sd2.dtype = torch.float16
    sd2._capture_sizes = [(20, 16)] * 3 + [(10, 4)] * 3  # SD2: up_blocks.1 (20 heads, L/16), up_blocks.2 (10, L/4)
    pixels = (32 * 14) ** 2  # a 14 x 14 grid (224 px window) is resized to 448 x 448
    tokens = pixels // 64
    expected = (4 * 128 * pixels * 2 + 30 * tokens * 320 * 2 + tokens**2 * 2 + 2 * 10 * (tokens // 4) ** 2 * 2
                + 3 * ((tokens // 16) ** 2 + (tokens // 4) ** 2) * 4)
    assert sd2.memory_per_crop((14, 14)) == expected  # about 0.3 GB per 224 px window
    assert sd2.memory_per_crop((3, 5)) == SD2Affinity.memory_per_crop(sd2, (4, 6))  # rounded up to even
