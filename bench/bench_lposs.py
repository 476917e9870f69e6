"""LPOSS / LPOSS+ label propagation: ours against a faithful CPU port of LPOSS's own loop.

The port (``port_patch_stage``, ``port_pixel_stage``) follows segmentation/evaluation/lposs_eval.py of
vladan-stojnic/LPOSS line by line (docs/lposs.md): the graph built in PyTorch as theirs (a dense ``torch.cdist``
over all patch centres, the kNN by inner product with the feature matrix's top-k standing in for faiss,
the pixel edge list of get_pixel_connections), scipy's CSR in place of cupyx's, ``W + W.T``,
normalize_connection_graph, and scipy's CG class by class as perform_lp (x0 = 0, rtol 1e-6, maxiter 10),
all in float32 as their GPU run. Ours: ``ovss_fast.label_propagation`` / ``pixel_propagation``. Results are
compared before anything is timed (rel. error <= 1e-4).

Protocol sizes (LPOSS's VOC config): a 375 x 500 image resized to short side 448 (448 x 597), windows 224 with
stride 112 -> 3 x 5 = 15 windows of 14 x 14 patches (N = 2940), DINO ViT-B/16 features (D = 768), k = 400,
C = 21 and 171. Inputs are synthetic (clustered features, an image of flat regions with noise): the cost does
not depend on the values. Each measurement runs in a fresh process; peak memory = the growth of the process's
peak RSS during the call (ru_maxrss after minus before).

    python -m bench.bench_lposs                  # all rows, writes bench/RESULTS.md "Refiners" / "LPOSS"
    python -m bench.bench_lposs --classes 21 --stages pixel --no-write
    python -m bench.bench_lposs --split          # ours only: the time of each part of each stage
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H_IMG, W_IMG, CROP, STRIDE, PATCH, D = 448, 597, 224, 112, 16, 768
ALPHA, K, GAMMA, SIGMA, DIST_POW, TAU, RADIUS = 0.95, 400, 3.0, 0.01, 1.0, 0.01, 6


# --------------------------------------------------------------------------- inputs
def window_locations(h_img: int = H_IMG, w_img: int = W_IMG) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of each window, as slide_inference."""
    h_grids = max(h_img - CROP + STRIDE - 1, 0) // STRIDE + 1
    w_grids = max(w_img - CROP + STRIDE - 1, 0) // STRIDE + 1
    out = []
    for hi, wi in product(range(h_grids), range(w_grids)):
        y2, x2 = min(hi * STRIDE + CROP, h_img), min(wi * STRIDE + CROP, w_img)
        out.append((max(y2 - CROP, 0), y2, max(x2 - CROP, 0), x2))
    return out


