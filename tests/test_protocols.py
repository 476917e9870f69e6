"""Evaluation protocols (peers.md's values), the method flags of `segment` and `eval`, and what goes on record."""

from __future__ import annotations

import json

import pytest

from ovss_fast.apps.cli import main
from ovss_fast.eval.protocols import PROTOCOLS, resolve_protocol

pytest.importorskip("open_clip", reason="the CLI runs the open_clip pipeline")

from test_eval import TINY, make_layout  # noqa: E402
from test_segment_cli import write_image  # noqa: E402

# (protocol, dataset) -> (short side, window, stride, logit scale, bg threshold), from shared/peers.md
PEERS = {
    ("sclip", "voc21"): (336, 224, 112, 65.0, 0.1), ("sclip", "context60"): (336, 224, 112, 50.0, 0.1),
    ("sclip", "coco_object"): (336, 224, 112, 50.0, 0.1), ("sclip", "coco_stuff"): (448, 224, 112, 40.0, None),
    ("sclip", "cityscapes"): (560, 224, 112, 40.0, None), ("sclip", "ade"): (336, 224, 112, 40.0, None),
    ("naclip", "voc21"): (336, None, None, 40.0, 0.1), ("naclip", "voc20"): (336, None, None, 40.0, None),
    ("naclip", "coco_stuff"): (336, 224, 112, 40.0, None), ("naclip", "cityscapes"): (560, 224, 112, 40.0, None),
    ("clearclip", "voc21"): (448, 448, 224, 50.0, 0.5), ("clearclip", "context60"): (448, 448, 224, 50.0, 0.15),
    ("clearclip", "coco_object"): (448, 448, 224, 50.0, 0.4),
    ("clearclip", "cityscapes"): (448, 224, 112, 50.0, None), ("dslo-windows", "voc21"): (336, 224, 112, 100.0, None),
    ("dslo-windows", "ade"): (448, 224, 112, 100.0, None),
    ("dslo-windows", "cityscapes"): (560, 224, 112, 100.0, None),
}


@pytest.mark.parametrize("key", list(PEERS))
def test_protocol_values_are_peers_md(key):
    p = resolve_protocol(*key)
    assert (p["short_side"], p["window"], p["stride"], p["scale"], p["bg_threshold"]) == PEERS[key]


def test_protocol_switches():
    for name in ("sclip", "clearclip", "naclip"):
        p = resolve_protocol(name, "ade")
        assert (p["head"], p["aggregation"], p["pos_interp"], p["antialias"], p["snap"]) == \
            ("logits", "pixels", "peers", False, False)
    assert resolve_protocol("clearclip", "ade")["crop"] == "pad" and resolve_protocol("sclip", "ade")["crop"] == "floor"
    d = resolve_protocol("dslo", "voc21")
    assert (d["head"], d["aggregation"], d["pos_interp"], d["antialias"], d["snap"]) == \
        ("dslo", "grid", "size", True, True)
    # the step to the annotation: NACLIP's default PAMR, SCLIP's and ClearCLIP's bilinear (PAMR off), DSLO's JBU
    assert {n: resolve_protocol(n, "voc21")["refine"] for n in PROTOCOLS} == {
        "dslo": "jbu", "dslo-windows": "jbu", "sclip": "bilinear", "clearclip": "bilinear", "naclip": "pamr",
        "lposs": "lposs+"}
    with pytest.raises(ValueError, match="unknown protocol 'tcl'; valid names: dslo, dslo-windows, sclip, clearclip, "
                                         "naclip, lposs"):
        resolve_protocol("tcl", "voc21")
    assert list(PROTOCOLS) == ["dslo", "dslo-windows", "sclip", "clearclip", "naclip", "lposs"]


def test_dslo_is_the_whole_image_at_the_papers_short_side():
    """method.md section 7: no windows, short side 336 (COCO-Stuff 448, Cityscapes 560); the dataset's
    window only as the memory guard's fallback."""
    from ovss_fast.eval.datasets import DATASETS

    for name, spec in DATASETS.items():
        p = resolve_protocol("dslo", name)
        short = {"coco_stuff": 448, "cityscapes": 560}.get(name, 336)
        assert (p["short_side"], p["window"], p["stride"], p["fallback_window"]) == (short, None, None, spec.window)
        w = resolve_protocol("dslo-windows", name)
        assert (w["short_side"], w["window"], w["stride"]) == (spec.short_side, spec.window, spec.stride)
        assert w["fallback_window"] is None and (p["head"], p["aggregation"]) == (w["head"], w["aggregation"])


