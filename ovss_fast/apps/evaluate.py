"""``ovss-fast eval``: mIoU of the Segmenter on a benchmark (or on synthetic scenes), one or many processes.

    ovss-fast eval --dataset voc21 --root /data/VOCdevkit --out results.json
    torchrun --nproc_per_node=8 -m ovss_fast eval --dataset ade --root /data/ade --out ade.json
    ovss-fast eval --synthetic --out synthetic.json          (no dataset, no weights)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ovss_fast.apps import flags as _cli
from ovss_fast.errors import InputError
from ovss_fast.eval.checkpoint import BadItem, Interrupted, RunState, check_writable, write_json_atomic
from ovss_fast.eval.datasets import DATASETS, LONG_SIDE_CAP
from ovss_fast.eval.protocols import BACKGROUND_DATASETS, PROTOCOLS, resolve_protocol
from ovss_fast.ops.options import HeadOptions
from ovss_fast.pipeline.presets import resolve_preset

if TYPE_CHECKING:
    from ovss_fast.eval.distributed import DistContext


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    table = "\n".join(f"  {s.name:<12} {s.short_side:>5} {s.window:>6} {s.stride:>6}   {s.title}"
                      for s in DATASETS.values())
    parser.epilog = (
        "--protocol dslo: the whole image at short side 336 (coco_stuff 448, cityscapes 560), the window below "
        "only for an image over --memory-budget (listed in the results file); --protocol dslo-windows sizes "
        "(pixels; sclip, clearclip, naclip: see docs/evaluation-protocols.md):\n"
        "  dataset      short window stride\n" + table + "\n"
        f"long side capped at {LONG_SIDE_CAP}; labels predicted at the annotation's size (JBU), 255 ignored.\n\n"
        "examples:\n"
        "  ovss-fast eval --dataset voc21 --root /data/VOCdevkit --out voc21.json\n"
        "  torchrun --nproc_per_node=4 -m ovss_fast eval --dataset coco_stuff --root /data/coco_stuff164k "
        "--out coco.json\n"
        "  ovss-fast eval --synthetic --out synthetic.json      (no dataset, no weights)\n"
        "  ovss-fast eval --dataset voc21 --root /data/VOCdevkit --protocol sclip --features sclip  (SCLIP's setup)\n"
        "  ovss-fast eval --dataset ade --root /data/ade --protocol naclip --features naclip --head dslo --mode op\n"
        "  ovss-fast eval --dataset voc21 --root /data/VOCdevkit --protocol lposs --pretrained laion2b_s34b_b88k "
        "--affinity-weights dino_vitb16.pth  (LPOSS+)\n"
        "offline smoke test (random weights, meaningless mIoU):\n"
        "  ovss-fast eval --dataset voc21 --root /data/VOCdevkit --limit 4 --model ovss-fast-tiny --pretrained none"
    )
    parser.add_argument("--dataset", default=None, help=f"benchmark: {', '.join(DATASETS)}")
    parser.add_argument("--root", default=None, help="the dataset folder (e.g. the one holding VOCdevkit)")
    parser.add_argument("--split", default=None, help="split (default: val, val2017 for COCO, validation for ADE)")
    parser.add_argument("--synthetic", action="store_true",
                        help="evaluate seeded synthetic scenes instead (no dataset, no weights; --limit scenes, "
                             "default 16)")
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="synthetic scenes only")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds torch before the model is built (random weights are then the same on every "
                             "rank) and is the first synthetic scene's seed (default 0)")
    parser.add_argument("--out", default=None, help="results JSON to write (rank 0); default: print only")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--protocol", default="dslo", choices=list(PROTOCOLS),
                        help="evaluation protocol: dslo (the paper's whole image, default), dslo-windows (sliding "
                             "windows), sclip, clearclip, naclip, lposs (LPOSS+: head lposs, refine lposs+, features "
                             "maskclip-res, LPOSS's propagation settings); per dataset it sets "
                             "the short side, window / stride, logit scale, bg threshold, resize flavour, aggregation, "
                             "positional interpolation and head (flags given here override it)")
    _cli.add_model_arguments(parser)
    parser.add_argument("--short-side", type=int, default=None, help="resize short side (default: per dataset)")
    parser.add_argument("--long-side", type=int, default=LONG_SIDE_CAP,
                        help=f"cap on the resized long side (default {LONG_SIDE_CAP})")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding window in pixels (default: per dataset; 0 = whole image)")
    parser.add_argument("--stride", type=int, default=None, help="window stride in pixels (default: per dataset)")
    parser.add_argument("--workers", type=int, default=2, help="image-reading worker processes (default 2)")
    parser.add_argument("--snap", default=None, action=argparse.BooleanOptionalAction,
                        help="round the resized image to whole patches (default: the protocol's; dslo on)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-class table")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default OUT.ckpt with --out, none without): the confusion matrix and "
                             "the processed images, written every --checkpoint-every images and on SIGINT/SIGTERM")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="images between checkpoints (default 50; 0 = only on interruption or failure)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint of an interrupted run with the same settings")
    parser.add_argument("--boundary-iou", default=True, action=argparse.BooleanOptionalAction,
                        help="also report Boundary IoU (mBIoU, per class; dilation ratio 0.02) beside mIoU "
                             "(default on; --no-boundary-iou leaves it out)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images / annotations (counted and named in the report) instead of "
                             "stopping at the first")
    _cli.add_method_arguments(parser, protocol_note="--protocol sets scale, bg-threshold, head, aggregation, crop, "
                                               "pos-interp and antialias")


PROG = "ovss-fast eval"


def _fail(msg: object, code: int = 2) -> int:
    return _cli.fail(PROG, msg, code)


def _validate(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume and not (args.out or args.checkpoint):
        raise InputError("--resume needs the checkpoint of the run to continue: pass the same --out (or --checkpoint)")
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    _cli.check_method_arguments(args)
    given_bg = isinstance(args.bg_threshold, float)
    for flag in ("short_side", "long_side", "stride"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.window is not None and args.window < 0:
        raise InputError(f"--window must be >= 0 (0 = whole image), got {args.window}")
    for flag, path in (("--out", args.out), ("--checkpoint", args.checkpoint)):
        if path:
            check_writable(path, flag)  # before any work, so nothing is computed for nothing
    if args.synthetic:
        if args.dataset or args.root:
            raise InputError("--synthetic evaluates generated scenes; leave out --dataset and --root")
        if given_bg:
            raise InputError("--bg-threshold applies to datasets with a background class only; synthetic scenes "
                             "have none")
        return
    if not args.dataset:
        raise InputError(f"--dataset is required (one of {', '.join(DATASETS)}), or pass --synthetic")
    if args.dataset not in DATASETS:
        raise InputError(f"unknown dataset {args.dataset!r}; valid names: {', '.join(DATASETS)}")
    if not args.root:
        raise InputError(f"--root is required: the {args.dataset} folder ({DATASETS[args.dataset].layout})")
    if given_bg and args.dataset not in BACKGROUND_DATASETS:
        raise InputError(f"--bg-threshold applies to datasets with a background class only "
                         f"({', '.join(BACKGROUND_DATASETS)}); {args.dataset} has none")


#: flags that only mean something when a CLIP model runs on images (synthetic scenes have features already)
_MODEL_ONLY = ("features", "aggregation", "crop", "pos_interp", "antialias", "snap", "short_side", "window", "stride")


def _resolved(args: argparse.Namespace, dataset: str | None) -> tuple[dict, dict, list[str]]:
    """(the protocol with the flags applied, Segmenter keywords, the flags that overrode the protocol)."""
    proto = resolve_protocol(args.protocol, dataset)
    defaults = {k: proto[k] for k in ("scale", "bg_threshold", "head", "aggregation", "crop", "pos_interp",
                                      "antialias", "refine")}
    if proto["features"] is not None:  # a protocol that fixes the dense features (lposs)
        defaults["features"] = proto["features"]
    defaults.update(proto["head_options"])  # and head options (lposs: LPOSS's propagation settings)
    kwargs = _cli.method_kwargs(args, defaults)
    overridden = sorted(k for k in defaults if kwargs[k] != defaults[k])
    for key in ("short_side", "window", "stride", "snap"):
        value = getattr(args, key)
        if value is not None:
            overridden.append(key)
            proto[key] = (value or None) if key in ("window", "stride") else value
    if args.window is not None and args.stride is None:
        proto["stride"] = None  # a window given without a stride: half the window (the API's default)
    proto.update({k: kwargs[k] for k in defaults if k not in proto["head_options"]})
    proto["head_options"] = {k: kwargs[k] for k in proto["head_options"]}
    proto["features"] = kwargs.get("features", "clip")
    return proto, kwargs, overridden


def _synthetic(args: argparse.Namespace, ctx: DistContext) -> tuple:
    from ovss_fast.eval.harness import SyntheticScenes, synthetic_predictor

    proto, kwargs, overridden = _resolved(args, None)
    not_applied = [k for k in _MODEL_ONLY if getattr(args, k, None) is not None]
    if not_applied:
        print(f"{PROG}: note: --synthetic scenes carry synthetic CLIP-like patch features, affinity and guide (no "
              "images for a CLIP model), so these flags do not apply: "
              f"{', '.join('--' + k.replace('_', '-') for k in not_applied)}; the head, mode and op/JBU flags do",
              file=sys.stderr)
    dataset = SyntheticScenes(args.limit or 16, seed=args.seed, difficulty=args.difficulty)
    preset = resolve_preset(args.preset, mode=args.mode, affinity=None, window=None,
                            options={k: v for k, v in kwargs.items() if k in HeadOptions.names()})
    options = preset.options
    predict = synthetic_predictor(preset.mode, args.backend, ctx.device, head=kwargs["head"], **options.as_dict())
    applied = {k: proto[k] for k in ("protocol", "head", "scale")}
    config = {"dataset": "synthetic", "scenes": len(dataset), "seed": args.seed, "difficulty": args.difficulty,
              "grid": list(dataset.grid), "image_size": list(dataset.image_size), "mode": preset.mode,
              "preset": {**preset.record(), "not_applied": "affinity and window (the scenes carry their own)"},
              "backend": args.backend, "device": str(ctx.device), "ignore_index": 255,
              "features": "synthetic", "head": kwargs["head"], "protocol": {**applied, "overridden": overridden},
              "not_applied": [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in not_applied]
              + [f"protocol {k}" for k in _MODEL_ONLY if k != "features"],
              "op_params": options.as_dict()}
    return dataset, predict, config, 0


def _prediction_to_annotation(seg: Any) -> str:
    """How the Segmenter's maps reach the annotation, in words for the results file."""
    refine = seg.options.refine
    if refine == "lposs+":
        o = seg.options
        first = ("patch-grid maps" if seg.aggregation == "grid" else
                 "window maps upsampled bilinearly to pixels and averaged,")
        return (f"{first} bilinear to the processed image, LPOSS+'s pixel-stage label propagation on it (radius "
                f"{o.lposs_radius}, tau {o.lposs_tau}, alpha {o.lposs_alpha}, {o.lposs_iters} conjugate-gradient "
                f"steps, tol {o.lposs_tol}), the max over a class's synonyms, bilinear to the annotation size "
                "(align_corners=False), then argmax")
    if seg.aggregation == "grid" and refine == "jbu":
        return ("joint bilateral upsampling of the patch-grid scores guided by the original image to the annotation "
                "size, then argmax")
    first = ("patch-grid maps" if seg.aggregation == "grid" else
             "window maps upsampled bilinearly to pixels and averaged,")
    text = f"{first} bilinear to the annotation size (align_corners=False)"
    if refine == "pamr":
        text += (f", then PAMR ({seg.options.pamr_iters} steps, dilations {list(seg.options.pamr_dilations)}) on the "
                 "processed image normalised with the model's mean / std, bilinear to the annotation size")
    return text + ", then argmax"


