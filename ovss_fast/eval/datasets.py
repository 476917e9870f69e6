"""Readers for the eight training-free OVSS benchmarks in their usual on-disk layouts.

Every reader yields the image (uint8 [3, H, W]) and its annotation (int64 [H, W]) with
class indices 0..K-1 and 255 = ignore. Raw annotation values are mapped through a
256-entry lookup table per dataset; a value the table does not know (e.g. 37 in a VOC
mask) is an error naming the file, never silently ignored.

Layouts (``root`` may be the folder named first or any folder above it shown here):

    voc21, voc20      VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}
    context60, 59     VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
                      ImageSets/SegmentationContext/val.txt}                       (mmseg's converted layout)
    coco_stuff,       coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}
    coco_object                                                                    (mmseg's converted layout)
    ade               ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}
    cityscapes        cityscapes/{leftImg8bit/val/CITY/*_leftImg8bit.png,
                      gtFine/val/CITY/*_gtFine_labelTrainIds.png}   (or *_gtFine_labelIds.png, mapped here)

Label conventions: voc20, context59 and ade drop class 0 (background / "other") to
ignore and shift the rest down by one (mmseg's ``reduce_zero_label``); coco_object keeps
COCO-Stuff's 80 thing classes as 1..80 and turns all 91 stuff classes into 0 =
background.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ovss_fast.errors import InputError
from ovss_fast.pipeline.image_io import decode, to_uint8

IGNORE_INDEX = 255
#: the long side of a resized image is capped at this many pixels (mmseg's Resize(scale=(2048, short))).
LONG_SIDE_CAP = 2048
#: sentinel in a lookup table: a raw annotation value the dataset does not define
_UNKNOWN = -1


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark and its protocol defaults (short side, sliding window and stride in pixels)."""

    name: str
    title: str
    num_classes: int
    short_side: int
    window: int
    stride: int
    split: str
    layout: str


#: the folder layouts the datasets that share images share
_VOC = "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/val.txt}"
_CONTEXT = "VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext/val.txt}"
_COCO = "coco_stuff164k/{images/val2017,annotations/val2017/*_labelTrainIds.png}"

#: The evaluation protocol, one row per benchmark; docs/evaluation-protocols.md shows this table.
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("voc21", "PASCAL VOC 2012 val, background + 20", 21, 336, 224, 112, "val", _VOC),
    DatasetSpec("voc20", "PASCAL VOC 2012 val, 20 (background ignored)", 20, 336, 224, 112, "val", _VOC),
    DatasetSpec("context60", "PASCAL Context val, background + 59", 60, 336, 224, 112, "val", _CONTEXT),
    DatasetSpec("context59", "PASCAL Context val, 59 (background ignored)", 59, 336, 224, 112, "val", _CONTEXT),
    DatasetSpec("coco_stuff", "COCO-Stuff 164k val2017, 171", 171, 448, 224, 112, "val2017", _COCO),
    DatasetSpec("coco_object", "COCO-Object val2017, background + 80 things", 81, 448, 224, 112, "val2017", _COCO),
    DatasetSpec("ade", "ADE20K val, 150", 150, 448, 224, 112, "validation",
                "ADEChallengeData2016/{images/validation,annotations/validation}"),
    DatasetSpec("cityscapes", "Cityscapes val, 19", 19, 560, 224, 112, "val",
                "cityscapes/{leftImg8bit/val/CITY,gtFine/val/CITY/*_gtFine_labelTrainIds.png}"),
)}

#: Cityscapes labelIds -> trainIds (the 19 evaluated classes; every other id is ignored).
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def dataset_spec(name: str) -> DatasetSpec:
    """The protocol row of a benchmark; an unknown name lists the valid ones."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_class_names(name: str) -> list[str]:
    """The class names of a benchmark, one entry per class, synonyms separated by ";".

    Read from the package's ``ovss_fast/data/classnames/NAME.txt`` (one class per line,
    "#" comment lines).
    """
    spec = dataset_spec(name)
    path = resources.files("ovss_fast").joinpath("data", "classnames", f"{name}.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"class-name file {path} is missing from the installed package") from err
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(names) != spec.num_classes:
        raise InputError(f"class-name file {path} lists {len(names)} classes; {name} has {spec.num_classes}")
    return names


# --------------------------------------------------------------------------- label lookup tables
def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, _UNKNOWN, dtype=np.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, label in mapping.items():
        lut[raw] = label
    return lut


def identity_lut(num_classes: int) -> np.ndarray:
    """Raw value v in 0..K-1 is class v; 255 is ignored."""
    return _lut({v: v for v in range(num_classes)})


def reduce_zero_lut(num_classes: int) -> np.ndarray:
    """Raw 0 (background / "other") is ignored, raw v in 1..K is class v - 1 (mmseg's reduce_zero_label)."""
    return _lut({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, num_classes + 1)}})