def test_dslo_falls_back_to_windows_for_an_image_over_the_budget_and_lists_it(tmp_path, capsys):
    import warnings

    import torch

    from ovss_fast.eval import load_class_names
    from ovss_fast.models.clip_features import parse_class_names
    from ovss_fast.pipeline.segmenter import Segmenter

    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])  # 40x56, 48x48, 36x60 -> 256x352, 256x256, 256x432
    synonyms = sum(len(c) for c in parse_class_names(load_class_names("voc21")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter("ovss-fast-tiny", pretrained=None, device="cpu", templates=("{}",))
    budget = seg.memory_estimate(256, 256, synonyms=synonyms)  # the square image fits as one window, no other
    assert seg.memory_estimate(256, 352, synonyms=synonyms) > budget >= seg.memory_estimate(224, 224, synonyms=synonyms)
    out = tmp_path / "r.json"
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path), *TINY, "--quiet", "--short-side", "256",
               "--memory-budget", repr(budget / 2**30), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert (r["config"]["window_px"], r["config"]["fallback_window_px"]) == (None, [224, 224])
    fell = r["window_fallback"]
    assert (fell["window_px"], fell["count"]) == ([224, 224], 2)
    assert [(f["name"], f["resized"]) for f in fell["images"]] == [("2008_000002", [256, 352]),
                                                                   ("2009_000001", [256, 432])]
    # without the fallback window the same budget refuses the first image, naming a window that fits
    with pytest.raises(ValueError, match="over memory_budget .* pass window=256"):
        Segmenter.from_model(seg.model, seg.tokenizer, device="cpu", memory_budget=budget, templates=("{}",)).seg(
            torch.rand(3, 256, 352), load_class_names("voc21"))


def _eval_config(tmp_path, capsys, *flags: str) -> dict:
    """The results file's config of ``ovss-fast eval`` on one voc21 image with the tiny model and these flags."""
    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    out = tmp_path / "r.json"
    rc = main(["eval", "--dataset", "voc21", "--root", str(tmp_path), *TINY, "--limit", "1", "--quiet", *flags,
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    return json.loads(out.read_text())["config"]


def test_eval_with_a_peer_protocol_records_everything(tmp_path, capsys):
    c = _eval_config(tmp_path, capsys, "--protocol", "sclip", "--features", "sclip", "--short-side", "96")
    p = c["protocol"]
    assert (p["protocol"], p["window"], p["stride"], p["scale"], p["bg_threshold"]) == ("sclip", 224, 112, 65.0, 0.1)
    assert (p["short_side"], p["overridden"]) == (96, ["short_side"])
    assert (p["aggregation"], p["pos_interp"], p["head"], p["antialias"], p["snap"], p["features"]) == \
        ("pixels", "peers", "logits", False, False, "sclip")
    # the Segmenter that ran had those settings
    assert (c["features"], c["head"], c["aggregation"], c["pos_interp"], c["bg_threshold"], c["scale"]) == \
        ("sclip", "logits", "pixels", "peers", 0.1, 65.0)
    assert c["antialias"] is False and "without antialias" in c["resize"]
    assert (p["refine"], c["refine"]) == ("bilinear", "bilinear") and "PAMR" not in c["prediction_to_annotation"]


def test_eval_with_the_naclip_protocol_refines_with_pamr(tmp_path, capsys):
    c = _eval_config(tmp_path, capsys, "--protocol", "naclip", "--short-side", "64", "--pamr-iters", "3")
    assert (c["protocol"]["refine"], c["refine"], c["pamr_iters"], c["pamr_dilations"]) == ("pamr", "pamr", 3, [8, 16])
    assert "then PAMR (3 steps, dilations [8, 16])" in c["prediction_to_annotation"]


def test_eval_flags_override_the_protocol(tmp_path, capsys):
    c = _eval_config(tmp_path, capsys, "--protocol", "clearclip", "--short-side", "64", "--window", "32", "--stride",
                     "16", "--scale", "30", "--bg-threshold", "none", "--head", "dslo", "--mode", "op", "--iters", "5",
                     "--eps", "0.05", "--radius", "1")
    assert c["protocol"]["overridden"] == ["bg_threshold", "head", "scale", "short_side", "window", "stride"]
    assert (c["scale"], c["bg_threshold"], c["head"], c["iters"], c["eps"], c["radius"]) == \
        (30.0, None, "dslo", 5, 0.05, 1)
    assert (c["window_px"], c["stride_px"], c["crop"]) == ([32, 32], [16, 16], "pad")


@pytest.mark.parametrize("args, message", [
    (["--scale", "-1"], "--scale must be a positive finite number, got -1.0"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--readout", "fast"], "--readout must be one of 'integrated', 'velocity'; got 'fast'"),
    (["--bg-threshold", "2"], r"--bg-threshold must lie in \(0, 1\]"),
    (["--features", "self_self"], "removed; use 'sclip'"),
    (["--head", "argmax"], "--head must be one of 'dslo', 'logits', 'lposs'"),
    (["--nms", "1.5"], r"--nms must lie in \[0, 1\]"),
    (["--sigma-range", "0"], "--sigma-range must be a positive finite number"),
    (["--pos-interp", "area"], "--pos-interp must be one of 'size', 'peers'"),
])
def test_method_flags_are_checked_with_the_api_messages(tmp_path, capsys, args, message):
    import re

    img = write_image(tmp_path / "a.png")
    for argv in (["segment", img, "--classes", "cat, dog", *TINY_SEG, "--out", str(tmp_path / "l.png"), *args],
                 ["eval", "--synthetic", *args]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert err.startswith(f"ovss-fast {argv[0]}: error: ")


TINY_SEG = ["--model", "ovss-fast-tiny", "--pretrained", "none", "--backend", "reference"]


def test_segment_takes_every_knob(tmp_path, capsys):
    img = write_image(tmp_path / "a.png", 70, 100)
    out = tmp_path / "l.png"
    rc = main(["segment", img, "--classes", "sky, cat, dog", *TINY_SEG, "--out", str(out), "--features", "naclip",
               "--head", "logits", "--bg-threshold", "0.3", "--scale", "40", "--aggregation", "pixels",
               "--pos-interp", "peers", "--no-antialias", "--crop", "pad", "--window", "48", "--stride", "32"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["segment", img, "--classes", "sky, cat, dog", *TINY_SEG, "--out", str(out), "--mode", "mv",
               "--steps", "5", "--tau", "0.5", "--readout", "velocity", "--sk-iters", "3", "--nms", "0.5",
               "--sigma-spatial", "2", "--sigma-range", "0.2", "--radius", "1", "--features", "maskclip"])
    assert rc == 0, capsys.readouterr().err


def test_synthetic_eval_with_the_required_flags(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["eval", "--synthetic", "--protocol", "sclip", "--features", "sclip", "--head", "logits",
                 "--limit", "2", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "do not apply: --features" in err  # said, not silently ignored
    c = json.loads(out.read_text())["config"]
    assert c["head"] == "logits" and c["protocol"]["scale"] == 40.0 and "--features sclip" in c["not_applied"]
    assert main(["eval", "--synthetic", "--features", "naclip", "--mode", "op", "--eps", "0.05", "--limit", "2",
                 "--quiet", "--out", str(out)]) == 0
    c = json.loads(out.read_text())["config"]
    assert c["mode"] == "op" and c["op_params"]["eps"] == 0.05 and "--features naclip" in c["not_applied"]
    assert main(["eval", "--synthetic", "--bg-threshold", "0.2"]) == 2
    assert "synthetic scenes have none" in capsys.readouterr().err


def test_bg_threshold_needs_a_dataset_with_background(tmp_path, capsys):
    make_layout(tmp_path, "ade", [0, 1, 2, 150])
    assert main(["eval", "--dataset", "ade", "--root", str(tmp_path), *TINY, "--bg-threshold", "0.2"]) == 2
    assert "ade has none" in capsys.readouterr().err
