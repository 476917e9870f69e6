"""``ovss-fast serve``: a local web page (Gradio) to try the Segmenter on an image.

    pip install -e ".[web]"
    ovss-fast serve [--pretrained /path/to/weights.bin | openai] [--host 127.0.0.1] [--port 7860]

Upload an image (or pick the bundled synthetic example), type class names ("cat; kitten,
dog, grass": classes by ",", synonyms by ";", as ``ovss-fast segment`` takes them), choose
the model, weights, mode, affinity and window; the page shows the overlay with a legend of
the classes found and their share of the image, the time of each stage, and offers the
label PNG (pixel value = class index, as ``ovss-fast segment --out`` writes it) and the
class scores (.npy, [C, gh, gw] on the patch grid) for download.

The request runs the command's own path: the Segmenter is built by
:func:`ovss_fast.apps.flags.segmenter_from_args` from the start flags with the page's choices put
in, the image is read by :func:`~ovss_fast.pipeline.image_inputs.load_image`, and the labels are written
by :func:`~ovss_fast.apps.palette.save_labels`, so the labels equal ``ovss-fast segment``'s for
the same image and options (with random weights, for the same ``--seed``: the model is
built after ``torch.manual_seed(seed)``).

Without weights (``--pretrained none``, the default here) the model has random weights and
the page says so: its segmentations are meaningless. Bad input (not an image, no classes, a
huge image, an unknown model) is a message on the page; one request runs at a time (a lock
around the model; the page queues the others).
"""

from __future__ import annotations

import argparse
import atexit
import html
import inspect
import os
import shutil
import tempfile
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovss_fast.apps import flags as _cli
from ovss_fast.errors import InputError
from ovss_fast.models.affinity import BUILTIN
from ovss_fast.ops import validate as check
from ovss_fast.pipeline.presets import SETTINGS as PRESET_SETTINGS

PROG = "ovss-fast serve"
WHOLE_IMAGE = "whole image"
HALF_WINDOW = "half the window"
RANDOM_WEIGHTS = "none"
RANDOM_WARNING = ("**Warning: random weights** (no `--pretrained` given at start, or weights `none` chosen): "
                  "the segmentation is meaningless; start with `ovss-fast serve --pretrained PATH_OR_TAG` for real "
                  "weights.")


def segmenter_accepts(name: str) -> bool:
    """Whether ``Segmenter`` takes keyword ``name``: in its signature or a field of
    :class:`~ovss_fast.ops.options.HeadOptions` (which it takes as ``**options``)."""
    from ovss_fast.ops.options import HeadOptions
    from ovss_fast.pipeline.segmenter import Segmenter

    return name in inspect.signature(Segmenter).parameters or name in HeadOptions.names()


def random_weights(pretrained: Any) -> bool:
    return pretrained is None or str(pretrained).lower() == RANDOM_WEIGHTS


# --------------------------------------------------------------------------- the page's controls
@dataclass(frozen=True)
class Control:
    """One choice on the page. ``name`` is the start flag's attribute (``args.model``) or, when ``keyword``,
    a Segmenter keyword passed on its own; the start value (``args.<name>``, else ``default``) comes first."""

    name: str
    label: str
    choices: tuple[str, ...]
    info: str = ""
    keyword: bool = False
    custom: bool = False  # the dropdown also takes a typed value
    default: str | None = None