def coco_object_lut() -> np.ndarray:
    """COCO-Stuff trainIds -> COCO-Object: thing t (0..79) -> t + 1, stuff (80..170) -> 0 background."""
    return _lut({**{t: t + 1 for t in range(80)}, **{s: 0 for s in range(80, 171)}})


def cityscapes_label_ids_lut() -> np.ndarray:
    """Cityscapes labelIds (0..33, -1 stored as 255) -> the 19 trainIds; every other id is ignored."""
    return _lut({**{i: IGNORE_INDEX for i in range(34)}, **CITYSCAPES_ID_TO_TRAIN_ID})


# --------------------------------------------------------------------------- file listing
@dataclass(frozen=True)
class Sample:
    image: str
    label: str
    name: str


def _find_base(root: Path, candidates: tuple[str, ...], marker: str, spec: DatasetSpec) -> Path:
    """The first of root/candidate holding the marker folder; the error names every place looked at."""
    if not root.exists():
        raise FileNotFoundError(f"--root {str(root)!r} does not exist (the {spec.name} dataset folder, "
                                f"holding {spec.layout})")
    if not root.is_dir():
        raise NotADirectoryError(f"--root {str(root)!r} is not a folder")
    tried = []
    for c in candidates:
        base = root / c if c else root
        if (base / marker).is_dir():
            return base
        tried.append(str(base / marker))
    raise FileNotFoundError(
        f"--root {str(root)!r} does not hold the {spec.name} layout {spec.layout}: none of "
        f"{', '.join(tried)} is a folder"
    )


def _split_ids(split_file: Path, spec: DatasetSpec) -> list[str]:
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {str(split_file)!r} not found (the {spec.split!r} image list of "
                                f"{spec.name}; expected layout {spec.layout})")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"split file {str(split_file)!r} lists no images")
    return ids


def _listed(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def _check_exist(samples: list[Sample], spec: DatasetSpec) -> list[Sample]:
    if not samples:
        raise InputError(f"no images found for {spec.name} (expected layout {spec.layout})")
    for kind in ("image", "label"):
        missing = [getattr(s, kind) for s in samples if not os.path.isfile(getattr(s, kind))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(samples)} {spec.name} {kind} files are missing, "
                                    f"e.g. {missing[0]!r} (expected layout {spec.layout})")
    return samples


def _voc_like(root: Path, spec: DatasetSpec, split: str, year: str, label_dir: str, set_dir: str) -> list[Sample]:
    base = _find_base(root, ("", year, f"VOCdevkit/{year}"), "JPEGImages", spec)
    ids = _split_ids(base / "ImageSets" / set_dir / f"{split}.txt", spec)
    return [Sample(str(base / "JPEGImages" / f"{i}.jpg"), str(base / label_dir / f"{i}.png"), i) for i in ids]


def _voc(root: Path, spec: DatasetSpec, split: str) -> tuple[list[Sample], np.ndarray]:
    samples = _voc_like(root, spec, split, "VOC2012", "SegmentationClass", "Segmentation")
    return samples, identity_lut(21) if spec.name == "voc21" else reduce_zero_lut(20)


def _context(root: Path, spec: DatasetSpec, split: str) -> tuple[list[Sample], np.ndarray]:
    samples = _voc_like(root, spec, split, "VOC2010", "SegmentationClassContext", "SegmentationContext")
    return samples, identity_lut(60) if spec.name == "context60" else reduce_zero_lut(59)


def _coco(root: Path, spec: DatasetSpec, split: str) -> tuple[list[Sample], np.ndarray]:
    base = _find_base(root, ("", "coco_stuff164k"), f"images/{split}", spec)
    samples = [Sample(str(p), str(base / "annotations" / split / f"{p.stem}_labelTrainIds.png"), p.stem)
               for p in _listed(base / "images" / split)]
    return samples, identity_lut(171) if spec.name == "coco_stuff" else coco_object_lut()


