"""bench/bench_ablation.py in its --smoke mode, and the dataset-like scenes it runs on."""

from __future__ import annotations

import re

import pytest
import torch

from ovss_fast.synthetic import DATASETS, make_dataset_scene, make_scene, miou


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_dataset_scene_shapes_classes_and_seeds(kind):
    spec = DATASETS[kind]
    a = make_dataset_scene(3, kind, difficulty="hard")
    h, w = spec.grid
    n = h * w
    assert a.feats.shape == (1, n, 512) and a.text.shape == (spec.num_classes, 512)
    assert a.affinity.shape == (1, n, n) and a.guide.shape == (1, 3, h * spec.patch_px, w * spec.patch_px)
    assert float(a.guide.min()) >= 0 and float(a.guide.max()) <= 1
    present = a.labels_full.unique()
    lo, hi = spec.present
    assert lo <= present.numel() <= hi and int(present.max()) < spec.num_classes
    assert set(a.labels.unique().tolist()) <= set(present.tolist())
    if spec.background:
        assert 0 in present.tolist()
    b = make_dataset_scene(3, kind, difficulty="hard")
    assert torch.equal(a.feats, b.feats) and torch.equal(a.labels_full, b.labels_full)
    c = make_dataset_scene(4, kind, difficulty="hard")
    assert not torch.equal(a.feats, c.feats)
    small = make_dataset_scene(3, kind, grid=(6, 7))
    assert small.labels.shape == (1, 6, 7) and small.guide.shape[-2:] == (6 * spec.patch_px, 7 * spec.patch_px)


def test_dataset_scene_rejects_unknown_kind_and_difficulty():
    with pytest.raises(ValueError, match="kind"):
        make_dataset_scene(0, "ade")
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset_scene(0, "voc", difficulty="medium")


def test_make_scene_unchanged_by_the_dataset_scenes():
    """The demo's scene keeps its numbers (the per-image code is now shared with make_dataset_scene)."""
    s = make_scene()
    assert float(s.feats.double().sum()) == pytest.approx(-86.96753968732509, rel=1e-9)
    assert float(s.guide.double().sum()) == pytest.approx(56620.097187675536, rel=1e-9)
    assert int(s.labels.sum()) == 1294 and int(s.labels_full.sum()) == 83074


def test_miou_counts_classes_in_prediction_or_target():
    t = torch.tensor([0, 0, 1, 1])
    assert miou(t, t, 3) == 1.0
    assert miou(torch.tensor([0, 0, 1, 2]), t, 3) == pytest.approx((1 + 0.5 + 0) / 3)
    assert miou(torch.tensor([5, 5, 5, 5]), torch.tensor([5, 5, 5, 5]), 3) == 0.0  # out of range: no class