#: the page's controls, in order; a Segmenter option is one entry here
CONTROLS: tuple[Control, ...] = (
    Control("model", "model", ("ViT-B-16", "ovss-fast-tiny"), custom=True,
            info="an open_clip name (ovss-fast-tiny: a tiny config for smoke tests, random weights only)"),
    Control("pretrained", "weights", (RANDOM_WEIGHTS,),
            info="given at start (--pretrained), or none: RANDOM weights, meaningless labels"),
    Control("mode", "mode", check.MODES, info="mv maximum velocity, op optimal path, kl no affinity"),
    Control("transition", "transition", check.TRANSITIONS, keyword=True, info="the Markov chain of mv"),
    Control("head", "head", check.HEADS, keyword=True,
            info="dslo (discrepancy scores), logits (the peers' argmax), or lposs (LPOSS's label propagation over all "
                 "windows: choose affinity dino, its graph's DINO ViT-B/16 features)"),
    Control("refine", "refine", check.REFINERS, keyword=True,
            info="scores to the image: jbu (joint bilateral), bilinear, pamr (bilinear, then PAMR: NACLIP's; "
                 "--pamr-iters / --pamr-dilations at start) or lposs+ (LPOSS+'s pixel stage; --lposs-* at start)"),
    Control("affinity", "affinity", BUILTIN,
            info="clip: CLIP's attention; sd2 / dino need --affinity-weights (random:dino: random weights)"),
    Control("window", "window (pixels)", (WHOLE_IMAGE, "224", "336", "448"), keyword=True, custom=True,
            default=WHOLE_IMAGE, info="whole image, or sliding windows of this size (a multiple of the patch)"),
    Control("stride", "stride (pixels)", (HALF_WINDOW, "112", "168", "224"), keyword=True, custom=True,
            default=HALF_WINDOW, info="the step between windows"),
)


def control_choices(control: Control, args: argparse.Namespace) -> tuple[list[str], str]:
    """The control's choices with the start value first, and that value."""
    start = getattr(args, control.name, None)
    if start is None and control.name in ("mode", "affinity"):  # not given at start: the preset's
        start = PRESET_SETTINGS[getattr(args, "preset", "ours")][control.name]
    value = str(start) if start is not None else (control.default or control.choices[0])
    if control.name == "pretrained":  # the weights given at start, and random weights
        value = RANDOM_WEIGHTS if random_weights(start) else str(start)
    return list(dict.fromkeys([value, *control.choices])), value


def _pixels(name: str, value: Any, off: str) -> int | None:
    text = str(value).strip()
    if text in ("", off):
        return None
    try:
        return check.count(name, int(text), minimum=1)
    except ValueError as err:
        raise InputError(f"{name} must be {off!r} or a number of pixels, got {text!r}") from err