def _ade(root: Path, spec: DatasetSpec, split: str) -> tuple[list[Sample], np.ndarray]:
    base = _find_base(root, ("", "ADEChallengeData2016"), f"images/{split}", spec)
    samples = [Sample(str(p), str(base / "annotations" / split / f"{p.stem}.png"), p.stem)
               for p in _listed(base / "images" / split)]
    return samples, reduce_zero_lut(150)


def _cityscapes(root: Path, spec: DatasetSpec, split: str) -> tuple[list[Sample], np.ndarray]:
    base = _find_base(root, ("", "cityscapes"), f"leftImg8bit/{split}", spec)
    images = sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    prefix = [(p.parent.name, p.name[: -len("_leftImg8bit.png")]) for p in images]

    def samples(kind: str) -> list[Sample]:
        return [Sample(str(p), str(base / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png"), stem)
                for p, (city, stem) in zip(images, prefix, strict=True)]

    train_ids = samples("labelTrainIds")
    if train_ids and not all(os.path.isfile(s.label) for s in train_ids):
        label_ids = samples("labelIds")
        if all(os.path.isfile(s.label) for s in label_ids):
            return label_ids, cityscapes_label_ids_lut()  # mapped to trainIds here
    return train_ids, identity_lut(19)


_READERS: dict[str, Callable[[Path, DatasetSpec, str], tuple[list[Sample], np.ndarray]]] = {
    "voc21": _voc, "voc20": _voc, "context60": _context, "context59": _context,
    "coco_stuff": _coco, "coco_object": _coco, "ade": _ade, "cityscapes": _cityscapes,
}


# --------------------------------------------------------------------------- reading
def read_image(path: str) -> Tensor:
    """An image file -> uint8 [3, H, W] RGB, as stored (no EXIF rotation: the annotation is not rotated either).

    Decoded by :mod:`ovss_fast.pipeline.image_io`: 16-bit images scaled (then rounded to 8 bits), alpha
    composited on black; a clear error for a corrupt file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = decode(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"could not read image file {path!r} ({exc.__class__.__name__}: {exc})") from exc
    return to_uint8(arr)


def read_label(path: str, lut: np.ndarray, dataset: str) -> Tensor:
    """A single-channel annotation PNG -> int64 [H, W] class indices (255 = ignore) through ``lut``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise InputError(f"annotation {path!r} has mode {im.mode!r}; expected a single-channel PNG of "
                                 "class indices (mode P or L)")
            raw = np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"could not read annotation file {path!r} ({exc.__class__.__name__}: {exc})") from exc
    bad = (raw < 0) | (raw > 255)
    if not bad.any():
        mapped = lut[raw]
        bad = mapped == _UNKNOWN
    if bad.any():
        value = int(raw[bad][0])
        valid = np.flatnonzero(lut != _UNKNOWN)
        raise InputError(f"annotation {path!r} holds value {value}, which {dataset} does not define "
                         f"(valid raw values: {_ranges(valid)})")
    return torch.from_numpy(mapped)


def _ranges(values: np.ndarray) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(out)


class SegmentationDataset(torch.utils.data.Dataset):
    """One benchmark's split on disk. ``ds[i]`` -> {"image": uint8 [3, H, W], "label": int64 [H, W], "name": str}.

    name: one of :data:`DATASETS`; root: the dataset folder (see the module docstring);
    split: default the protocol's (val, val2017, validation).
    """

    def __init__(self, name: str, root: str | os.PathLike, split: str | None = None) -> None:
        self.spec = dataset_spec(name)
        self.name = name
        self.root = Path(root).expanduser()
        self.split = split or self.spec.split
        samples, self.lut = _READERS[name](self.root, self.spec, self.split)
        self.samples = _check_exist(samples, self.spec)
        self.class_names = load_class_names(name)
        self.num_classes = self.spec.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image, label = read_image(s.image), read_label(s.label, self.lut, self.name)
        if tuple(image.shape[1:]) != tuple(label.shape):
            raise InputError(f"image {s.image!r} is {image.shape[2]}x{image.shape[1]} but its annotation "
                             f"{s.label!r} is {label.shape[1]}x{label.shape[0]} (width x height)")
        return {"image": image, "label": label, "name": s.name}

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name!r}, root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"


__all__ = ["DATASETS", "IGNORE_INDEX", "LONG_SIDE_CAP", "DatasetSpec", "SegmentationDataset", "dataset_spec",
           "load_class_names", "read_image", "read_label"]
