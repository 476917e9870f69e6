"""End-to-end pipeline benchmark: images per second and time per stage at each benchmark's protocol size.

``python -m bench.bench_pipeline [--smoke] [--device cpu|cuda] [--images N] [--out DIR]``

Per protocol (voc21, context60, coco_stuff, ade, cityscapes: the eval protocol's short side,
224 px windows every 112 px, the dataset's class list with its synonyms) an image of the
dataset's typical size goes through the eval protocol (resize to the short side, patch-grid
scores over sliding windows, joint bilateral upsampling to the original size, argmax), with
open_clip ViT-B-16 RANDOM weights (speed does not depend on the weights), affinity "clip",
modes mv and op, one prompt template (text encoding is outside the clock). Side by side in
one process:

- ``per-window reference``: ``Segmenter(batch_windows=False, backend="reference")``, one
  tower forward and one head call per window (the path before windows were batched);
- ``batched auto``: ``Segmenter()`` defaults, all windows of the image in chunks sized by
  ``memory_budget``, ``backend="auto"``;
- ``whole image auto`` (the ``dslo`` protocol, method.md section 7; the two above are
  ``dslo-windows``): the whole image at the protocol's short side as one window, the dataset's
  windows only for an image over ``memory_budget`` (``fallback_window``), checked against
  ``backend="reference"`` on the same image (``--no-whole-image`` leaves it out).

Correctness first: on one image the two paths' patch-grid scores must agree within the
tolerance (float32 tower 1e-3, float16 tower 1e-2, relative to the largest score) and
their labels must be equal except where the per-window path's top two upsampled scores
are within twice that tolerance (two scores each off by up to tol can swap only there).
The float32 end-to-end tolerance is 10x method.md's per-op 1e-4: each op meets 1e-4
against float64 on the same inputs (tests/), but the paths' Q differ by float32 rounding
(~2e-6 relative, cpu vs reference class_distributions) and the mv head with the attention
transition amplifies that ~100x (measured at voc21: 1.1e-4 - 2.1e-4
per window; with the Gibbs transition 1.9e-5). Then each path segments ``--images`` images
(after the check's image, which is the warm-up), timing every stage from ``Prediction.timings``
(``Segmenter.predict(..., sync_timings=True)`` on CUDA: synchronised at stage boundaries): visual
tower, affinity (for "clip" it comes out of the tower's forward, so ~0), class_distributions,
discrepancy, JBU + argmax, and everything else (resize, crop gathering, accumulation, synonym
max). On CUDA, images per second come from runs without synchronised timings and the breakdown
from one run with them.

The eval loop: ``ovss_fast.eval.harness.run_loop`` with the batched path (mv) on JPEG files
of the same size written to a temporary folder, ``--workers`` DataLoader processes, reports
images per second of the loop and the share of its time spent waiting on the DataLoader
(JPEG and PNG decoding).

Appends rows to bench/results.csv, writes the "Pipeline (DEVICE)" section of
bench/RESULTS.md and the stacked bars bench/plots/pipeline_breakdown.png (pipeline_breakdown_cuda.png
on a GPU; matplotlib needed). ``--smoke`` (seconds): the tiny random model, two scaled-down
protocols, one image, into ``--out``. ``python -m bench.gpu_check`` runs this on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import _ext_bench as eb  # noqa: E402
from bench._results_io import (  # noqa: E402
    BENCH_DIR,
    append_rows,
    device_name,
    markdown_table,
    now,
    versions,
    write_section,
)

STAGES = ("visual", "affinity", "class_distributions", "discrepancy", "jbu", "other")
STAGE_LABELS = {"visual": "visual tower", "affinity": "affinity", "class_distributions": "class_distributions",
                "discrepancy": "discrepancy", "jbu": "JBU + argmax", "other": "other"}
PATHS = ("per-window reference", "batched auto")
#: the dslo protocol (method.md section 7): the whole image at the dataset's short side, one window
WHOLE = "whole image auto"


@dataclass(frozen=True)
class Protocol:
    name: str  # the dataset whose class list is used
    image: tuple[int, int]  # a typical original image (H, W) of the dataset
    short_side: int
    window: int
    stride: int
    whole_short: int  # the dslo protocol's short side (whole image)


def protocols(smoke: bool) -> list[Protocol]:
    from ovss_fast.eval.datasets import DATASETS

    typical = {"voc21": (375, 500), "context60": (375, 500), "coco_stuff": (480, 640), "ade": (512, 683),
               "cityscapes": (1024, 2048)}
    if smoke:  # scaled down by 4: seconds on the tiny model
        return [Protocol("voc21", (94, 125), 84, 64, 32, 84), Protocol("cityscapes", (256, 512), 140, 64, 32, 140)]
    from ovss_fast.eval.protocols import resolve_protocol

    return [Protocol(n, hw, DATASETS[n].short_side, DATASETS[n].window, DATASETS[n].stride,
                     resolve_protocol("dslo", n)["short_side"]) for n, hw in typical.items()]


# --------------------------------------------------------------------------- timing
class StageTimer:
    """Seconds per stage summed over Predictions (``Prediction.timings``); ``sync``: asked with
    ``sync_timings=True`` (CUDA synchronised at stage boundaries)."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.fell_back = False

    def add(self, pred) -> None:
        """A Prediction's seconds per stage ("total" and "text" left out: text encoding is outside the clock)
        and whether it fell back to the fallback window."""
        for name, seconds in pred.timings.items():
            if name in STAGES:
                self.totals[name] += seconds
        self.fell_back |= bool(pred.fallbacks)