@pytest.fixture
def one_thread():
    """The smoke run's matrices are small: one thread avoids OpenMP spinning on a busy CI core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ablation_smoke_writes_section_and_decides(tmp_path, one_thread):
    from bench import bench_ablation as B

    res = B.run(B.SMOKE, log=lambda _: None)
    rows = res["rows"]
    names = ["raw", "kl", "jbu", "op"] + [f"mv_{r}_{t}" for r, t in B.MV_VARIANTS] + ["mv_paper", "fused",
                                                                                   "fused_paper"]
    assert list(rows) == names
    for name in names:
        assert set(rows[name]) == set(B.COLUMNS)
        for col in B.COLUMNS:
            vals = rows[name][col]
            assert len(vals) == B.SMOKE.seeds and all(0.0 <= v <= 1.0 for v in vals), (name, col, vals)
    # every (column, seed) is its own scene
    seeds = {B.scene_seed(c, s) for c in B.COLUMNS for s in range(B.SMOKE.seeds)}
    assert len(seeds) == len(B.COLUMNS) * B.SMOKE.seeds
    # the affinity-driven heads find the regions that raw argmax misses, on the easy scenes
    easy = [c for c in B.COLUMNS if c[1] == "easy"]
    for head in ("op", res["mv_default"]):
        gain = sum(sum(rows[head][c]) - sum(rows["raw"][c]) for c in easy) / (len(easy) * B.SMOKE.seeds)
        assert gain > 0.05, (head, gain)
    # every head parameter gets a default, from the paper or ours, among its candidates
    decided = {d.param: d for d in res["decisions"]}
    assert set(decided) == {"mode", "transition", "readout", "nms (ratio, axis)", "eps", "iters", "sk_iters",
                            "steps", "tau", "sigma_spatial", "sigma_range", "radius"}
    for d in decided.values():
        assert d.chosen in d.candidates and d.source in ("paper", "ours")
        assert all(0.0 <= v <= 1.0 for v in d.candidates.values())
        if d.source == "ours" and d.paper is not None:  # the paper's value lost by more than the margin
            assert d.candidates[d.chosen] - d.candidates[d.paper] > B.MARGIN

    # the heads side table: the default head by bilinear, JBU, PAMR and LPOSS+, then OP and LPOSS, (mIoU, mBIoU)
    # per (column, seed)
    refiners, heads = res["refiners"], res["heads"]
    assert list(refiners) == list(B.REFINERS) and "lposs+" in refiners
    assert list(heads) == list(B.OTHER_HEADS)
    for r, t in [*refiners.items(), *heads.items()]:
        for col in B.COLUMNS:
            assert len(t[col]) == B.SMOKE.seeds and all(0.0 <= v <= 1.0 for pair in t[col] for v in pair), (r, t)
    # its OP row is the main table's '+ OP' (one scoring, one JBU)
    for col in B.COLUMNS:
        assert [v[0] for v in heads["op", "jbu"][col]] == pytest.approx(rows["op"][col])
    # LPOSS+ moves the labels of both heads it refines
    assert any(refiners["lposs+"][c] != refiners["bilinear"][c] for c in B.COLUMNS)
    assert any(heads["lposs", "lposs+"][c] != heads["lposs", "bilinear"][c] for c in B.COLUMNS)
    # its JBU row is the main table's row of that head (one scoring, one JBU)
    assert res["refiner_head"] in rows
    for col in B.COLUMNS:
        assert [v[0] for v in refiners["jbu"][col]] == pytest.approx(rows[res["refiner_head"]][col])
    # PAMR moves the labels: its cells differ from bilinear's somewhere
    assert any(refiners["pamr"][c] != refiners["bilinear"][c] for c in B.COLUMNS)

    plots = B.write_results(res, tmp_path, smoke=True)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Synthetic ablation" in text and "The paper's orderings" in text and "NMS side table" in text
    assert text.count("\n| default | ") == 6 and text.count("\n| paper's MV | ") == 6  # the orderings, both heads
    # NMS: off and each axis at its best KL ratio, on our head and the paper's MV
    assert set(res["nms_tables"]) == {(0.0, "off")} | {(res["best_ratio"][a], a) for a in B.NMS_AXES}
    assert all(r > 0 for r in res["best_ratio"].values())
    for label in res["labels"].values():
        assert f"| {label} |" in text
    assert "Heads and refiners" in text and "sigma is 0.02 per guide pixel" in text
    side = [("mv", r) for r in B.REFINERS] + list(B.OTHER_HEADS)
    for h, r in side:
        label = f"{B.HEAD_LABEL[h]} | {B.REFINER_LABEL[r]}"
        assert re.search(rf"\n\| {re.escape(label)} \| (\d\.\d{{3}} ± \d\.\d{{3}} / \d\.\d{{3}} ± \d\.\d{{3}} \| ){{4}}"
                         rf"\d\.\d{{3}} / \d\.\d{{3}} \|", text), label
    assert re.search(r"\| \+ OP \| (\d\.\d{3} ± \d\.\d{3} \| ){4}\d\.\d{3} \| 66\.9 \| 28\.6 \| 40\.0 \|", text)
    if plots == ["ablation.png"]:
        assert (tmp_path / "plots" / "ablation.png").stat().st_size > 1000
    # a second write replaces the section, it does not add one
    B.write_results(res, tmp_path, smoke=True)
    assert (tmp_path / "RESULTS.md").read_text().count("## Synthetic ablation") == 1
    # the defaults table for the README: rewritten between its markers, the rest of the page kept
    page = tmp_path / "defaults.md"
    page.write_text("# Defaults\n\nintro\n\n" + B.DEFAULTS_BEGIN + "\nold\n" + B.DEFAULTS_END + "\n\nafter\n")
    B.write_defaults(res, "abc1234", page)
    B.write_defaults(res, "abc1234", page)
    out = page.read_text()
    assert out.startswith("# Defaults\n\nintro\n") and out.rstrip().endswith("after") and "old" not in out
    assert out.count(B.DEFAULTS_BEGIN) == 1 and "abc1234" in out
    for d in res["decisions"]:
        assert f"| {d.param} | `{B.fmt_value(d.chosen)}` | {d.source} |" in out


def test_case_class_distributions_are_the_reference():
    """The bench's shortcut (one softmax per scene, NMS applied to it) gives reference.class_distributions."""
    from bench import bench_ablation as B
    from ovss_fast.kernels import reference as R

    sc = make_dataset_scene(1, "stuff", grid=(8, 9))
    case = B.Case(sc)
    for nms in ((0.0, "classes"), (0.2, "classes"), (0.1, "patches"), (0.5, "patches")):
        want = R.class_distributions(sc.feats, sc.text, nms=nms[0], nms_axis=nms[1])
        torch.testing.assert_close(case.q(nms), want, rtol=1e-6, atol=1e-9)