def inputs(C: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    locs = window_locations()
    g = CROP // PATCH
    N = len(locs) * g * g
    centres = torch.randn(12, D, generator=gen)
    feats = centres[torch.randint(0, 12, (N,), generator=gen)] + 0.8 * torch.randn(N, D, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=1)
    scores = torch.nn.functional.normalize(feats + torch.randn(N, D, generator=gen), dim=1) @ text.T
    iy, ix = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.cat([torch.stack([y1 + PATCH // 2 + PATCH * iy.reshape(-1), x1 + PATCH // 2 + PATCH * ix.reshape(-1)],
                                 1) for y1, _, x1, _ in locs]).float()
    # the image: 40 flat rectangles with noise; the pixel scores: smooth maps (as upsampled patch scores)
    image = torch.rand(3, 1, 1, generator=gen).expand(3, H_IMG, W_IMG).clone()
    for _ in range(40):
        y, x = torch.randint(0, H_IMG - 40, (1,), generator=gen).item(), torch.randint(0, W_IMG - 40, (1,),
                                                                                      generator=gen).item()
        image[:, y:y + 120, x:x + 160] = torch.rand(3, 1, 1, generator=gen)
    image = (image + 0.03 * torch.randn(3, H_IMG, W_IMG, generator=gen)).clamp(0, 1)
    coarse = torch.randn(1, C, 28, 38, generator=gen) * 0.1
    pix_scores = torch.nn.functional.interpolate(coarse, size=(H_IMG, W_IMG), mode="bilinear", align_corners=False)
    return {"scores": scores, "feats": feats, "positions": pos, "image": image[None], "pix_scores": pix_scores}


# --------------------------------------------------------------------------- the port (LPOSS's loop on the CPU)
def _port_normalise(W):
    """normalize_connection_graph (lposs_eval.py lines 37-47)."""
    import numpy as np
    import scipy.sparse as sp

    W = W - sp.diags(W.diagonal(), 0)
    S = np.asarray(W.sum(axis=1)).ravel()
    S[S == 0] = 1
    D_mh = sp.diags(1.0 / np.sqrt(S), 0)
    return (D_mh @ W @ D_mh).tocsr()


def _port_lp(L, preds):
    """perform_lp / dfs_search (lines 89-103): one CG per class."""
    import numpy as np
    import scipy.sparse.linalg as sla

    Y = preds.numpy()
    out = np.zeros(Y.shape, dtype=Y.dtype)
    for c in range(Y.shape[1]):
        out[:, c] = sla.cg(L, Y[:, c], rtol=1e-6, maxiter=10)[0]
    return torch.from_numpy(out)


def port_patch_stage(scores, feats, positions, k=K):
    """get_lposs_laplacian (lines 50-86) + perform_lp; feats L2-normalised first as slide_inference does."""
    import numpy as np
    import scipy.sparse as sp

    feats = torch.nn.functional.normalize(feats, p=2, dim=-1)
    locs = positions.unsqueeze(0)
    dist = torch.cdist(locs, locs, p=2)[0] ** DIST_POW
    geometry_affinity = torch.exp(-SIGMA * dist)
    N = feats.shape[0]
    sims, ks = torch.topk(feats @ feats.T, k, dim=1)  # faiss.knn_gpu(..., METRIC_INNER_PRODUCT)
    sims[sims < 0] = 0
    sims = sims**GAMMA
    sims = (sims * geometry_affinity.gather(1, ks)).flatten()
    rows = torch.arange(N).repeat_interleave(k)
    W = sp.csr_matrix((sims.numpy(), (rows.numpy(), ks.flatten().numpy())), shape=(N, N))
    W = W + W.T
    L = (sp.eye(N, dtype=np.float32) - ALPHA * _port_normalise(W)).tocsr()
    return _port_lp(L, scores)


def port_pixel_stage(pix_scores, image, neigh=RADIUS):
    """get_pixel_connections + get_lposs_plus_laplacian (lines 106-155) + perform_lp."""
    import numpy as np
    import scipy.sparse as sp

    try:
        from kornia.color import rgb_to_lab
    except ImportError:  # the conversion is the same (tests/test_lposs.py checks it against kornia)
        from ovss_fast.kernels.reference import srgb_to_lab as rgb_to_lab
    img = image[0]
    img_lab = rgb_to_lab(img).permute((1, 2, 0)) / torch.tensor([100, 128, 128])
    img_h, img_w, _ = img_lab.shape
    img_lab = img_lab.reshape((img_h * img_w, -1))
    idx = torch.arange(img_h * img_w)
    locs = torch.stack((idx // img_w, idx % img_w), 1)
    rows, cols = [], []
    for mov in product(range(-neigh, neigh + 1), range(-neigh, neigh + 1)):
        if mov[0] == 0 and mov[1] == 0:
            continue
        new_locs = locs + torch.tensor(mov)
        mask = (new_locs[:, 0] >= 0) & (new_locs[:, 1] >= 0) & (new_locs[:, 0] < img_h) & (new_locs[:, 1] < img_w)
        rows.append(torch.where(mask)[0])
        col = new_locs[mask, :]
        cols.append(col[:, 0] * img_w + col[:, 1])
    rows, cols = torch.cat(rows), torch.cat(cols)
    data = torch.exp(-torch.sqrt(((img_lab[rows, :] - img_lab[cols, :]) ** 2).sum(dim=-1)) / TAU)
    N = img_h * img_w
    W = sp.csr_matrix((data.numpy(), (rows.numpy(), cols.numpy())), shape=(N, N))
    L = (sp.eye(N, dtype=np.float32) - ALPHA * _port_normalise(W)).tocsr()
    C = pix_scores.shape[1]
    preds = pix_scores[0].permute(1, 2, 0).reshape(N, C)
    return _port_lp(L, preds).reshape(img_h, img_w, C).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------- ours
def ours_patch_stage(scores, feats, positions, backend="cpu"):
    import ovss_fast

    return ovss_fast.label_propagation(scores, feats, positions, k=K, gamma=GAMMA, sigma=SIGMA, dist_pow=DIST_POW,
                                       alpha=ALPHA, backend=backend)


def ours_pixel_stage(pix_scores, image, backend="cpu"):
    import ovss_fast

    return ovss_fast.pixel_propagation(pix_scores, image, radius=RADIUS, tau=TAU, alpha=ALPHA, backend=backend)


def run_one(impl: str, stage: str, C: int, repeats: int) -> dict:
    """One measurement in this process: median seconds over ``repeats`` calls, peak RSS growth, the output."""
    x = inputs(C)
    if stage == "patch":
        args = (x["scores"], x["feats"], x["positions"])
        fn = port_patch_stage if impl == "port" else (lambda *a: ours_patch_stage(*a, backend=impl))
    else:
        args = (x["pix_scores"], x["image"])
        fn = port_pixel_stage if impl == "port" else (lambda *a: ours_pixel_stage(*a, backend=impl))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(times), "times": times, "peak_mb": peak / 1024, "out": out}


def split(C: int, repeats: int) -> list[list]:
    """Where ours spends its time (this process, median of ``repeats``): the patch stage's kNN in PyTorch ops
    (matmul + top-k, the path off the CPU), the kNN with edge weights (the compiled knn_edges on the CPU),
    then the compiled graph + CG (with 0 and 10 CG steps); the pixel stage with
    0 CG steps (Lab, stencil weights, layout changes) and 10."""
    import ovss_fast
    import ovss_fast.kernels.extension  # noqa: F401  (loads the compiled ops into torch.ops.ovss_fast)
    from ovss_fast.kernels import propagation as P

    x = inputs(C)

    def med(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    f = torch.nn.functional.normalize(x["feats"], dim=1)
    idx, w = P.edge_weights(x["feats"], x["positions"], k=K, gamma=GAMMA, sigma=SIGMA, dist_pow=DIST_POW)
    ops = torch.ops.ovss_fast
    parts = [
        ("patch", "kNN in PyTorch ops (the non-CPU path)", lambda: P.knn(f, K)),
        ("patch", "kNN + edge weights (knn_edges on the CPU)",
         lambda: P.edge_weights(x["feats"], x["positions"], k=K, gamma=GAMMA, sigma=SIGMA, dist_pow=DIST_POW)),
        ("patch", "graph (0 CG steps)", lambda: ops.knn_propagation(idx, w, x["scores"], ALPHA, 0, 1e-6)),
        ("patch", "graph + 10 CG steps", lambda: ops.knn_propagation(idx, w, x["scores"], ALPHA, 10, 1e-6)),
        ("patch", "all (label_propagation)", lambda: ours_patch_stage(x["scores"], x["feats"], x["positions"])),
        ("pixel", "Lab + weights + layout (0 CG steps)",
         lambda: ops.pixel_propagation(x["pix_scores"], x["image"], RADIUS, TAU, ALPHA, 0, 1e-6)),
        ("pixel", "all (10 CG steps)", lambda: ovss_fast.pixel_propagation(x["pix_scores"], x["image"],
                                                                          radius=RADIUS, tau=TAU, alpha=ALPHA)),
    ]
    rows = []
    for stage, what, fn in parts:
        fn()
        rows.append([stage, C, what, f"{med(fn):.3f}"])
        print(*rows[-1], flush=True)
    return rows


def _child(impl: str, stage: str, C: int, repeats: int, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    res = run_one(impl, stage, C, repeats)
    torch.save(res["out"], out_path)
    print(json.dumps({k: v for k, v in res.items() if k != "out"}))


def measure(impl: str, stage: str, C: int, repeats: int, tmp: Path) -> tuple[dict, torch.Tensor]:
    out_path = tmp / f"{impl}_{stage}_{C}.pt"
    cmd = [sys.executable, "-m", "bench.bench_lposs", "--child", impl, stage, str(C), str(repeats), str(out_path)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{impl} {stage} C={C} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(out_path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def write_results(body: str, path: Path | None = None) -> Path:
    """Replace (or add) the "### LPOSS" sub-section of the "## Refiners" section of bench/RESULTS.md."""
    import re

    path = path or ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    block = f"### LPOSS\n\n{body.rstrip()}\n"
    sub = re.compile(r"^### LPOSS\n.*?(?=^### |^## |\Z)", re.S | re.M)
    if sub.search(text):
        text = sub.sub(lambda _: block + "\n", text, count=1)
    elif re.search(r"^## Refiners\n", text, re.M):
        section = re.compile(r"^## Refiners\n.*?(?=^## |\Z)", re.S | re.M)
        text = section.sub(lambda m: m.group(0).rstrip() + "\n\n" + block + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n## Refiners\n\n" + block
    path.write_text(text.rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--classes", type=int, nargs="+", default=[21, 171])
    ap.add_argument("--stages", nargs="+", default=["patch", "pixel"], choices=["patch", "pixel"])
    ap.add_argument("--impls", nargs="+", default=["port", "cpu"], help="port and/or our backends (cpu, reference)")
    ap.add_argument("--repeats", type=int, default=3, help="calls per measurement of ours (the port: 1)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--split", action="store_true", help="ours only: time the parts of each stage (no table)")
    args = ap.parse_args(argv)
    if args.split:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        sys.path.insert(0, str(ROOT))
        from bench._results_io import markdown_table

        rows = [r for C in args.classes for r in split(C, args.repeats)]
        print(markdown_table(["stage", "C", "part", "median s"], rows))
        print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        return
    if args.child:
        impl, stage, C, repeats, out_path = args.child
        _child(impl, stage, int(C), int(repeats), out_path)
        return
    sys.path.insert(0, str(ROOT))
    from bench._results_io import append_rows, device_name, markdown_table, now, versions

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_lposs"
    tmp.mkdir(exist_ok=True)
    rows, csv_rows = [], []
    for C, stage in product(args.classes, args.stages):
        got = {}
        for impl in args.impls:
            got[impl] = measure(impl, stage, C, 1 if impl == "port" else args.repeats, tmp)
            print(impl, stage, C, {k: v for k, v in got[impl][0].items() if k != "times"}, flush=True)
        base = got.get("port")
        for impl, (res, out) in got.items():
            err = rel_err(out, base[1]) if base is not None and impl != "port" else None
            if err is not None and err > 1e-4:
                raise SystemExit(f"{impl} {stage} C={C}: rel. error {err:.2e} against the port (> 1e-4)")
            speed = f"{base[0]['seconds'] / res['seconds']:.1f}x" if base is not None and impl != "port" else "1x"
            load = " ".join(f"{v:.1f}" for v in os.getloadavg())
            rows.append([stage, C, impl, f"{res['seconds']:.3f}", f"{res['peak_mb']:.0f}", speed,
                         "-" if err is None else f"{err:.1e}", load])
            csv_rows.append({"date": now(), "bench": "lposs", "device": device_name("cpu"), "versions": versions(),
                             "op": f"{stage}_propagation", "shape": _shape(stage, C), "dtype": "float32",
                             "backend": impl, "median_ms": f"{1000 * res['seconds']:.1f}",
                             "peak_mem_mb": f"{res['peak_mb']:.0f}",
                             "note": f"rel err {err:.1e} vs port; load {load}" if err is not None else f"load {load}"})
    table = markdown_table(["stage", "C", "impl", "median s", "peak MB", "speed-up vs port", "rel. err vs port",
                            "load avg"], rows)
    print(table)
    if args.no_write:
        return
    append_rows(csv_rows)
    body = (f"{now()}, {device_name('cpu')}, {versions()}. `python -m bench.bench_lposs`. LPOSS's VOC protocol: "
            f"448 x 597 (375 x 500 at short side 448), windows 224 / 112 -> {len(window_locations())} windows, "
            f"N = {len(window_locations()) * 196} patches, D = {D}, k = {K}, alpha {ALPHA}, gamma {GAMMA}, "
            f"sigma {SIGMA}, radius {RADIUS}, tau {TAU}, 10 CG steps, float32. \"port\" = LPOSS's loop on the CPU "
            "(their graph code in PyTorch, scipy CSR + scipy's CG class by class; faiss -> exact top-k); \"cpu\" = "
            "ours. Median of 3 calls (the port: 1 call), each row a fresh process; peak MB = growth of the "
            "process's peak RSS during the calls. Load average is that of the machine (shared with other work) "
            "when the row was taken.\n\n" + table)
    write_results(body)


def _shape(stage: str, C: int) -> str:
    n = len(window_locations()) * 196
    return f"N={n} D={D} k={K} C={C}" if stage == "patch" else f"H={H_IMG} W={W_IMG} r={RADIUS} C={C}"


if __name__ == "__main__":
    main()