def synthetic_image(hw: tuple[int, int], seed: int) -> torch.Tensor:
    """uint8 [3, H, W]: smooth colour regions with a little noise (JBU guides need structure)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, hw[0] // 48), max(2, hw[1] // 48), generator=g)
    x = F.interpolate(low, size=hw, mode="bilinear", align_corners=False)[0]
    x = (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def protocol_input(seg, img_u8: torch.Tensor, short: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As SegmenterPredictor: (the original image [1, 3, H, W] in [0, 1], resized to the protocol size)."""
    from ovss_fast.eval.harness import protocol_size

    img = img_u8.to(seg.device).float().div_(255.0)[None]
    h, w = protocol_size(img.shape[2], img.shape[3], short)
    ph, pw = seg.patch
    size = (max(1, round(h / ph)) * ph, max(1, round(w / pw)) * pw)
    x = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return img, x


def predict(seg, names: list[str], short: int, img_u8: torch.Tensor, timer: StageTimer | None) -> torch.Tensor:
    """SegmenterPredictor's steps: labels [H, W] at the original size (JBU guided by the original image); the
    stages' seconds (``Prediction.timings``, JBU + argmax included) are added to ``timer``."""
    img, x = protocol_input(seg, img_u8, short)
    pred = seg.predict(x[0], names, guide=img[0], sync_timings=timer is not None and timer.sync)
    if timer is not None:
        timer.add(pred)
    return pred.labels


def check_paths(base, fast, names: list[str], short: int, img_u8: torch.Tensor, tol: float) -> tuple[bool, str]:
    """Two Segmenters on one image: grid scores within tol, labels equal except near-ties of ``base``'s."""
    from ovss_fast.ops.api import jbu_upsample

    img, x = protocol_input(base, img_u8, short)
    with torch.inference_mode():
        s_base = base.scores(x[0], names, upsample=False)
        s_fast = fast.scores(x[0], names, upsample=False)
        fin = torch.isfinite(s_base)
        same_inf = torch.equal(fin, torch.isfinite(s_fast))
        scale = s_base[fin].abs().max().clamp_min(1e-30)
        err = float(((s_fast - s_base)[fin].abs().max() / scale).double()) if same_inf else float("inf")
        up = jbu_upsample(s_base[None], img, backend="reference", **base.jbu_params)[0]
        ref = up.argmax(0)
        labels = predict(fast, names, short, img_u8, None)
        differ = labels != ref
        top2 = up.topk(2, dim=0).values
        # scores each within tol * max of base's can swap two classes only where their gap is <= 2 tol * max
        # (the JBU averages with positive weights: it does not enlarge the error)
        tie = (top2[0] - top2[1]) <= 2 * tol * up.abs().amax()
        off_tie = int((differ & ~tie).sum())
    ok = err <= tol and off_tie == 0
    return ok, (f"scores rel. err {err:.1e}, {int(differ.sum())}/{labels.numel()} labels differ "
                f"({off_tie} away from near-ties)")