def _benchmark(args: argparse.Namespace, ctx: DistContext) -> tuple:
    from ovss_fast.eval.datasets import SegmentationDataset
    from ovss_fast.eval.harness import SegmenterPredictor, segmenter_config

    dataset = SegmentationDataset(args.dataset, args.root, args.split)
    spec = dataset.spec
    proto, kwargs, overridden = _resolved(args, spec.name)
    window = proto["window"]
    stride = None if window is None else proto["stride"]
    short = proto["short_side"]

    import torch

    torch.manual_seed(args.seed)  # with --pretrained none every rank must build the same random model
    seg = _cli.segmenter_from_args(args, device=ctx.device, window=window, stride=stride,
                                   fallback_window=proto["fallback_window"], **kwargs)
    seg.text_features(dataset.class_names)  # embed the class names before the clock starts
    flavour = "bilinear " + ("antialiased" if proto["antialias"] else "without antialias")
    config = {
        "dataset": spec.name, "title": spec.title, "root": os.path.abspath(args.root), "split": dataset.split,
        "images_in_split": len(dataset), "limit": args.limit, "short_side": short, "long_side": args.long_side,
        "resize": f"{flavour} to the protocol size" + (", rounded to whole patches" if proto["snap"] else ""),
        "prediction_to_annotation": _prediction_to_annotation(seg),
        "protocol": {**proto, "overridden": overridden},
        "ignore_index": 255, "seed": args.seed, "pretrained": _cli.pretrained_arg(args.pretrained),
        "affinity_weights": args.affinity_weights, "class_names": dataset.class_names, **segmenter_config(seg),
    }
    predict = SegmenterPredictor(seg, dataset.class_names, short, args.long_side, antialias=proto["antialias"],
                                 snap=proto["snap"])
    return dataset, predict, config, args.workers