def request_options(args: argparse.Namespace, values: dict[str, Any]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The page's values -> (the start flags with them put in, the Segmenter keywords), checked:
    the model is an open_clip name (schemas and paths only through --model at start) and the weights
    those given at start or none."""
    ns = argparse.Namespace(**vars(args))
    kw: dict[str, Any] = {}
    for c in CONTROLS:
        value = values.get(c.name)
        choices, start = control_choices(c, args)
        value = start if value is None else str(value).strip()
        if c.name == "model" and value != start and (":" in value or "/" in value or os.sep in value):
            raise InputError(f"model {value!r}: the page takes open_clip model names; give folders, files and "
                             "hf:/local-dir: models with --model when starting the server")
        if not c.custom and value not in choices:
            raise InputError(f"{c.label} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if c.name == "window":
            kw["window"] = _pixels("window", value, WHOLE_IMAGE)
        elif c.name == "stride":
            kw["stride"] = _pixels("stride", value, HALF_WINDOW)
        elif c.keyword:
            kw[c.name] = value
        else:
            setattr(ns, c.name, value)
    if kw.get("window") is None:
        kw["stride"] = None
    return ns, kw


# --------------------------------------------------------------------------- one request
@dataclass
class Result:
    """What the page shows: an error message, or the overlay, legend, timings and files."""

    message: str = ""
    overlay: str | None = None
    labels: str | None = None
    scores: str | None = None
    legend: str = ""
    timings: str = ""
    label_map: np.ndarray | None = None


def legend_html(names: list[str], labels: np.ndarray) -> str:
    """The classes found, largest share first: colour, name, share of the image."""
    from ovss_fast.apps.palette import palette

    counts = np.bincount(labels.ravel(), minlength=len(names))
    total = max(1, int(labels.size))
    rows = []
    for c in np.argsort(-counts, kind="stable"):
        if counts[c] == 0:
            continue
        r, g, b = palette(len(names))[c]
        rows.append(f'<tr><td><span style="display:inline-block;width:1.2em;height:1.2em;'
                    f'background:rgb({r},{g},{b});border:1px solid #000"></span></td>'
                    f"<td>{html.escape(names[c])}</td><td>{100 * counts[c] / total:.1f}%</td></tr>")
    absent = [html.escape(names[c]) for c in range(len(names)) if counts[c] == 0]
    foot = f"<p>not found: {', '.join(absent)}</p>" if absent else ""
    return ('<table id="ovss-legend"><tr><th></th><th>class</th><th>share of the image</th></tr>'
            + "".join(rows) + "</table>" + foot)


def timings_markdown(stages: list[tuple[str, float]]) -> str:
    return "| stage | ms |\n| --- | ---: |\n" + "\n".join(f"| {n} | {1e3 * s:.1f} |" for n, s in stages)


class App:
    """The server's state: start flags, Segmenters by option set (the two last used), a lock around them."""

    def __init__(self, args: argparse.Namespace, keep: int = 2) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.keep = keep
        self.segmenters: OrderedDict[tuple, Any] = OrderedDict()
        self.workdir = tempfile.mkdtemp(prefix="ovss_fast_web_")
        self.requests = 0
        atexit.register(shutil.rmtree, self.workdir, True)

    def segmenter(self, ns: argparse.Namespace, kw: dict[str, Any]) -> tuple[Any, bool]:
        """The Segmenter ``ovss-fast segment`` would build for these flags (cached); whether it was built now."""
        key = (ns.model, ns.pretrained, ns.preset, ns.affinity, ns.mode, tuple(sorted(kw.items())))
        if key in self.segmenters:
            self.segmenters.move_to_end(key)
            return self.segmenters[key], False
        while len(self.segmenters) >= self.keep:
            self.segmenters.popitem(last=False)
        torch.manual_seed(self.args.seed)  # random weights: the same model as the command's after manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning is on the page
            seg = _cli.segmenter_from_args(ns, **{**_cli.method_kwargs(ns), **kw})
        self.segmenters[key] = seg
        return seg, True

    def _outdir(self) -> str:
        self.requests += 1
        old = sorted(os.listdir(self.workdir))
        for name in old[: max(0, len(old) - 16)]:  # the files of the last 16 requests stay downloadable
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)
        out = os.path.join(self.workdir, f"{self.requests:08d}")
        os.makedirs(out)
        return out

    def check_image(self, path: str) -> None:
        """Refuse an image over --max-pixels from its header, before decoding it."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    w, h = im.size
        except Image.DecompressionBombError as exc:
            raise InputError(f"the image is too large to decode: {exc}") from exc
        except Exception:
            return  # not an image: load_image says so
        if w * h > self.args.max_pixels:
            raise InputError(f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over this page's limit of "
                             f"{self.args.max_pixels / 1e6:.1f} (--max-pixels at start); resize it first")

    def run(self, upload: Any, classes: str, values: dict[str, Any], want_scores: bool = True,
            wait_s: float | None = None) -> Result:
        """One request; never raises: an error is the result's message."""
        path = getattr(upload, "name", upload)  # a Gradio file or a path
        wait = self.args.busy_timeout if wait_s is None else wait_s
        if not self.lock.acquire(timeout=wait):
            return Result(message=f"**Busy:** another request has been running for over {wait:g} s; try again "
                                  "when it has finished.")
        try:
            return self._run(path, classes, values, want_scores)
        except Exception as exc:
            text = _cli.user_error(exc)
            if text is None:  # a bug or a RuntimeError from torch: the page says so, the log has the traceback
                traceback.print_exc()
                return Result(message=f"**Internal error** (the server's log has the details): "
                                      f"{type(exc).__name__}: {html.escape(str(exc))}")
            if isinstance(path, str) and path:
                text = text.replace(repr(path), repr(os.path.basename(path))).replace(path, os.path.basename(path))
            return Result(message=f"**Error:** {html.escape(text)}")
        finally:
            self.lock.release()

    def _run(self, path: str | None, classes: str, values: dict[str, Any], want_scores: bool) -> Result:
        from PIL import Image

        from ovss_fast.apps.palette import overlay, save_labels
        from ovss_fast.models.clip_features import parse_class_names
        from ovss_fast.pipeline.image_inputs import load_image

        t_start = time.perf_counter()
        if not path:
            raise InputError("no image: upload one (png, jpg, ...) or pick the example")
        parsed = parse_class_names(classes or "")
        ns, kw = request_options(self.args, values)
        stages: list[tuple[str, float]] = []
        t0 = time.perf_counter()
        segmenter, built = self.segmenter(ns, kw)
        if built:
            stages.append(("build the model", time.perf_counter() - t0))
        self.check_image(path)
        t0 = time.perf_counter()
        image = load_image(path)
        stages.append(("read the image", time.perf_counter() - t0))
        t0 = time.perf_counter()
        pred = segmenter.predict(image, classes, sync_timings=segmenter.device.type == "cuda")  # the model runs once
        labels = pred.labels.cpu()
        scores = pred.scores.float().cpu().numpy() if want_scores else None
        total = time.perf_counter() - t0
        stages += [(name, seconds) for name, seconds in pred.timings.items() if name != "total"]
        stages.append(("other (resizing, moving results)", max(0.0, total - sum(
            seconds for name, seconds in pred.timings.items() if name != "total"))))

        t0 = time.perf_counter()
        out = self._outdir()
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        names = ["; ".join(c) for c in parsed]
        res = Result(labels=os.path.join(out, f"{stem}_labels.png"), overlay=os.path.join(out, f"{stem}_overlay.png"))
        save_labels(labels, res.labels, num_classes=len(parsed))
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        overlay(pil, labels, names, alpha=self.args.alpha).save(res.overlay, format="PNG")
        if scores is not None:
            res.scores = os.path.join(out, f"{stem}_scores.npy")
            np.save(res.scores, scores)
        res.label_map = labels.numpy()
        res.legend = legend_html(names, res.label_map)
        stages.append(("overlay and files", time.perf_counter() - t0))
        stages.append(("total", time.perf_counter() - t_start))
        res.timings = timings_markdown(stages)
        h, w = res.label_map.shape
        res.message = (f"Segmented {html.escape(os.path.basename(path))} ({w}x{h}) into {len(parsed)} classes with "
                       f"{html.escape(str(segmenter.model_name))}, mode {segmenter.mode}, affinity "
                       f"{segmenter.affinity_name}, preset {ns.preset}.")
        if random_weights(ns.pretrained):
            res.message = RANDOM_WARNING + "\n\n" + res.message
        return res


