"""Presets (issue 29): ``HeadOptions.paper()``, ``Segmenter(preset=...)``, ``--preset`` and the record."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from ovss_fast.ops.options import PAPER_HEAD, HeadOptions
from ovss_fast.pipeline.presets import preset_record, resolve_preset


def test_paper_options_are_the_papers_values_and_keep_ours_elsewhere():
    p = HeadOptions.paper()
    assert (p.readout, p.transition, p.tau, p.eps, p.iters, p.sk_iters) == ("velocity", "attention", 0.3, 0.1, 50, 15)
    assert p.nms > 0 and p.nms_axis == "patches"  # NMS on, our reading of its rule
    ours = HeadOptions()
    for name in HeadOptions.names():
        if name not in PAPER_HEAD:
            assert getattr(p, name) == getattr(ours, name), name
    assert HeadOptions.paper(tau=0.5).tau == 0.5
    with pytest.raises(ValueError, match="tau"):
        HeadOptions.paper(tau=-1.0)
    with pytest.raises(TypeError, match="HeadOptions.paper.*unknown"):
        HeadOptions.paper(taus=0.5)


def test_resolve_preset_explicit_values_win_and_are_recorded():
    r = resolve_preset("paper", mode=None, affinity=None, window=None, options={})
    assert (r.mode, r.affinity, r.window) == ("mv", "sd2", None)
    assert r.options == HeadOptions.paper() and r.overridden == {}
    r = resolve_preset("paper", mode="op", affinity="clip", window=None, options={"tau": 0.1, "scale": 50.0})
    assert (r.mode, r.affinity, r.options.tau, r.options.scale) == ("op", "clip", 0.1, 50.0)
    assert r.overridden == {"mode": "op", "affinity": "clip", "tau": 0.1}  # scale: the paper states none
    rec = r.record()
    assert rec["name"] == "paper" and rec["overridden"] == r.overridden
    assert rec["paper_values"]["affinity"] == "sd2" and rec["paper_values"]["readout"] == "velocity"
    assert "sigma_spatial" in rec["our_values"] and "readout" not in rec["our_values"]
    assert rec["paper_values_by_our_reading"] == ["nms", "nms_axis"]
    ours = resolve_preset("ours", mode=None, affinity=None, window=None, options={})
    assert (ours.mode, ours.affinity) == ("mv", "clip") and ours.options == HeadOptions()
    assert "readout" in preset_record("ours")["our_values"]
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve_preset("papers", mode=None, affinity=None, window=None, options={})


def test_preset_flag_on_segment_and_eval():
    from ovss_fast.apps import evaluate, segment

    for mod in (segment, evaluate):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        base = ["--dataset", "voc21"] if mod is evaluate else ["x.png", "--classes", "a,b", "--out", "o.png"]
        args = parser.parse_args(base + ["--preset", "paper", "--tau", "0.2"])
        assert args.preset == "paper" and args.affinity is None and args.mode is None and args.tau == 0.2
        assert parser.parse_args(base).preset == "ours"
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--preset", "theirs"])


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs open_clip")
def test_segmenter_preset_paper_on_a_tiny_model(tiny):
    from tests.conftest import tiny_segmenter

    seg = tiny_segmenter(tiny, ("a {}.",), preset="paper", affinity="clip")  # sd2 needs its weights
    assert seg.options == HeadOptions.paper() and seg.mode == "mv" and seg.affinity_name == "clip"
    assert seg.preset.record()["overridden"] == {"affinity": "clip"}
    assert tiny_segmenter(tiny, ("a {}.",)).options == HeadOptions()
    with pytest.raises(ValueError, match="preset"):
        tiny_segmenter(tiny, ("a {}.",), preset="nope")


def test_eval_results_file_records_the_preset(tmp_path):
    import json

    from ovss_fast.apps.cli import main

    out = tmp_path / "s.json"
    assert main(["eval", "--synthetic", "--limit", "1", "--backend", "reference", "--quiet", "--preset", "paper",
                 "--tau", "0.2", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["preset"]["name"] == "paper" and cfg["preset"]["overridden"] == {"tau": 0.2}
    assert cfg["op_params"]["readout"] == "velocity" and cfg["op_params"]["tau"] == 0.2
    assert cfg["preset"]["paper_values"]["eps"] == 0.1 and "steps" in cfg["preset"]["our_values"]
