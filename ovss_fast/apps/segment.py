"""``ovss-fast segment``: segment image files with open_clip and a list of class names.

    ovss-fast segment IMAGE --classes "cat; kitten, dog, grass" --out labels.png [--overlay overlay.png]

Classes are separated by ",", synonyms of one class by ";". For one image, --out and
--overlay are files; for several images or a folder they are folders, and each image
writes NAME.png in them. The label PNG is a palette image whose pixel values are the
class indices (0 = first class).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator

from ovss_fast.apps.flags import (
    add_method_arguments,
    add_model_arguments,
    check_method_arguments,
    fail,
    fail_or_raise,
    method_kwargs,
    segmenter_from_args,
    user_error,
)
from ovss_fast.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  ovss-fast segment photo.jpg --classes \"cat; kitten, dog, grass\" --out labels.png --overlay overlay.png\n"
        "  ovss-fast segment photos/ --classes \"person; people, car, road, sky\" --window 448 --stride 224 "
        "--out labels/\n"
        "  ovss-fast segment photo.jpg --classes \"sky, cat, dog\" --features sclip --head logits --bg-threshold 0.1 "
        "--out l.png\n"
        "  ovss-fast segment photo.jpg --classes \"cat, dog\" --model hf:/path/to/clip-vit-base-patch16 --out l.png\n"
        "  ovss-fast segment photo.jpg --classes \"cat, dog\" --model ViT-B-16-quickgelu "
        "--pretrained /path/to/open_clip_pytorch_model.bin --out l.png   (OpenAI weights from a local file)\n"
        "  ovss-fast segment photo.jpg --classes \"sky, cat, dog\" --head lposs --refine lposs+ "
        "--features maskclip-res --pretrained laion2b_s34b_b88k --affinity-weights dino_vitb16.pth --window 224 "
        "--stride 112 --aggregation pixels --resize 448 --no-antialias --out l.png   (LPOSS+, docs/lposs.md)\n"
        "offline smoke test (random weights, meaningless labels):\n"
        "  ovss-fast segment photo.jpg --classes \"cat, dog\" --model ovss-fast-tiny --pretrained none --out l.png"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files and/or folders of images (png, jpg, ...)")
    parser.add_argument("--classes", required=True,
                        help='class names separated by ",", synonyms of a class by ";" '
                             '(e.g. "cat; kitten, dog, grass")')
    parser.add_argument("--out", required=True,
                        help="label PNG to write (a folder when there are several images)")
    parser.add_argument("--overlay", default=None,
                        help="overlay PNG with a legend of class names (a folder when there are several images)")
    add_model_arguments(parser)
    parser.add_argument("--window", type=int, default=None,
                        help="sliding window in pixels, a multiple of the patch size (default: whole image)")
    parser.add_argument("--stride", type=int, default=None, help="window stride in pixels (default: window / 2)")
    parser.add_argument("--resize", type=int, default=None,
                        help="resize the shorter side to this many pixels before windowing (default: native size)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay label opacity in [0, 1] (default 0.5)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_method_arguments(parser)


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files as given, folders replaced by their image files (sorted, not recursive)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(p, f)))
            if not found:
                raise InputError(f"folder {p!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"image {p!r} not found")
    return out


def _output_names(files: list[str]) -> list[str]:
    """NAME.png per input, made unique when two inputs share a name."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        names.append(f"{stem}.png" if k == 0 else f"{stem}_{k}.png")
    return names


def progress(items: list[str], enabled: bool) -> Iterator[str]:
    """Yield items while drawing a progress bar on stderr (tqdm when installed)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc="segment", unit="image", file=sys.stderr)
        return
    n, start = len(items), time.monotonic()
    for i, item in enumerate(items):
        done = int(30 * i / n)
        sys.stderr.write(f"\rsegment [{'#' * done}{'.' * (30 - done)}] {i}/{n} {os.path.basename(item)[:40]:40s}")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"\rsegment [{'#' * 30}] {n}/{n} in {time.monotonic() - start:.1f} s{' ' * 40}\n")


PROG = "ovss-fast segment"


def run(args: argparse.Namespace) -> int:
    try:
        from ovss_fast.models.clip_features import parse_class_names

        classes = parse_class_names(args.classes)
        files = expand_inputs(args.images)
        if not 0.0 <= args.alpha <= 1.0:
            raise InputError(f"--alpha must lie in [0, 1], got {args.alpha}")
        check_method_arguments(args)
    except Exception as exc:
        return fail_or_raise(PROG, exc)
    many = len(files) > 1 or any(os.path.isdir(p) for p in args.images)
    if many:
        for folder in (args.out, args.overlay):
            if folder is not None:
                if os.path.exists(folder) and not os.path.isdir(folder):
                    return fail(PROG, f"{folder!r} must be a folder when segmenting several images")
                os.makedirs(folder, exist_ok=True)
        outs = [os.path.join(args.out, n) for n in _output_names(files)]
        overlays = [os.path.join(args.overlay, n) for n in _output_names(files)] if args.overlay else None
    else:
        outs = [args.out]
        overlays = [args.overlay] if args.overlay else None

    try:
        segmenter = segmenter_from_args(args, window=args.window, stride=args.stride, resize=args.resize,
                                        **method_kwargs(args))
    except Exception as exc:
        return fail_or_raise(PROG, exc)

    from PIL import Image

    from ovss_fast.apps.palette import overlay, save_labels
    from ovss_fast.pipeline.image_inputs import load_image

    names = ["; ".join(c) for c in classes]
    failures = 0
    for i, path in enumerate(progress(files, enabled=many and not args.quiet)):
        try:
            image = load_image(path)
            labels = segmenter.predict(image, args.classes).labels.cpu()
            save_labels(labels, outs[i], num_classes=len(classes))
            if overlays is not None:
                pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
                overlay(pil, labels, names, alpha=args.alpha).save(overlays[i], format="PNG")
        except Exception as exc:  # a user error skips the image (one line); anything else keeps its traceback
            message = user_error(exc)
            if message is None:
                raise
            failures += 1
            if not many:
                return fail(PROG, message)
            print(f"\novss-fast segment: skipping {path}: {message}", file=sys.stderr)
    if failures:
        return fail(PROG, f"{failures} of {len(files)} images failed", code=1)
    if not many:
        print(f"wrote {outs[0]}" + (f" and {overlays[0]}" if overlays else ""))
    else:
        print(f"wrote {len(files)} label maps to {args.out}" + (f" and overlays to {args.overlay}" if overlays else ""))
    return 0