def time_path(seg, names: list[str], short: int, images: list[torch.Tensor], cuda: bool) -> dict:
    """Per-image ms and the stage breakdown over images[1:] (images[0] went through check_paths: the warm-up)."""
    timer = StageTimer(sync=cuda)
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for im in images[1:]:
                predict(seg, names, short, im, None)
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / (len(images) - 1)
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            t0 = time.perf_counter()
            predict(seg, names, short, images[1], timer)
            torch.cuda.synchronize()
            timed_total = time.perf_counter() - t0
            stages = {k: v / timed_total * total for k, v in timer.totals.items()}  # the breakdown, scaled
        else:
            t0 = time.perf_counter()
            for im in images[1:]:
                predict(seg, names, short, im, timer)
            total = (time.perf_counter() - t0) / (len(images) - 1)
            stages = {k: v / (len(images) - 1) for k, v in timer.totals.items()}
            peak = None
    out = {k: stages.get(k, 0.0) for k in STAGES if k != "other"}
    out["other"] = max(0.0, total - sum(out.values()))
    return {"total": total, "stages": out, "peak_mb": peak, "fell_back": timer.fell_back}


# --------------------------------------------------------------------------- the eval loop on JPEG files
class JpegFolder(torch.utils.data.Dataset):
    """JPEG images and PNG annotations in a folder, read as SegmentationDataset does."""

    def __init__(self, folder: Path, count: int, num_classes: int) -> None:
        from ovss_fast.eval.datasets import identity_lut

        self.folder, self.count, self.num_classes = folder, count, num_classes
        self.lut = identity_lut(num_classes)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        from ovss_fast.eval.datasets import read_image, read_label

        return {"image": read_image(str(self.folder / f"{i}.jpg")),
                "label": read_label(str(self.folder / f"{i}.png"), self.lut, "bench"), "name": str(i)}


def loader_share(seg, names: list[str], proto: Protocol, count: int, workers: int, num_classes: int) -> dict:
    from PIL import Image

    from ovss_fast.eval.harness import SegmenterPredictor, run_loop

    with tempfile.TemporaryDirectory(prefix="ovss_fast_bench_") as tmp:
        folder = Path(tmp)
        for i in range(count):
            arr = synthetic_image(proto.image, 1000 + i).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
            Image.fromarray((np.arange(arr.shape[0] * arr.shape[1]) % num_classes).reshape(arr.shape[:2])
                            .astype(np.uint8)).save(folder / f"{i}.png")
        data = JpegFolder(folder, count, num_classes)
        pred = SegmenterPredictor(seg, names, proto.short_side)
        with torch.inference_mode():
            pred(data[0])  # warm-up outside the loop
        out = run_loop(data, pred, num_classes, workers=workers)
    return {"images_per_s": out.images / out.seconds, "wait_share": out.wait_seconds / out.seconds,
            "seconds": out.seconds, "images": out.images}


# --------------------------------------------------------------------------- the run
def build_model(smoke: bool, device: torch.device, dtype: torch.dtype):
    import open_clip

    from ovss_fast.models.clip_features import TINY_MODEL, register_tiny_config

    name = TINY_MODEL if smoke else "ViT-B-16"
    if smoke:
        register_tiny_config()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=None)
    return name, model.to(device=device, dtype=dtype).eval(), open_clip.get_tokenizer(name)


