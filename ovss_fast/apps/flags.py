"""What the command-line front ends share: the model and method flags, their checks, and one way to fail.

``ovss-fast segment`` and ``ovss-fast eval`` take the same model flags (--model ...
--memory-budget) and method flags (--features --head ..., and one flag per head option of
:class:`ovss_fast.ops.options.HeadOptions`: --scale ... --radius, with that option's check); ``demo``
and ``backends`` share --backend / --device. Every flag is checked by the functions of
:mod:`ovss_fast.ops.validate` (the API's own messages, naming the flag), and every command
fails the same way: ``ovss-fast COMMAND: error: MESSAGE`` on stderr, exit status 2
(1 when the run itself failed) for a user error (:func:`user_error`); any other exception keeps its
traceback (:func:`fail_or_raise`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

import torch

from ovss_fast.errors import InputError, OVSSError
from ovss_fast.models.clip_features import FEATURES, POS_INTERP, check_features
from ovss_fast.ops import validate as check
from ovss_fast.ops.options import PRESETS, HeadOptions, flag

#: the optional extras' modules: an ImportError of one of these is a missing install, said in one line
OPTIONAL_MODULES = ("open_clip", "transformers", "diffusers", "timm", "gradio", "triton", "matplotlib", "tqdm",
                    "safetensors", "accelerate", "huggingface_hub", "cv2")
#: OSErrors about a path the user gave (a missing file, a folder where a file was expected, no permission)
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch.OutOfMemoryError / torch.cuda.OutOfMemoryError)."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(k, type))
    return bool(kinds) and isinstance(exc, kinds)


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for anything else (a bug, a RuntimeError from
    torch: those keep their traceback).

    User errors: the library's own (:class:`ovss_fast.errors.OVSSError`: bad input, a model that does not load),
    an OSError about a path (missing file, a folder, no permission), an ImportError of an optional extra, and
    CUDA out of memory (the message names --memory-budget and --window, then the original).
    """
    if isinstance(exc, OVSSError):
        return str(exc)
    if is_out_of_memory(exc):
        return ("out of GPU memory: lower --memory-budget (GiB for one chunk of windows) or pass a smaller --window "
                f"(and --stride), or use --device cpu; {_one_line(exc)}")
    if isinstance(exc, PATH_ERRORS) or (isinstance(exc, OSError) and getattr(exc, "filename", None) is not None):
        return str(exc)
    if isinstance(exc, ImportError):
        name = getattr(exc, "name", None) or ""
        if name.split(".")[0] in OPTIONAL_MODULES or "pip install" in str(exc):
            return str(exc)
    return None


def fail_or_raise(prog: str, exc: BaseException, code: int = 2) -> int:
    """``fail(prog, message, code)`` for a user error (:func:`user_error`); anything else is raised again with its
    traceback. Call it from an ``except`` block: ``except Exception as exc: return fail_or_raise(PROG, exc)``."""
    message = user_error(exc)
    if message is None:
        raise exc
    return fail(prog, message, code)


def fail(prog: str, message: object, code: int = 2) -> int:
    """Print ``PROG: error: MESSAGE`` on stderr and return the exit status (2: bad input, 1: the run failed)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def threshold_arg(value: str) -> float | str:
    """--bg-threshold: a number, or 'none' / 'off' to turn a protocol's threshold off."""
    if value.strip().lower() in ("none", "off"):
        return "none"
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {value!r}") from err


