"""Errors keep their cause (issue 26, item 3): user errors are ovss_fast's own types and one line in the front
ends; everything else (a RuntimeError from torch, a bug) keeps its traceback; CUDA out of memory is one line
naming --memory-budget / --window; loader errors chain the original and list a checkpoint's mismatched keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovss_fast.apps import flags
from ovss_fast.apps.cli import main
from ovss_fast.errors import InputError, InputTypeError, ModelLoadError, OVSSError
from ovss_fast.models.loading import state_dict_mismatch
from ovss_fast.ops import api as ops
from ovss_fast.ops import validate as check

TINY = ["--model", "ovss-fast-tiny", "--pretrained", "none", "--backend", "reference"]
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)"


# --------------------------------------------------------------------------- validation raises our types
def test_validation_raises_input_errors_that_are_value_and_type_errors():
    with pytest.raises(InputError, match="backend must be one of") as info:
        check.choice("backend", "fast", ("auto", "cpu"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, OVSSError)
    with pytest.raises(InputTypeError, match="antialias must be True or False") as info:
        check.flag("antialias", "yes")
    assert isinstance(info.value, TypeError)
    with pytest.raises(InputError, match="feats has D = 0"):
        ops.class_distributions(torch.zeros(1, 4, 0), torch.zeros(2, 0))
    with pytest.raises(InputError, match="backend must be"):
        ops.class_distributions(torch.rand(1, 4, 3), torch.rand(2, 3), backend="nope")


# --------------------------------------------------------------------------- which errors are one line
@pytest.mark.parametrize("exc, expected", [
    (InputError("image is empty"), "image is empty"),
    (ModelLoadError("could not load weights"), "could not load weights"),
    (FileNotFoundError("image file 'a.png' not found"), "image file 'a.png' not found"),
    (PermissionError(13, "Permission denied", "/root/out.png"), "Permission denied: '/root/out.png'"),
    (ModuleNotFoundError("No module named 'gradio'", name="gradio"), "No module named 'gradio'"),
    (ImportError("affinity='dino' needs timm: pip install 'ovss_fast[dino]'"), "pip install"),
    (torch.OutOfMemoryError(OOM), "lower --memory-budget"),
    (RuntimeError("expected scalar type Float but found Half"), None),
    (ValueError("a bug in ovss_fast"), None),
    (TypeError("unsupported operand"), None),
    (ModuleNotFoundError("No module named 'ovss_fast.nothing'", name="ovss_fast.nothing"), None),
    (OSError("[Errno 28] No space left on device"), None),
])
def test_user_error_decides_what_is_one_line(exc, expected):
    got = flags.user_error(exc)
    if expected is None:
        assert got is None
    else:
        assert expected in got and "\n" not in got


def test_out_of_memory_names_the_flags_and_keeps_the_original_message():
    msg = flags.user_error(torch.OutOfMemoryError(OOM + "\nIf reserved but unallocated memory is large ..."))
    assert "--memory-budget" in msg and "--window" in msg and OOM in msg and "\n" not in msg


def test_fail_or_raise_keeps_the_traceback_of_anything_else(capsys):
    def broken():
        raise RuntimeError("boom from torch")

    try:
        broken()
    except RuntimeError as exc:
        with pytest.raises(RuntimeError, match="boom from torch") as info:
            flags.fail_or_raise("ovss-fast x", exc)
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "broken" in frames  # the original frames are kept
    try:
        raise InputError("bad flag")
    except InputError as exc:
        assert flags.fail_or_raise("ovss-fast x", exc) == 2
    assert capsys.readouterr().err == "ovss-fast x: error: bad flag\n"


# --------------------------------------------------------------------------- the commands
@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def raiser(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


@pytest.mark.filterwarnings("ignore:pretrained=None")
def test_segment_command(png, tmp_path, capsys, monkeypatch):
    pytest.importorskip("open_clip")
    from ovss_fast.pipeline.segmenter import Segmenter

    cmd = ["segment", png, "--classes", "cat, dog", *TINY, "--out", str(tmp_path / "l.png")]
    monkeypatch.setattr(Segmenter, "predict", raiser(torch.OutOfMemoryError(OOM)))
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovss-fast segment: error: out of GPU memory") and "--memory-budget" in err
    assert OOM in err and "Traceback" not in err
    monkeypatch.setattr(Segmenter, "predict", raiser(RuntimeError("a kernel failed")))
    with pytest.raises(RuntimeError, match="a kernel failed"):
        main(cmd)
    monkeypatch.setattr(Segmenter, "predict", raiser(KeyError("a bug")))
    with pytest.raises(KeyError):
        main(cmd)


def test_eval_command(capsys, monkeypatch):
    from ovss_fast.apps import evaluate

    cmd = ["eval", "--synthetic", "--limit", "1", "--quiet", "--device", "cpu"]
    monkeypatch.setattr(evaluate, "_synthetic", raiser(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")))
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
        main(cmd)
    monkeypatch.setattr(evaluate, "_synthetic", raiser(torch.OutOfMemoryError(OOM)))
    assert main(cmd) == 2
    assert "ovss-fast eval: error: out of GPU memory" in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "_synthetic", raiser(ModuleNotFoundError("No module named 'timm'", name="timm")))
    assert main(cmd) == 2
    assert "No module named 'timm'" in capsys.readouterr().err


def test_demo_command(tmp_path, capsys, monkeypatch):
    from ovss_fast.apps import demo

    monkeypatch.setattr(demo, "run_demo", raiser(AttributeError("a bug in the demo")))
    with pytest.raises(AttributeError, match="a bug in the demo"):
        main(["demo", "--out", str(tmp_path / "d.png")])
    monkeypatch.undo()
    assert main(["demo", "--out", str(tmp_path / "d.png"), "--grid", "0"]) == 2
    assert "ovss-fast demo: error: --size must be a multiple of --grid (>= 2)" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:pretrained=None")
def test_web_page_shows_user_errors_and_hides_internal_ones(png, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    import argparse

    from ovss_fast.apps import web
    from ovss_fast.pipeline.segmenter import Segmenter

    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    app = web.App(parser.parse_args(["--model", "ovss-fast-tiny", "--backend", "reference"]))
    monkeypatch.setattr(Segmenter, "predict", raiser(torch.OutOfMemoryError(OOM)))
    r = app.run(png, "cat, dog", {})
    assert r.message.startswith("**Error:** out of GPU memory") and "--memory-budget" in r.message
    monkeypatch.setattr(Segmenter, "predict", raiser(RuntimeError("a kernel failed")))
    r = app.run(png, "cat, dog", {})
    assert r.message.startswith("**Internal error**") and "RuntimeError: a kernel failed" in r.message
    assert "Traceback" in capsys.readouterr().err  # the server's log has it


@pytest.mark.filterwarnings("ignore:pretrained=None")
def test_web_page_runs_the_model_once_per_request(png, monkeypatch):
    pytest.importorskip("open_clip")
    import argparse

    from ovss_fast.apps import web
    from ovss_fast.pipeline.segmenter import Segmenter

    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    app = web.App(parser.parse_args(["--model", "ovss-fast-tiny", "--backend", "reference"]))
    calls = []
    for name in ("predict", "seg", "scores"):
        inner = getattr(Segmenter, name)
        monkeypatch.setattr(Segmenter, name, lambda self, *a, _n=name, _f=inner, **k: calls.append(_n) or _f(
            self, *a, **k))
    r = app.run(png, "cat, dog", {}, want_scores=True)
    assert r.labels is not None and r.scores is not None, r.message
    assert calls == ["predict"]
    assert np.load(r.scores).shape[0] == 2 and "| visual |" in r.timings


# --------------------------------------------------------------------------- loaders
def test_state_dict_mismatch_lists_a_few_keys_then_a_count():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("0.")}
    state["extra.weight"] = torch.zeros(1)
    state["3.bias"] = torch.zeros(5)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    text = state_dict_mismatch(str(info.value), shown=1)
    assert "missing keys (2): 0.weight and 1 more" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "shape mismatch (1): 3.bias (checkpoint [5], model [2])" in text
    assert state_dict_mismatch("some other error") == ""


@pytest.mark.filterwarnings("ignore:pretrained=None")
def test_a_checkpoint_that_does_not_match_lists_its_keys_and_keeps_the_cause(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from ovss_fast.models.clip_features import TINY_MODEL, register_tiny_config
    from ovss_fast.pipeline.segmenter import Segmenter

    register_tiny_config()
    state = open_clip.create_model(TINY_MODEL, pretrained=None).state_dict()
    missing = [k for k in state if k.startswith("visual.transformer.resblocks.0.")]  # the model's order
    for k in missing:
        del state[k]
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        Segmenter(TINY_MODEL, pretrained=str(path), device="cpu", templates=("{}",))
    msg = str(info.value)
    assert f"could not load weights file {str(path)!r}" in msg
    assert f"missing keys ({len(missing)}): {missing[0]}" in msg and f"and {len(missing) - 4} more" in msg
    assert "unexpected keys (1): visual.extra_head.weight" in msg
    assert isinstance(info.value.__cause__, RuntimeError) and "Missing key(s)" in str(info.value.__cause__)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)  # callers' excepts


def test_dino_loader_chains_the_original(tmp_path):
    pytest.importorskip("timm")
    from ovss_fast.models.affinity import DinoAffinity

    bad = tmp_path / "dino.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ModelLoadError, match="could not build DINO model") as info:
        DinoAffinity(str(bad), device="cpu")
    assert info.value.__cause__ is not None
