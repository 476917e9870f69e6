"""An evaluation loses nothing: output checked before the loop, atomic results, checkpoints and
--resume (also after a real SIGINT in a subprocess), one-line errors and --skip-bad for bad items."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_eval import TINY, make_layout

from ovss_fast.apps.cli import main
from ovss_fast.eval import SegmentationDataset, run_loop
from ovss_fast.eval.checkpoint import BadItem, Interrupted, RunState, check_writable, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:pretrained=None")


class Fake(torch.utils.data.Dataset):
    """Items with a label of their own; item ``bad`` (if any) is unreadable."""

    def __init__(self, n: int = 7, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise ValueError(f"could not read image file 'img{i}.jpg' (truncated)")
        g = torch.Generator().manual_seed(i)
        return {"label": torch.randint(0, 3, (4, 5), generator=g), "name": f"img{i}"}


def noisy(item: dict) -> torch.Tensor:
    return (item["label"] + (item["label"].sum() % 2)).clamp(max=2)


# --------------------------------------------------------------------------- output
def test_out_under_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    import ovss_fast.eval.harness as harness

    monkeypatch.setattr(harness, "run_loop", lambda *a, **k: pytest.fail("the loop ran"))
    rc = main(["eval", "--synthetic", "--limit", "2", "--backend", "reference", "--quiet",
               "--out", str(tmp_path / "afile" / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a folder" in err and "afile" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(str(tmp_path))


def test_results_are_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"a": object()})  # fails half way through json.dump
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind


# --------------------------------------------------------------------------- checkpoints
def test_interrupted_loop_resumes_to_the_uninterrupted_numbers(tmp_path):
    full = run_loop(Fake(), noisy, 3)
    ckpt = str(tmp_path / "c.ckpt")
    seen = []

    def predict_then_signal(item):
        seen.append(item["name"])
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops after this image
        return noisy(item)

    with pytest.raises(Interrupted, match="SIGINT after 3 images"):
        run_loop(Fake(), predict_then_signal, 3, state=RunState(3, path=ckpt, every=100, fingerprint={"k": 1}))
    data = json.loads(Path(ckpt).read_text())
    assert data["done"] == [0, 1, 2]
    state = RunState(3, path=ckpt, every=2, fingerprint={"k": 1}, resume=True)
    assert state.resumed == 3
    rest = []
    out = run_loop(Fake(), lambda item: rest.append(item["name"]) or noisy(item), 3, state=state)
    assert rest == ["img3", "img4", "img5", "img6"]  # nothing done twice
    assert torch.equal(out.confusion, full.confusion) and out.images == full.images == 7 and out.resumed == 3
    assert torch.equal(out.boundary, full.boundary) and full.boundary[1].sum() > 0  # Boundary IoU's sums resumed too
    with pytest.raises(ValueError, match="different evaluation.*k"):
        RunState(3, path=ckpt, fingerprint={"k": 2}, resume=True)


def test_a_failing_image_leaves_a_checkpoint_of_the_images_before_it(tmp_path):
    ckpt = str(tmp_path / "c.ckpt")

    def boom(item):
        if item["name"] == "img4":
            raise RuntimeError("out of memory")
        return noisy(item)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_loop(Fake(), boom, 3, state=RunState(3, path=ckpt, every=0))
    assert json.loads(Path(ckpt).read_text())["done"] == [0, 1, 2, 3]


def test_eval_command_sigint_then_resume_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "r.json"
    ckpt = Path(str(out) + ".ckpt")
    args = [sys.executable, "-m", "ovss_fast", "eval", "--synthetic", "--limit", "5", "--backend", "reference",
            "--quiet", "--out", str(out), "--checkpoint-every", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists()
    done = json.loads(ckpt.read_text())["done"]
    assert 1 <= len(done) < 5
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["images"] == 5 and r["resumed_images"] == len(done)
    assert not ckpt.exists()  # done with
    from ovss_fast.eval.harness import SyntheticScenes, synthetic_predictor

    full = run_loop(SyntheticScenes(5), synthetic_predictor("mv", "reference"), 6)
    assert r["confusion_matrix"] == full.confusion.tolist()


# --------------------------------------------------------------------------- bad items
def test_bad_items_fail_naming_them_or_are_skipped_and_reported():
    with pytest.raises(BadItem, match="img3.jpg"):
        run_loop(Fake(bad=3), noisy, 3)
    out = run_loop(Fake(bad=3), noisy, 3, state=RunState(3, skip_bad=True))
    assert out.images == 6 and [b["index"] for b in out.skipped] == [3] and "img3.jpg" in out.skipped[0]["error"]
    assert int(out.confusion.sum()) == 6 * 20  # the six readable 4 x 5 labels, nothing of the bad one


def test_eval_command_bad_image_under_workers_one_line_then_skip_bad(tmp_path, capsys):
    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    bad = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    args = ["eval", "--dataset", "voc21", "--root", str(tmp_path), *TINY, "--workers", "2", "--quiet",
            "--window", "64", "--stride", "32", "--short-side", "64"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "2007_000033.jpg" in err[0] and "--skip-bad" in err[0] and "Traceback" not in err[0]
    out = tmp_path / "r.json"
    assert main([*args, "--skip-bad", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 2 and r["skipped"]["count"] == 1
    assert "2007_000033.jpg" in r["skipped"]["items"][0]["error"]
    assert "2007_000033.jpg" in capsys.readouterr().err


def test_resume_needs_a_checkpoint_path(capsys):
    assert main(["eval", "--synthetic", "--resume", "--quiet"]) == 2
    assert "--resume needs" in capsys.readouterr().err


def test_dataset_reading_errors_name_the_file(tmp_path):
    make_layout(tmp_path, "voc21", [0, 1, 255])
    ds = SegmentationDataset("voc21", tmp_path)
    p = Path(ds.samples[0].label)
    p.write_bytes(b"not a png")
    with pytest.raises(BadItem, match=p.name):
        run_loop(ds, lambda item: item["label"], 21, workers=2)


def test_two_gloo_ranks_checkpoint_per_rank_and_gather_the_skipped_items(tmp_path):
    """Each rank checkpoints its own shard; skipped items of every rank reach the report; checkpoints go at the end."""
    from test_eval import free_port

    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    bad = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"  # item 1: rank 1's
    bad.write_bytes(b"")
    out = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "ovss_fast", "eval", "--dataset", "voc21", "--root", str(tmp_path),
         *TINY, "--quiet", "--window", "64", "--stride", "32", "--short-side", "64", "--device", "cpu",
         "--workers", "1", "--skip-bad", "--checkpoint-every", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["images"] == 2 and r["skipped"]["count"] == 1 and r["skipped"]["items"][0]["index"] == 1
    assert "2007_000033.jpg" in r["skipped"]["items"][0]["error"]
    assert not list(tmp_path.glob("two.json.ckpt*"))


def test_a_signal_that_also_killed_the_workers_still_reads_as_an_interruption(tmp_path, capsys, monkeypatch):
    import ovss_fast.eval.harness as harness

    def dying_loop(*args, state, **kw):
        state.stop_signal = signal.SIGINT  # what the handler records, then the workers die of the same SIGINT
        raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")

    monkeypatch.setattr(harness, "run_loop", dying_loop)
    rc = main(["eval", "--synthetic", "--limit", "1", "--backend", "reference", "--quiet",
               "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted by SIGINT" in err and "--resume" in err and "DataLoader" not in err