def add_backend_arguments(parser: argparse.ArgumentParser, device_default: str | None = None) -> None:
    dev = "default: cuda if available" if device_default is None else f"default: {device_default}"
    parser.add_argument("--device", default=device_default, help=f"cpu, cuda, cuda:1, ... ({dev})")
    parser.add_argument("--backend", default="auto", help="ops backend: auto, cuda, triton, cpu or reference")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model --pretrained --preset --affinity --affinity-weights --mode --memory-budget --device --backend."""
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip model name (default ViT-B-16; see open_clip.list_models()), "
                             "local-dir:/folder (open_clip_config.json + weights), hf:openai/clip-vit-base-patch16 "
                             "or hf:/folder (HuggingFace transformers CLIP, needs ovss_fast[hf]); 'ovss-fast-tiny' "
                             "is a tiny config for offline tests with --pretrained none")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip weights tag (default openai; downloaded by open_clip when online), a local "
                             "checkpoint file, or 'none' for RANDOM weights (tests only: the labels are meaningless); "
                             "ignored for hf: models")
    parser.add_argument("--preset", default="ours", choices=list(PRESETS),
                        help="ours (default) or paper: every value the paper states (mode mv, --affinity sd2, the "
                             "whole image, readout velocity, transition attention, tau 0.3, eps 0.1, iters 50, "
                             "sk-iters 15, NMS on); a flag given explicitly overrides the preset's value")
    parser.add_argument("--affinity", default=None, choices=["clip", "sd2", "dino"],
                        help="patch affinity: clip (CLIP's last-block attention; preset ours), sd2 (Stable Diffusion "
                             "2 self-attention, needs ovss_fast[sd]; preset paper), dino (DINO ViT features, needs "
                             "timm; with --head lposs, its default, DINO ViT-B/16 value features for the graph)")
    parser.add_argument("--affinity-weights", default=None,
                        help="local weights for --affinity sd2 (a diffusers folder; 'random:sd2' builds its published "
                             "architecture with RANDOM weights, for smoke tests) or dino (a checkpoint file for "
                             "timm's DINO ViT-S/16, ViT-B/16 with --head lposs; 'random:dino' RANDOM weights)")
    parser.add_argument("--mode", default=None, choices=list(check.MODES),
                        help="discrepancy: mv maximum velocity (default, both presets), op optimal path, kl no "
                             "affinity")
    parser.add_argument("--memory-budget", type=float, default=4.0,
                        help="GiB allowed for one chunk of windows going through together (default 4)")
    add_backend_arguments(parser)


def add_method_arguments(parser: argparse.ArgumentParser, *, protocol_note: str = "") -> None:
    """--features --head --bg-threshold --aggregation --crop --pos-interp --antialias and the op/JBU knobs."""
    g = parser.add_argument_group("method (defaults: the API's" + (protocol_note and f"; {protocol_note}") + ")")
    g.add_argument("--features", default=None, metavar="|".join(FEATURES),
                   help="dense CLIP features: clip (plain patch tokens, default), maskclip, maskclip-res (LPOSS's), "
                        "sclip, clearclip, naclip "
                        "(each method's published last block)")
    g.add_argument("--head", default=None, metavar="|".join(check.HEADS),
                   help="dslo (the discrepancy scores, default), logits (the peers' plain argmax of the logits) or "
                        "lposs (LPOSS's label propagation over all windows as one graph; --affinity dino, its default, "
                        "gives the graph's features)")
    g.add_argument("--bg-threshold", type=threshold_arg, default=None, metavar="P|none",
                   help="the peers' prob_thd: pixels whose best class probability is below P become class 0 (the "
                        "first class must be the background); 'none' turns it off (default off)")
    g.add_argument("--aggregation", default=None, metavar="|".join(check.AGGREGATIONS),
                   help="overlapping windows: grid (averaged on the patch grid, then JBU; default) or pixels (each "
                        "window upsampled bilinearly to its pixels and averaged, then bilinear; the peers')")
    g.add_argument("--crop", default=None, metavar="|".join(check.CROPS),
                   help="aggregation pixels, crops that are not whole patches: floor (default) or pad")
    g.add_argument("--pos-interp", default=None, metavar="|".join(POS_INTERP),
                   help="positional-embedding interpolation: size (default) or peers (scale_factor (g + 0.1) / g0)")
    g.add_argument("--antialias", default=None, action=argparse.BooleanOptionalAction,
                   help="antialias the resizes (default on)")
    for f in fields(HeadOptions):  # one flag per head option: --sk-iters for sk_iters, its help and choices
        choices = f.metadata["choices"]
        g.add_argument(flag(f.name), type=f.metadata["parse"], default=None, help=f.metadata["help"],
                       metavar="|".join(choices) if choices else None)


def check_method_arguments(args: argparse.Namespace) -> None:
    """The method flags through the API's checks, with the flag's name in the message."""
    if args.features is not None:
        check_features(args.features)
    for name, choices in (("head", check.HEADS), ("aggregation", check.AGGREGATIONS), ("crop", check.CROPS),
                          ("pos_interp", POS_INTERP)):
        value = getattr(args, name)
        if value is not None:
            check.choice(flag(name), value, choices)
    if isinstance(args.bg_threshold, float):
        check.threshold("--bg-threshold", args.bg_threshold)
    for f in fields(HeadOptions):
        if getattr(args, f.name) is not None:
            f.metadata["check"](flag(f.name), getattr(args, f.name))
    if args.memory_budget <= 0:
        raise InputError(f"--memory-budget must be positive, got {args.memory_budget}")


def method_kwargs(args: argparse.Namespace, defaults: dict | None = None) -> dict:
    """Segmenter keywords from the method flags: a flag given wins over ``defaults`` (a protocol's values),
    which win over the API's defaults. --bg-threshold none becomes None (off)."""
    out = dict(defaults or {})
    for name in ("features", "head", "aggregation", "crop", "pos_interp", "antialias"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.bg_threshold is not None:
        out["bg_threshold"] = None if args.bg_threshold == "none" else args.bg_threshold
    for key in HeadOptions.names():
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def pretrained_arg(value: str | None) -> str | None:
    return None if value is None or value.lower() == "none" else value


def segmenter_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    """A Segmenter from the model flags and the given keywords (method_kwargs, window, ...)."""
    from ovss_fast.pipeline.segmenter import Segmenter

    kwargs.setdefault("device", args.device)
    return Segmenter(model=args.model, pretrained=pretrained_arg(args.pretrained), affinity=args.affinity,
                     mode=args.mode, preset=args.preset, affinity_weights=args.affinity_weights,
                     memory_budget=args.memory_budget * 2**30, backend=args.backend, **kwargs)