# --------------------------------------------------------------------------- the page
def synthetic_example(folder: str) -> tuple[str, str]:
    """The bundled example: a synthetic scene's image (regions of colour, :mod:`ovss_fast.synthetic`) as a PNG,
    and class names for it."""
    from PIL import Image

    from ovss_fast.synthetic import make_scene

    scene = make_scene(0, image_size=(240, 320), grid=(15, 20))
    path = os.path.join(folder, "synthetic_scene.png")
    Image.fromarray((scene.guide[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path, "sky, grass; lawn, road, building, water, tree"


def build_page(app: App) -> Any:
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    args = app.args
    example, example_classes = synthetic_example(app.workdir)
    with gr.Blocks(title="ovss-fast", analytics_enabled=False) as page:
        gr.Markdown("# ovss-fast: open-vocabulary segmentation (DSLO)\nUpload an image, type the classes "
                    "(separated by `,`, synonyms of a class by `;`), and run.")
        if random_weights(args.pretrained):
            gr.Markdown(RANDOM_WARNING, elem_id="start-warning")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", file_count="single", type="filepath", elem_id="upload")
                classes = gr.Textbox(label="classes", placeholder="cat; kitten, dog, grass", elem_id="classes")
                inputs = []
                for c in CONTROLS:
                    choices, value = control_choices(c, args)
                    inputs.append(gr.Dropdown(choices=choices, value=value, label=c.label, info=c.info,
                                              allow_custom_value=c.custom, elem_id=f"control-{c.name}"))
                want_scores = gr.Checkbox(value=True, label="scores for download (.npy)", elem_id="want-scores")
                button = gr.Button("Segment", variant="primary", elem_id="run")
                gr.Examples([[example, example_classes]], inputs=[upload, classes], label="example (synthetic scene)")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                shown = gr.Image(label="overlay", type="filepath", format="png", interactive=False, height=360,
                                 elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                timings = gr.Markdown(elem_id="timings")
                labels_file = gr.File(label="labels (PNG, pixel value = class index)", interactive=False,
                                      elem_id="labels-file")
                scores_file = gr.File(label="scores (.npy, [C, gh, gw] float32 on the patch grid)", interactive=False,
                                      elem_id="scores-file")

        def handler(file: Any, text: str, *rest: Any) -> tuple:
            *values, scores_on = rest
            r = app.run(file, text, dict(zip([c.name for c in CONTROLS], values, strict=True)), bool(scores_on))
            return r.message, r.overlay, r.legend, r.timings, r.labels, r.scores

        button.click(handler, inputs=[upload, classes, *inputs, want_scores],
                     outputs=[message, shown, legend, timings, labels_file, scores_file],
                     concurrency_limit=1, api_name="segment")
    return page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  ovss-fast serve                                   (random weights: try the page)\n"
                     "  ovss-fast serve --pretrained /path/to/open_clip_pytorch_model.bin --model ViT-B-16-quickgelu\n"
                     "  ovss-fast serve --host 0.0.0.0 --port 8080         (reachable from other machines)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch.manual_seed before building a model (random weights are then reproducible)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay label opacity in [0, 1] (default 0.5)")
    parser.add_argument("--max-pixels", type=float, default=50e6,
                        help="largest image accepted, in pixels (default 50e6)")
    parser.add_argument("--max-file-size", default="50mb", help="largest upload (default 50mb)")
    parser.add_argument("--busy-timeout", type=float, default=600.0,
                        help="seconds a request waits for the one before it (default 600), then says busy")
    _cli.add_model_arguments(parser)
    parser.set_defaults(pretrained=RANDOM_WEIGHTS)
    for action in parser._actions:  # the page's default differs from segment's: random weights, with a warning
        if action.dest == "pretrained":
            action.help = ("weights offered on the page: an open_clip tag (downloaded when online) or a local "
                           "checkpoint file; default none: RANDOM weights, the page warns that its labels are "
                           "meaningless")
    _cli.add_method_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        _cli.check_method_arguments(args)
        if not 0.0 <= args.alpha <= 1.0:
            raise InputError(f"--alpha must lie in [0, 1], got {args.alpha}")
        if not 0 <= args.port <= 65535:
            raise InputError(f"--port must lie in 0..65535, got {args.port}")
        check.positive("--max-pixels", args.max_pixels)
        check.positive("--busy-timeout", args.busy_timeout)
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
        import gradio as gr
    except ImportError as exc:
        return _cli.fail(PROG, f"{exc}; the page needs Gradio: pip install -e \".[web]\" (or pip install gradio)")
    except Exception as exc:
        return _cli.fail_or_raise(PROG, exc)
    app = App(args)
    page = build_page(app)
    page.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])  # no web fonts: works offline
    try:
        page.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size, ssr_mode=False,
                    theme=theme, footer_links=[], allowed_paths=[app.workdir], quiet=True, prevent_thread_lock=True)
    except OSError as exc:  # the port is taken, the address is not this machine's
        return _cli.fail(PROG, f"cannot listen on {args.host}:{args.port}: {exc}")
    print(f"{PROG}: open http://{args.host}:{args.port} in a browser (Ctrl+C stops the server)", flush=True)
    page.block_thread()
    return 0