def test_clip_like_scene_dino_feats_are_the_affinitys_region_features():
    """dino_feats: unit vectors the affinity is built from (softmax(sharp z z^T - dist^2 / 0.5)), knowing regions."""
    from ovss_fast.synthetic import DIFFICULTY, make_clip_like_scene

    for kind, difficulty in (("voc", "easy"), ("stuff", "hard")):
        sc = make_clip_like_scene(5, kind, difficulty, grid=(7, 9), dtype=torch.float64)
        z = sc.dino_feats[0]
        assert z.shape == (63, 16)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(63, dtype=torch.float64))
        yy, xx = torch.meshgrid(torch.arange(7.0, dtype=torch.float64), torch.arange(9.0, dtype=torch.float64),
                                indexing="ij")
        pos = torch.stack([yy.reshape(-1) / 7, xx.reshape(-1) / 9], dim=1)
        sharp = DIFFICULTY[difficulty][4]
        want = torch.softmax(sharp * z @ z.T - torch.cdist(pos, pos) ** 2 / 0.5, dim=1)
        torch.testing.assert_close(sc.affinity[0], want)
    assert make_dataset_scene(1, "voc", grid=(6, 7)).dino_feats is None


def test_case_lposs_scales_sigma_to_lposs_patches():
    """The bench's LPOSS: positions in guide pixels (8 px patches) with sigma 0.02 is LPOSS's sigma 0.01 on 16 px
    patches; y0 "cosine" is the raw cosines, "nq" N Q."""
    from bench import bench_ablation as B
    from ovss_fast import label_propagation
    from ovss_fast.synthetic import make_clip_like_scene

    sc = make_clip_like_scene(2, "voc", "easy", grid=(6, 8), dtype=torch.float64)
    case = B.Case(sc)
    yy, xx = torch.meshgrid(torch.arange(6.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64),
                            indexing="ij")
    pos16 = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1) * 16 + 8  # LPOSS: 8 + 16 * index
    cos = case.scores({"mode": "raw"})
    want = label_propagation(cos, sc.dino_feats, pos16, backend="reference")
    got = case.scores({"mode": "lposs", "y0": "cosine"})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    nq = case.q((0.0, "classes")) * 48
    got_nq = case.scores({"mode": "lposs", "y0": "nq", "nms": (0.0, "classes")})
    torch.testing.assert_close(got_nq, label_propagation(nq, sc.dino_feats, pos16, backend="reference"),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dino_feats"):
        B.Case(make_dataset_scene(1, "voc", grid=(6, 7))).scores({"mode": "lposs", "y0": "cosine"})


def test_case_refined_rejects_an_unknown_refiner():
    from bench import bench_ablation as B

    case = B.Case(make_dataset_scene(1, "voc", grid=(6, 7)))
    with pytest.raises(ValueError, match="refiner"):
        case.refined({"mode": "raw"}, "nearest", {}, {})


def test_ablation_smoke_refuses_to_overwrite_committed_results(capsys):
    from bench import bench_ablation as B

    assert B.main(["--smoke"]) == 2
    assert "--out" in capsys.readouterr().err


def test_decide_follows_the_paper_within_the_margin():
    from bench.bench_ablation import MARGIN, decide

    assert decide("x", {1: 0.50, 2: 0.50 + MARGIN / 2}, "b", paper=1).chosen == 1
    d = decide("x", {1: 0.50, 2: 0.50 + 2 * MARGIN}, "b", paper=1)
    assert (d.chosen, d.source) == (2, "ours")
    assert decide("x", {1: 0.4, 2: 0.3}, "b").source == "ours"
