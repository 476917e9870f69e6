"""``ovss-fast segment`` end to end on the tiny random-weight open_clip config (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("open_clip", reason="the segment command needs open_clip_torch")

from PIL import Image  # noqa: E402

from ovss_fast.apps.cli import main  # noqa: E402
from ovss_fast.apps.palette import palette  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=None")

TINY = ["--model", "ovss-fast-tiny", "--pretrained", "none", "--backend", "reference"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, h=70, w=100, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_one_image_writes_a_palette_png_and_an_overlay(tmp_path, capsys):
    img = write_image(tmp_path / "a.png")
    out, ov = tmp_path / "labels.png", tmp_path / "overlay.png"
    rc = main(["segment", img, "--classes", "cat; kitten, dog, grass", *TINY, "--out", str(out),
               "--overlay", str(ov)])
    assert rc == 0
    labels = Image.open(out)
    assert labels.mode == "P" and labels.size == (100, 70)
    values = np.asarray(labels)
    assert values.min() >= 0 and values.max() < 3
    assert labels.getpalette()[:9] == [v for rgb in palette(3) for v in rgb]
    overlay = Image.open(ov)
    assert overlay.height >= 70 and overlay.width > 100  # the legend panel sits on the right
    assert "wrote" in capsys.readouterr().out


def test_window_stride_mode_and_features_flags(tmp_path):
    img = write_image(tmp_path / "a.png", 100, 140)
    out = tmp_path / "l.png"
    rc = main(["segment", img, "--classes", "cat, dog", *TINY, "--window", "48", "--stride", "32",
               "--mode", "op", "--features", "sclip", "--out", str(out)])
    assert rc == 0 and Image.open(out).size == (140, 100)


def test_a_folder_writes_one_png_per_image_with_a_progress_bar(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "x.png", seed=1)
    write_image(folder / "y.jpg", 50, 60, seed=2)
    (folder / "notes.txt").write_text("not an image")
    rc = main(["segment", str(folder), "--classes", "cat, dog", *TINY, "--out", str(tmp_path / "out"),
               "--overlay", str(tmp_path / "ov")])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["x.png", "y.png"]
    assert sorted(os.listdir(tmp_path / "ov")) == ["x.png", "y.png"]
    assert Image.open(tmp_path / "out" / "y.png").size == (60, 50)
    assert "2/2" in capsys.readouterr().err


def test_several_files_one_corrupt(tmp_path, capsys):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rc = main(["segment", good, str(bad), "--classes", "cat, dog", *TINY, "--out", str(tmp_path / "out"),
               "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "skipping" in err and "could not read image file" in err and "1 of 2 images failed" in err
    assert os.listdir(tmp_path / "out") == ["good.png"]


@pytest.mark.parametrize("args, message", [
    (["--classes", ""], "class_names is empty"),
    (["--classes", "cat, ;"], "names no class"),
    (["--classes", "cat", "--model", "ViT-B-61"], "unknown open_clip model"),
    (["--classes", "cat", "--model", "ovss-fast-tiny", "--pretrained", "/nowhere/w.pt"], "not found; pass pretrained="),
    (["--classes", "cat", "--window", "50"], "not a multiple of the patch size"),
])
def test_errors_are_one_clear_line(tmp_path, capsys, args, message):
    img = write_image(tmp_path / "a.png")
    full = ["segment", img, *TINY, "--out", str(tmp_path / "l.png"), *args]
    rc = main(full)
    err = capsys.readouterr().err
    assert rc == 2
    assert "ovss-fast segment: error: " in err and message in err
    assert "Traceback" not in err


def test_missing_and_corrupt_single_image(tmp_path, capsys):
    rc = main(["segment", str(tmp_path / "nope.png"), "--classes", "cat", *TINY, "--out", str(tmp_path / "l.png")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    rc = main(["segment", str(bad), "--classes", "cat", *TINY, "--out", str(tmp_path / "l.png")])
    assert rc == 2 and "could not read image file" in capsys.readouterr().err


def test_command_line_entry_in_a_subprocess(tmp_path):
    img = write_image(tmp_path / "a.png", 40, 60)
    out = tmp_path / "l.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ovss_fast", "segment", img, "--classes", "cat; kitten, dog", *TINY,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr  # --pretrained none says so
    assert Image.open(out).size == (60, 40)


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    from ovss_fast.apps.segment import progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    assert list(progress(["a.png", "b.png", "c.png"], enabled=True)) == ["a.png", "b.png", "c.png"]
    err = capsys.readouterr().err
    assert "segment [" in err and "3/3" in err
    assert list(progress(["a.png"], enabled=False)) == ["a.png"]
    assert capsys.readouterr().err == ""