def _run_state(args: argparse.Namespace, config: dict, num_classes: int, ctx: DistContext) -> RunState:
    """Checkpoints (OUT.ckpt by default), --resume and --skip-bad for run_loop; the fingerprint is
    everything that decides the numbers, so a checkpoint of other settings is refused."""
    path = args.checkpoint or (f"{args.out}.ckpt" if args.out else None)
    fingerprint = {**config, "limit": args.limit, "long_side": args.long_side}
    state = RunState(num_classes, path=path, every=args.checkpoint_every, fingerprint=fingerprint,
                     resume=args.resume, skip_bad=args.skip_bad, rank=ctx.rank, world_size=ctx.world_size)
    if args.resume and ctx.is_main and not args.quiet:
        print(f"resuming: {state.resumed} images done in {state.path}" if state.resumed or state.bad
              else f"--resume: no checkpoint at {state.path}; starting from the first image", file=sys.stderr)
    return state


def _report(args: argparse.Namespace, outcome: object, class_names: list, config: dict, ctx: DistContext,
            state: RunState, fell_back: list[dict]) -> int:
    """Rank 0: print the report, name the skipped items, write --out atomically; the exit code."""
    from ovss_fast.eval.harness import format_report, make_report

    report = make_report(outcome, class_names, config, ctx)
    report["window_fallback"] = {  # this run's images (not those of a resumed checkpoint)
        "window_px": config.get("fallback_window_px"), "count": len(fell_back),
        "images": sorted(fell_back, key=lambda f: str(f["name"]))}
    if not args.quiet:
        print(format_report(report))
    else:
        biou = f"  mBIoU {report['mBIoU']}" if "mBIoU" in report else ""
        print(f"mIoU {report['mIoU']}{biou}  ({report['images']} images)")
    for bad in report["skipped"]["items"]:
        print(f"skipped: {bad['error']}", file=sys.stderr)
    if args.out:
        try:
            write_json_atomic(args.out, report)
        except OSError as exc:
            return _fail(f"could not write --out {args.out!r} ({exc}); the checkpoint {state.path!r} "
                         "keeps the run: fix the path and rerun with --resume", code=1)
        print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        _validate(args)
    except Exception as exc:
        return _cli.fail_or_raise(PROG, exc)

    from ovss_fast.eval.distributed import setup
    from ovss_fast.eval.harness import run_loop

    try:
        ctx = setup(args.device)
    except Exception as exc:
        return _cli.fail_or_raise(PROG, exc)
    try:
        try:
            build = _synthetic if args.synthetic else _benchmark
            dataset, predict, config, workers = build(args, ctx)
            config["boundary_iou"] = bool(args.boundary_iou)  # in the fingerprint: a resume keeps the choice
        except Exception as exc:
            return _cli.fail_or_raise(PROG, exc)
        try:
            state = _run_state(args, config, dataset.num_classes, ctx)
        except Exception as exc:
            return _cli.fail_or_raise(PROG, exc)
        try:
            outcome = run_loop(dataset, predict, dataset.num_classes, ctx=ctx, limit=args.limit, workers=workers,
                               progress=not args.quiet, desc=config["dataset"], state=state,
                               boundary_iou=bool(args.boundary_iou))
        except Interrupted as exc:
            return _fail(f"interrupted by {exc}", code=130)
        except KeyboardInterrupt:
            return _fail("interrupted (a second signal stopped the image in progress)", code=130)
        except BadItem as exc:
            return _fail(f"{exc} (pass --skip-bad to skip such items)", code=1)
        except Exception as exc:  # a user error: one line, exit 1; anything else keeps its traceback
            if state.stop_signal is not None:  # e.g. the signal also reached the DataLoader workers
                return _fail(f"interrupted by {state.interrupted()}", code=130)
            return _cli.fail_or_raise(PROG, exc, code=1)
        fell_back = ctx.gather_objects(getattr(predict, "fell_back", []))  # every rank takes part
        code = _report(args, outcome, dataset.class_names, config, ctx, state, fell_back) if ctx.is_main else 0
        # every rank keeps its checkpoint until rank 0 has written the results
        import torch

        if int(ctx.all_reduce(torch.tensor([code], dtype=torch.int64), op="max")[0]) == 0:
            state.remove()
        return code
    finally:
        ctx.close()
