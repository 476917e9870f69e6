"""Command line: ``ovss-fast COMMAND`` (also ``python -m ovss_fast COMMAND``).

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``; the flags
they share and the one way they fail (``ovss-fast COMMAND: error: ...``, exit 2) are in :mod:`ovss_fast.apps.flags`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS = {
    "demo": ("ovss_fast.apps.demo", "run a synthetic scene through every mode (no weights, no network)"),
    "segment": ("ovss_fast.apps.segment", "segment images with open_clip and a list of class names"),
    "eval": ("ovss_fast.apps.evaluate", "mIoU on a benchmark (voc21, ade, ...) or --synthetic; torchrun for many GPUs"),
    "serve": ("ovss_fast.apps.web",
              "a local web page to try it: upload an image, type the classes, see the map (Gradio)"),
    "backends": ("ovss_fast.apps.cli", "list the backends and whether each can load"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backends`` command takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """``backends``: print each backend and why it cannot load, if it cannot."""
    import torch

    from ovss_fast.kernels.dispatch import available_backends

    gpu = torch.cuda.is_available()
    for name, state in available_backends().items():
        if state == "ok" and name in ("cuda", "triton") and not gpu:
            state = "ok (loads; runs on CUDA tensors, and no GPU is visible here)"
        print(f"{name:10s} {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovss-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ImportError as exc:  # a command whose optional dependencies are missing
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            modules[name] = exc
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    mod = modules[args.command]
    if isinstance(mod, ImportError):
        from ovss_fast.apps.flags import fail

        return fail(f"ovss-fast {args.command}", f"unavailable: {mod}")
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