def whole_image_row(model, tok, common: dict, proto: Protocol, names: list[str], imgs: list[torch.Tensor], cuda: bool,
                    tol: float, cache, base_total: float, synonyms: int) -> dict:
    """The dslo protocol's row: the whole image at its short side as one window (the dataset's windows only
    when it is over memory_budget), checked against backend "reference" on the same image, then timed."""
    from ovss_fast.pipeline.segmenter import Segmenter

    kw = {**common, "window": None, "stride": None, "fallback_window": proto.window}
    seg, ref = Segmenter.from_model(model, tok, **kw), Segmenter.from_model(model, tok, backend="reference", **kw)
    seg.vocabulary.cache = ref.vocabulary.cache = cache
    _, x = protocol_input(seg, imgs[0], proto.whole_short)
    gh, gw = seg.grid_for(*x.shape[-2:])
    ok, detail = check_paths(ref, seg, names, proto.whole_short, imgs[0], tol)
    r = time_path(seg, names, proto.whole_short, imgs, cuda)
    fell = " (over memory_budget: fell back to windows)" if r["fell_back"] else ""
    shape = (f"{proto.name} (dslo): {proto.image[0]}x{proto.image[1]} -> {x.shape[-2]}x{x.shape[-1]}, whole image "
             f"N={gh * gw}{fell}, S={synonyms}")
    print(f"  {shape} {common['mode']}: {'ok' if ok else 'FAIL'} ({detail}, vs backend reference)", flush=True)
    print(f"    {WHOLE:<22} {1 / r['total']:8.3f} images/s  " + "  ".join(
        f"{k} {1e3 * v:.0f}" for k, v in r["stages"].items()) + " ms", flush=True)
    head = r["stages"]["class_distributions"] + r["stages"]["discrepancy"] + r["stages"]["jbu"]
    return {"protocol": proto.name, "shape": shape, "mode": common["mode"], "path": WHOLE, "ok": ok,
            "check": detail + " vs backend reference", "total_s": r["total"], "stages": r["stages"],
            "head_share": head / r["total"], "peak_mb": r["peak_mb"],
            "estimate_mb": seg.memory_estimate(*x.shape[-2:], synonyms=synonyms) / 2**20, "chunk": 1, "windows": 1,
            "speedup": base_total / r["total"]}


