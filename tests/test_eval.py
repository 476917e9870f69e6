"""The evaluation harness: readers of every on-disk layout, mIoU, the protocol, the command, torch.distributed.

Fake datasets are written here (a few small images and label PNGs per layout); the
model is the tiny random-weight open_clip config; nothing downloads. The two-process
run uses gloo on localhost.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovss_fast.apps.cli import main
from ovss_fast.eval import (
    DATASETS,
    DistContext,
    SegmentationDataset,
    confusion_matrix,
    load_class_names,
    protocol_size,
    run_loop,
    scores_from_confusion,
)
from ovss_fast.models.clip_features import parse_class_names

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "ovss-fast-tiny", "--pretrained", "none", "--backend", "reference", "--workers", "0"]
pytestmark = pytest.mark.filterwarnings("ignore:pretrained=None")

SIZES = [(40, 56), (48, 48), (36, 60)]  # (height, width) of the fake images


# --------------------------------------------------------------------------- fake layouts
def write_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_label(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(raw.astype(np.uint8))
    if palette:  # VOC and Context masks are palette PNGs whose indices are the classes
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    im.save(path)


def raw_labels(values: list[int], h: int, w: int, seed: int) -> np.ndarray:
    """Every value appears (one pixel each in the first row), the rest drawn from the values."""
    rng = np.random.default_rng(seed)
    raw = rng.choice(values, size=(h, w))
    raw[0, : len(values)] = values
    return raw


def make_layout(root: Path, name: str, values: list[int], kind: str = "labelTrainIds") -> list[np.ndarray]:
    """Write a three-image split of `name`'s layout under root; returns the raw label arrays in reading order."""
    raws = [raw_labels(values, h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    if name in ("voc21", "voc20", "context60", "context59"):
        year, labels, sets = (("VOC2012", "SegmentationClass", "Segmentation") if name.startswith("voc") else
                              ("VOC2010", "SegmentationClassContext", "SegmentationContext"))
        base = root / "VOCdevkit" / year
        ids = ["2008_000002", "2007_000033", "2009_000001"]  # split-file order, not sorted
        for i, raw in zip(ids, raws, strict=True):
            write_image(base / "JPEGImages" / f"{i}.jpg", *raw.shape, seed=len(i))
            write_label(base / labels / f"{i}.png", raw, palette=True)
        (base / "ImageSets" / sets).mkdir(parents=True)
        (base / "ImageSets" / sets / "val.txt").write_text("\n".join(ids) + "\n")
        (base / "ImageSets" / sets / "train.txt").write_text("2000_000000\n")
    else:  # one folder per split: (image path, label path) of the k-th file
        city = ["frankfurt", "lindau", "munster"]
        paths = {
            "coco_stuff164k": lambda k: (f"images/val2017/00000000{k:04d}.jpg",
                                         f"annotations/val2017/00000000{k:04d}_labelTrainIds.png"),
            "ADEChallengeData2016": lambda k: (f"images/validation/ADE_val_0000000{k}.jpg",
                                               f"annotations/validation/ADE_val_0000000{k}.png"),
            "cityscapes": lambda k: (f"leftImg8bit/val/{city[k]}/{city[k]}_000000_0000{k}9_leftImg8bit.png",
                                     f"gtFine/val/{city[k]}/{city[k]}_000000_0000{k}9_gtFine_{kind}.png"),
        }
        folder = {"coco_stuff": "coco_stuff164k", "coco_object": "coco_stuff164k", "ade": "ADEChallengeData2016",
                  "cityscapes": "cityscapes"}[name]
        for k, raw in enumerate(raws):
            image, label = paths[folder](k)
            write_image(root / folder / image, *raw.shape, seed=k)
            write_label(root / folder / label, raw)
    return raws


# raw values written -> what the reader must return for each (255 = ignore)
MAPPINGS = {
    "voc21": {0: 0, 1: 1, 15: 15, 20: 20, 255: 255},
    "voc20": {0: 255, 1: 0, 15: 14, 20: 19, 255: 255},
    "context60": {0: 0, 1: 1, 59: 59, 255: 255},
    "context59": {0: 255, 1: 0, 59: 58, 255: 255},
    "coco_stuff": {0: 0, 79: 79, 80: 80, 170: 170, 255: 255},
    "coco_object": {0: 1, 79: 80, 80: 0, 170: 0, 255: 255},
    "ade": {0: 255, 1: 0, 150: 149, 255: 255},
    "cityscapes": {0: 0, 11: 11, 18: 18, 255: 255},
}


def test_every_benchmark_has_a_reader_test():
    assert set(MAPPINGS) == set(DATASETS)


@pytest.mark.parametrize("name", list(DATASETS))
def test_reader_maps_labels_and_keeps_order(tmp_path, name):
    mapping = MAPPINGS[name]
    raws = make_layout(tmp_path, name, list(mapping))
    ds = SegmentationDataset(name, tmp_path)
    assert len(ds) == 3 and ds.num_classes == DATASETS[name].num_classes
    if name.startswith(("voc", "context")):
        assert [s.name for s in ds.samples] == ["2008_000002", "2007_000033", "2009_000001"]
    lut = np.vectorize(mapping.get)
    for i, raw in enumerate(raws):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, *raw.shape)
        assert item["label"].dtype == torch.int64
        np.testing.assert_array_equal(item["label"].numpy(), lut(raw))
    labels = torch.cat([ds[i]["label"].reshape(-1) for i in range(3)])
    valid = labels[labels != 255]
    assert int(valid.min()) >= 0 and int(valid.max()) < ds.num_classes


@pytest.mark.parametrize("name, inner", [("voc21", "VOCdevkit"), ("voc20", "VOCdevkit/VOC2012"),
                                         ("context59", "VOCdevkit/VOC2010"), ("coco_object", "coco_stuff164k"),
                                         ("ade", "ADEChallengeData2016"), ("cityscapes", "cityscapes")])
def test_root_may_be_the_dataset_folder_itself(tmp_path, name, inner):
    make_layout(tmp_path, name, list(MAPPINGS[name]))
    a, b = SegmentationDataset(name, tmp_path), SegmentationDataset(name, tmp_path / inner)
    assert [s.label for s in a.samples] == [s.label for s in b.samples]


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    # labelIds: 7 road -> 0, 26 car -> 13, 33 bicycle -> 18; 0 unlabeled, 4 static, 255 (license plate) -> ignore
    raws = make_layout(tmp_path, "cityscapes", [0, 4, 7, 26, 33, 255], kind="labelIds")
    ds = SegmentationDataset("cityscapes", tmp_path)
    want = np.vectorize({0: 255, 4: 255, 7: 0, 26: 13, 33: 18, 255: 255}.get)(raws[1])
    np.testing.assert_array_equal(ds[1]["label"].numpy(), want)


def test_other_split(tmp_path):
    make_layout(tmp_path, "voc21", [0, 1])
    with pytest.raises(FileNotFoundError, match="1 of 1 voc21 image files are missing, e.g. .*2000_000000.jpg"):
        SegmentationDataset("voc21", tmp_path, split="train")
    base = tmp_path / "VOCdevkit" / "VOC2012"
    write_image(base / "JPEGImages" / "2000_000000.jpg", 20, 30, seed=0)
    write_label(base / "SegmentationClass" / "2000_000000.png", np.ones((20, 30)), palette=True)
    ds = SegmentationDataset("voc21", tmp_path, split="train")
    assert ds.split == "train" and len(ds) == 1 and ds[0]["label"].shape == (20, 30)


def test_class_name_files_parse_and_agree():
    lists = {name: load_class_names(name) for name in DATASETS}
    for name, names in lists.items():
        assert len(names) == DATASETS[name].num_classes
        classes = parse_class_names(names)  # the pipeline's ";" format
        firsts = [c[0] for c in classes]
        assert len(set(firsts)) == len(firsts), f"{name}: duplicate class names"
    assert lists["voc21"][1:] == lists["voc20"] and lists["voc21"][0].startswith("background")
    assert lists["context60"][1:] == lists["context59"] and lists["context60"][0] == "background"
    assert lists["coco_object"][1:] == lists["coco_stuff"][:80]
    assert lists["coco_stuff"][0].startswith("person") and lists["coco_stuff"][80] == "banner"
    assert lists["coco_stuff"][-1] == "wood" and lists["ade"][0] == "wall" and lists["ade"][-1] == "flag"
    assert lists["cityscapes"][0] == "road" and lists["cityscapes"][-1].startswith("bicycle")
    assert lists["voc20"][14].startswith("person") and lists["context59"][-1] == "wood"


def test_class_name_files_are_package_data():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["ovss_fast"]
    shipped = {p.name for g in globs for p in (ROOT / "ovss_fast").glob(g)}
    assert shipped == {f"{name}.txt" for name in DATASETS}


# --------------------------------------------------------------------------- clear errors
def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'voc'; valid names: voc21, voc20, context60"):
        SegmentationDataset("voc", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationDataset("ade", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not hold the ade layout"):
        SegmentationDataset("ade", tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    expected = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    with pytest.raises(FileNotFoundError, match=f"split file '{expected}' not found"):
        SegmentationDataset("voc21", tmp_path)


def test_missing_label_and_bad_values(tmp_path):
    make_layout(tmp_path, "ade", [0, 1, 150])
    ann = tmp_path / "ADEChallengeData2016" / "annotations" / "validation"
    os.remove(ann / "ADE_val_00000001.png")
    with pytest.raises(FileNotFoundError, match="1 of 3 ade label files are missing, e.g. .*ADE_val_00000001.png"):
        SegmentationDataset("ade", tmp_path)
    write_label(ann / "ADE_val_00000001.png", np.full((48, 48), 151))
    ds = SegmentationDataset("ade", tmp_path)
    with pytest.raises(ValueError, match=r"ADE_val_00000001.png' holds value 151, which ade does not define "
                                         r"\(valid raw values: 0..150, 255\)"):
        ds[1]
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(ann / "ADE_val_00000001.png")
    with pytest.raises(ValueError, match="mode 'RGB'; expected a single-channel PNG"):
        ds[1]
    write_label(ann / "ADE_val_00000001.png", np.zeros((20, 48)))
    with pytest.raises(ValueError, match="is 48x48 but its annotation .* is 48x20"):
        ds[1]


# --------------------------------------------------------------------------- metrics
def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 2]])
    cm = confusion_matrix(pred, target, 5)
    want = torch.zeros(5, 5, dtype=torch.int64)
    want[0, 0] = 1  # rows ground truth, columns prediction; the two 255 pixels are skipped
    want[0, 1] = 1
    want[1, 1] = 2
    want[2, 2] = 1
    want[2, 0] = 1
    assert torch.equal(cm, want)
    s = scores_from_confusion(cm)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: 2/(2+3-2); class 2: 1/(2+1-1); class 3 (never in gt,
    # never predicted since its pixel is ignored) and class 4 (nowhere): NaN, left out of the mean
    iou = [1 / 3, 2 / 3, 1 / 2, math.nan, math.nan]
    torch.testing.assert_close(s["IoU"], torch.tensor(iou, dtype=torch.float64), equal_nan=True)
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["aAcc"] == pytest.approx(4 / 6)
    assert s["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_a_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 is absent from the ground truth but predicted once
    s = scores_from_confusion(confusion_matrix(pred, target, 4))
    assert s["IoU"][2] == 0 and math.isnan(s["Acc"][2]) and math.isnan(s["IoU"][3])
    assert s["mIoU"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # class 3 (nowhere) is not in the mean
    empty = scores_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


def test_confusion_matrix_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="target holds label 7, outside 0..4"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 5)
    with pytest.raises(ValueError, match="pred holds label -1"):
        confusion_matrix(torch.tensor([-1, 1]), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), 5)


def test_protocol_size():
    assert protocol_size(375, 500, 336) == (336, 448)  # a typical VOC image
    assert protocol_size(500, 375, 336) == (448, 336)
    assert protocol_size(1024, 2048, 560) == (560, 1120)  # Cityscapes
    assert protocol_size(100, 1000, 336) == (205, 2048)  # the long side cap wins: scale 2.048
    assert protocol_size(600, 800, 448, long_side=512) == (384, 512)


def test_loop_with_a_perfect_predictor_and_a_limit(tmp_path):
    make_layout(tmp_path, "voc20", [0, 1, 15, 20, 255])
    ds = SegmentationDataset("voc20", tmp_path)
    out = run_loop(ds, lambda item: item["label"].clamp(max=19), 20, limit=2)
    assert out.images == 2
    s = scores_from_confusion(out.confusion)
    assert s["mIoU"] == 1.0 and s["aAcc"] == 1.0
    counted = sum(int((ds[i]["label"] != 255).sum()) for i in range(2))
    assert int(out.confusion.sum()) == counted


def test_predictor_resizes_by_the_protocol_and_answers_at_annotation_size(tmp_path):
    pytest.importorskip("open_clip")
    from ovss_fast.eval import SegmenterPredictor
    from ovss_fast.pipeline.segmenter import Segmenter

    seg = Segmenter(model="ovss-fast-tiny", pretrained=None, device="cpu", backend="reference",
                    templates=("a {}.",), window=32, stride=16)
    seen = []
    predict_once = seg.predict  # the predictor runs the model once per image, through predict
    seg.predict = lambda x, names, guide: seen.append((tuple(x.shape), tuple(guide.shape))) or predict_once(
        x, names, guide=guide)
    predict = SegmenterPredictor(seg, ["cat; kitten", "dog"], short_side=64)
    image = torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8)
    labels = predict({"image": image})
    assert seen == [((3, 64, 96), (3, 70, 100))]  # 70x100 -> 64x91 -> whole patches; guided by the original
    assert labels.shape == (70, 100) and labels.dtype == torch.int64 and int(labels.max()) <= 1
    # the peers' flavour: no snapping to whole patches
    SegmenterPredictor(seg, ["cat; kitten", "dog"], short_side=64, antialias=False, snap=False)({"image": image})
    assert seen[-1] == ((3, 64, 91), (3, 70, 100))


# --------------------------------------------------------------------------- the command
def test_eval_command_on_a_fake_voc(tmp_path, capsys):
    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    out = tmp_path / "results.json"
    assert main(["eval", "--dataset", "voc21", "--root", str(tmp_path), *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "mIoU" in captured.out and "wrote" in captured.out
    assert "3/3" in captured.err  # the progress bar
    r = json.loads(out.read_text())
    assert r["images"] == 3 and r["images_per_second"] > 0
    assert [c["class"] for c in r["per_class"]] == load_class_names("voc21")
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.shape == (21, 21)
    # every counted pixel is one of the annotation's non-ignored pixels
    ds = SegmentationDataset("voc21", tmp_path)
    gt = torch.stack([torch.bincount(ds[i]["label"][ds[i]["label"] != 255], minlength=21) for i in range(3)]).sum(0)
    assert torch.equal(cm.sum(dim=1), gt)
    absent = [c for c in range(21) if int(gt[c]) == 0]  # e.g. bicycle (2) is in no annotation
    assert 2 in absent
    for c in absent:  # IoU undefined unless predicted somewhere, then 0
        assert r["per_class"][c]["IoU"] == (None if int(cm[:, c].sum()) == 0 else 0.0)
    s = scores_from_confusion(cm)
    assert r["mIoU"] == pytest.approx(100 * s["mIoU"], abs=0.006)
    c = r["config"]
    assert (c["dataset"], c["short_side"], c["window_px"], c["stride_px"]) == ("voc21", 336, None, None)  # whole image
    assert c["fallback_window_px"] == [224, 224] and r["window_fallback"]["count"] == 0
    assert c["model"] == "ovss-fast-tiny" and c["mode"] == "mv" and c["limit"] is None
    assert r["environment"]["world_size"] == 1


def test_eval_command_synthetic(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["eval", "--synthetic", "--limit", "3", "--backend", "reference", "--quiet", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 3 and r["config"]["dataset"] == "synthetic" and len(r["per_class"]) == 6
    assert r["mIoU"] > 50  # the method on easy scenes (raw argmax is far lower; see tests/test_quality.py)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "voc", "--root", "."], "unknown dataset 'voc'; valid names: voc21, voc20"),
    (["--dataset", "ade"], "--root is required"),
    (["--root", "."], "--dataset is required"),
    (["--dataset", "ade", "--root", "/nowhere/ade"], "does not exist"),
    (["--synthetic", "--dataset", "ade"], "leave out --dataset"),
    (["--synthetic", "--limit", "0"], "--limit must be >= 1"),
])
def test_eval_command_errors(capsys, args, message):
    assert main(["eval", *args, *TINY]) == 2
    err = capsys.readouterr().err
    assert "ovss-fast eval: error: " in err and message in err and "Traceback" not in err


# --------------------------------------------------------------------------- torch.distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_one_process_confusion_matrix(tmp_path):
    """Two ranks (reading through DataLoader workers) == one process reading in the loop."""
    make_layout(tmp_path, "voc21", [0, 1, 7, 15, 20, 255])
    # gloo on the CPU also where a GPU is visible (two ranks cannot share one GPU under NCCL)
    args = ["eval", "--dataset", "voc21", "--root", str(tmp_path), *TINY, "--quiet", "--window", "64",
            "--stride", "32", "--short-side", "96", "--device", "cpu"]
    one = tmp_path / "one.json"
    assert main([*args, "--out", str(one)]) == 0
    two = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "ovss_fast", *args, "--workers", "1", "--out", str(two)],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["environment"]["world_size"] == 2 and b["environment"]["process_group_backend"] == "gloo"
    assert b["images"] == 3
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["mIoU"] == b["mIoU"]


def test_sharding_covers_every_item_once():
    ranks = [DistContext(rank=r, world_size=3) for r in range(3)]
    shards = [ctx.shard(10) for ctx in ranks]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert shards[1] == [1, 4, 7]


# --------------------------------------------------------------------------- the docs' tables and the results table
def test_docs_protocol_table_is_the_code_table():
    section = (ROOT / "docs" / "evaluation-protocols.md").read_text()
    from ovss_fast.eval.protocols import PROTOCOLS

    got, protocols = {}, set()
    for line in section.splitlines():
        if line.startswith("| `") and not line.startswith("| `--"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0].strip("`") in PROTOCOLS:  # the protocol table's rows
                protocols.add(cells[0].strip("`"))
                continue
            got[cells[0].strip("`")] = tuple(int(c) for c in cells[2:6])
    assert protocols == set(PROTOCOLS)
    assert got == {s.name: (s.num_classes, s.short_side, s.window, s.stride) for s in DATASETS.values()}


def test_results_table(tmp_path, capsys):
    from ovss_fast.eval.table import main as table_main

    def report(dataset, miou, mode="mv", limit=None, images=10):
        cfg = {"dataset": dataset, "model": "ViT-B-16", "affinity": "clip", "mode": mode, "limit": limit,
               "images_in_split": 10}
        return {"mIoU": miou, "images": images, "config": cfg}

    files = []
    for k, r in enumerate([report("ade", 20.0), report("voc21", 60.0), report("voc21", 50.0, mode="op"),
                           report("ade", 10.0, mode="op", limit=2, images=2)]):
        files.append(tmp_path / f"{k}.json")
        files[-1].write_text(json.dumps(r))
    assert table_main([str(f) for f in files]) == 0
    lines = capsys.readouterr().out.splitlines()
    # columns in DATASETS order; files without features / head / protocol are DSLO's defaults
    assert lines[0] == "| model | affinity | mode | features | head | protocol | voc21 | ade | avg |"
    assert lines[2] == "| ViT-B-16 | clip | mv | clip | dslo | dslo | 60.0 | 20.0 | 40.0 |"
    assert lines[3] == "| ViT-B-16 | clip | op | clip | dslo | dslo | 50.0 | 10.0* | 30.0 |"  # * = --limit
    peer = report("voc21", 40.0)
    peer["config"].update(features="sclip", head="logits", protocol={"protocol": "sclip", "overridden": ["scale"]})
    files[1].write_text(json.dumps(peer))
    assert table_main([str(f) for f in files[1:2]]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| ViT-B-16 | clip | mv | sclip | logits | sclip* | 40.0 | 40.0 |"
    files[0].write_text("{}")
    assert table_main([str(files[0])]) == 2 and "not an ovss-fast eval results file" in capsys.readouterr().err