def run(device: str = "cpu", *, smoke: bool = False, images: int | None = None, workers: int = 2,
        loader_images: int | None = None, modes: tuple[str, ...] = ("mv", "op"), only: list[str] | None = None,
        out_dir: Path | None = None, write: bool = True, whole_image: bool = True) -> tuple[bool, list[dict]]:
    """Run the benchmark; returns (all correctness checks passed, result rows). Writes into out_dir (bench/)."""
    from ovss_fast.eval.datasets import dataset_spec, load_class_names
    from ovss_fast.models.clip_features import parse_class_names
    from ovss_fast.pipeline.segmenter import Segmenter

    t_start = time.perf_counter()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    tol = 1e-3 if dtype == torch.float32 else 1e-2  # end to end: see the module docstring
    n_images = images or (1 if smoke else (5 if cuda else 2))
    n_loader = loader_images if loader_images is not None else (2 if smoke else (8 if cuda else 3))
    model_name, model, tok = build_model(smoke, dev, dtype)
    card, vers = device_name(device), f"{versions()}, ovss_fast {eb.commit()}"
    print(f"pipeline benchmark on {card}; {vers}; model {model_name} (random weights), {dtype}", flush=True)
    rows: list[dict] = []
    loader_rows: list[list[str]] = []
    all_ok = True
    for proto in protocols(smoke):
        if only and proto.name not in only:
            continue
        names = load_class_names(proto.name)
        synonyms = sum(len(c) for c in parse_class_names(names))
        imgs = [synthetic_image(proto.image, seed) for seed in range(n_images + 1)]
        cache = None
        for mode in modes:
            common = {"affinity": "clip", "mode": mode, "device": dev, "window": proto.window,
                      "stride": proto.stride, "templates": ("a photo of a {}.",)}
            segs = {PATHS[0]: Segmenter.from_model(model, tok, batch_windows=False, backend="reference", **common),
                    PATHS[1]: Segmenter.from_model(model, tok, **common)}
            if cache is None:
                segs[PATHS[0]].text_features(names)  # embed once, outside the clock
                cache = segs[PATHS[0]].vocabulary.cache
            for s in segs.values():
                s.vocabulary.cache = cache
            _, x = protocol_input(segs[PATHS[1]], imgs[0], proto.short_side)
            gh, gw = segs[PATHS[1]].grid_for(*x.shape[-2:])
            layout = segs[PATHS[1]].window_layout((gh, gw))
            wh, ww = layout.cells
            chunk = segs[PATHS[1]].windows.per_chunk(*x.shape[-2:], synonyms)
            estimate = {p: s.memory_estimate(*x.shape[-2:], batch=min(chunk, layout.num_windows) if
                                             p == PATHS[1] else 1, synonyms=synonyms) / 2**20
                        for p, s in segs.items()}
            shape = (f"{proto.name}: {proto.image[0]}x{proto.image[1]} -> {x.shape[-2]}x{x.shape[-1]}, "
                     f"{layout.num_windows} windows of N={wh * ww}, S={synonyms}")
            ok, detail = check_paths(segs[PATHS[0]], segs[PATHS[1]], names, proto.short_side, imgs[0], tol)
            all_ok &= ok
            print(f"  {shape} {mode}: {'ok' if ok else 'FAIL'} ({detail})", flush=True)
            res = {p: time_path(segs[p], names, proto.short_side, imgs, cuda) for p in PATHS}
            for p in PATHS:
                r = res[p]
                head = r["stages"]["class_distributions"] + r["stages"]["discrepancy"] + r["stages"]["jbu"]
                rows.append({"protocol": proto.name, "shape": shape, "mode": mode, "path": p, "ok": ok,
                             "check": detail, "total_s": r["total"], "stages": r["stages"],
                             "head_share": head / r["total"], "peak_mb": r["peak_mb"], "estimate_mb": estimate[p],
                             "chunk": chunk if p == PATHS[1] else 1, "windows": layout.num_windows,
                             "speedup": res[PATHS[0]]["total"] / r["total"]})
                print(f"    {p:<22} {1 / r['total']:8.3f} images/s  " + "  ".join(
                    f"{k} {1e3 * v:.0f}" for k, v in r["stages"].items()) + " ms", flush=True)
            if whole_image:
                rows.append(whole_image_row(model, tok, common, proto, names, imgs, cuda, tol, cache,
                                            res[PATHS[0]]["total"], synonyms))
                all_ok &= rows[-1]["ok"]
        if n_loader > 0 and "mv" in modes and importlib.util.find_spec("PIL") is None:
            loader_rows.append([proto.name, "-", "-", str(workers), "-", "not run: Pillow not installed"])
        elif n_loader > 0 and "mv" in modes:
            seg = Segmenter.from_model(model, tok, affinity="clip", mode="mv", device=dev, window=proto.window,
                                       stride=proto.stride, templates=("a photo of a {}.",))
            seg.vocabulary.cache = cache
            lo = loader_share(seg, names, proto, n_loader, workers, dataset_spec(proto.name).num_classes)
            loader_rows.append([proto.name, f"{proto.image[0]}x{proto.image[1]}", str(lo["images"]), str(workers),
                                f"{lo['images_per_s']:.3f}", f"{100 * lo['wait_share']:.1f}%"])
            print(f"    eval loop (batched mv, {workers} workers): {lo['images_per_s']:.3f} images/s, "
                  f"{100 * lo['wait_share']:.1f}% waiting on the DataLoader", flush=True)
    elapsed = time.perf_counter() - t_start
    if write:
        write_results(rows, loader_rows, out_dir or BENCH_DIR, card=card, vers=vers, device=device,
                      model_name=model_name, dtype=dtype, smoke=smoke, n_images=n_images, workers=workers,
                      elapsed=elapsed, all_ok=all_ok)
    print(f"{'all checks passed' if all_ok else 'CHECK FAILURES'}; {elapsed:.0f} s", flush=True)
    return all_ok, rows


def _ms(v: float) -> str:
    return f"{1e3 * v:.0f}" if v >= 0.01 else f"{1e3 * v:.1f}"


def write_results(rows: list[dict], loader_rows: list[list[str]], out_dir: Path, *, card: str, vers: str,
                  device: str, model_name: str, dtype: torch.dtype, smoke: bool, n_images: int, workers: int,
                  elapsed: float, all_ok: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    table = []
    for r in rows:
        st = r["stages"]
        calls = -(-r["windows"] // r["chunk"])  # tower / head calls per image
        table.append([r["shape"], r["mode"], r["path"] + f" ({calls} call{'s' if calls > 1 else ''})",
                      f"{1 / r['total_s']:.3f}", _ms(r["total_s"]), *(_ms(st[k]) for k in STAGES),
                      f"{100 * r['head_share']:.1f}%", f"{r['speedup']:.2f}x",
                      f"{r['estimate_mb']:.0f}", "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}",
                      ("ok: " if r["ok"] else "FAIL: ") + r["check"] if r["path"] != PATHS[0] else ""])
    header = ["protocol", "mode", "path", "images/s", "ms/image", *(f"{STAGE_LABELS[k]} ms" for k in STAGES),
              "head + JBU share", "speed-up", "estimate MiB", "peak MiB", "check"]
    plots = plot(rows, out_dir / "plots", kind)
    cmd = "python -m bench.bench_pipeline" + (" --smoke" if smoke else "") + (" --device cuda" if kind == "cuda"
                                                                              else "")
    body = [f"`{cmd}` on **{card}**; {vers}; {now()}; {elapsed:.0f} s; load average at the end "
            f"{eb.load_average()}. Result: **{'checks passed' if all_ok else 'CHECK FAILURES'}**.", "",
            f"open_clip {model_name} with RANDOM weights, visual tower in {str(dtype).replace('torch.', '')}, "
            "affinity clip, one prompt template; each protocol's typical image resized to its short side, "
            "224 px windows every 112 px, the dataset's class list with synonyms (S columns), JBU to the original "
            f"size. Time per image: mean of {n_images} image(s) after the check's image (the warm-up)"
            + (" (stage breakdown from one more run with CUDA synchronised at stage boundaries, scaled to the "
               "mean)" if kind == "cuda" else "") + ". `per-window reference` = batch_windows=False, "
            "backend=\"reference\" (one tower forward and one head call per window); `batched auto` = the "
            "defaults (all windows of the image in chunks fitting memory_budget, backend=\"auto\"), checked "
            "against the per-window path; `whole image auto` = the `dslo` protocol (method.md section 7: the "
            "whole image at the dataset's short side as one window, the dataset's windows only over "
            "memory_budget), checked against backend=\"reference\" on the same image; the two rows above it are "
            "the windowed protocol (`dslo-windows`). "
            "head + JBU share = (class_distributions + discrepancy + JBU) / total. speed-up = the per-window "
            "path's time / this row's. Estimate = Segmenter.memory_estimate of one chunk (the per-window path: "
            "one window); peak = torch.cuda.max_memory_allocated above the baseline (GPU only; it includes the "
            "JBU).", "",
            markdown_table(header, table)]
    if loader_rows:
        body += ["", f"The eval loop (`run_loop` + `SegmenterPredictor`, batched path, mv) on JPEG images and PNG "
                 f"annotations of the same size in a temporary folder, {workers} DataLoader worker(s): the share of "
                 "the loop's time spent waiting for the next image (decoding; the first wait includes starting the "
                 "workers); a large share says --workers is the limit.", "",
                 markdown_table(["protocol", "image", "images", "workers", "images/s", "waiting on the DataLoader"],
                                loader_rows)]
    body += ["", "Plot: " + ", ".join(f"[{p}](plots/{p})" if p.endswith(".png") else p for p in plots) + "."]
    write_section(f"Pipeline ({kind})", "\n".join(body), out_dir / "RESULTS.md")
    csv_rows = [{"date": now(), "bench": "pipeline", "device": card, "versions": vers, "op": f"pipeline {r['mode']}",
                 "shape": r["shape"], "dtype": str(dtype).replace("torch.", ""), "backend": r["path"],
                 "median_ms": f"{1e3 * r['total_s']:.1f}",
                 "peak_mem_mb": "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}",
                 "note": "; ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r["stages"].items())
                 + f"; mean of {n_images} image(s)" + (f"; {r['check']}" if r["path"] != PATHS[0] else "")
                 + f"; load {eb.load_average()}"} for r in rows]
    append_rows(csv_rows, out_dir / "results.csv")


def plot(rows: list[dict], out_dir: Path, kind: str) -> list[str]:
    """Stacked bars of ms per image by stage, one panel per protocol."""
    try:
        import matplotlib
    except ImportError:
        return ["plot not written: matplotlib not installed: pip install matplotlib"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = list(dict.fromkeys(r["protocol"] for r in rows))
    if not protos:
        return ["plot not written: no rows"]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(protos), figsize=(3.2 * len(protos), 3.8), squeeze=False)
    colors = {"visual": "#4c72b0", "affinity": "#8172b2", "class_distributions": "#55a868",
              "discrepancy": "#c44e52", "jbu": "#dd8452", "other": "#b0b0b0"}
    for ax, proto in zip(axes[0], protos, strict=True):
        mine = [r for r in rows if r["protocol"] == proto]
        short = {PATHS[0]: "per-window", PATHS[1]: "batched", WHOLE: "whole"}
        labels = [f"{r['mode']}\n{short[r['path']]}" for r in mine]
        bottom = np.zeros(len(mine))
        for k in STAGES:
            vals = np.array([1e3 * r["stages"][k] for r in mine])
            ax.bar(range(len(mine)), vals, bottom=bottom, color=colors[k], label=STAGE_LABELS[k])
            bottom += vals
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_title(proto, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("ms per image")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Pipeline time per image by stage ({kind})", fontsize=10)
    fig.tight_layout()
    name = "pipeline_breakdown.png" if kind == "cpu" else "pipeline_breakdown_cuda.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ovss_fast pipeline benchmark: images/s and time per stage")
    p.add_argument("--smoke", action="store_true", help="tiny model, two small protocols, one image (seconds)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--images", type=int, default=None, help="timed images per path (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--loader-images", type=int, default=None,
                   help="images through the eval loop for the DataLoader-wait share (0 = skip)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the eval-loop run (default 2)")
    p.add_argument("--modes", default="mv,op", help="comma-separated modes (default mv,op)")
    p.add_argument("--protocols", default=None, help="comma-separated subset of voc21,context60,coco_stuff,ade,"
                                                     "cityscapes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--whole-image", default=True, action=argparse.BooleanOptionalAction,
                   help="also time the dslo protocol's whole image (default on)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for RESULTS.md, results.csv, plots/ (default bench/; with --smoke a new temporary "
                        "folder, so a smoke run never overwrites the real rows in bench/RESULTS.md)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench_pipeline_smoke_")) if args.smoke else BENCH_DIR
        if args.smoke:
            print(f"--smoke without --out: writing into {args.out}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.images is not None and args.images < 1:
        print("error: --images must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    only = [s.strip() for s in args.protocols.split(",")] if args.protocols else None
    ok, _ = run(args.device, smoke=args.smoke, images=args.images, workers=args.workers,
                loader_images=args.loader_images, modes=modes, only=only, out_dir=args.out,
                whole_image=args.whole_image)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
