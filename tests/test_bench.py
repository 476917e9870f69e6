"""bench/run_all.py in its --smoke mode: the peer benchmark writes its tables, its plots
and a row for every peer that is not installed (CI installs none of the optional ones
but POT, so the rows must say how to get them instead of vanishing)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_smoke_writes_tables_plots_and_reports_missing_peers(tmp_path):
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # one thread: the smoke run checks that the script works, and spinning OpenMP workers on a busy CI core
    # would make it slow for nothing
    cmd = [sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(tmp_path), "--without", "kornia",
           "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("Peers: Sinkhorn (op) on CPU", "Peers: Markov chain (mv) on CPU", "Peers: jbu_argmax on CPU",
                    "Peers: summary"):
        assert f"## {heading}" in text
    # every table row names device-independent facts: shape, dtype, backend, median and spread
    rows = [line for line in text.splitlines() if line.startswith("| B=")]
    cpu_rows = [r for r in rows if "| cpu |" in r]
    assert len(cpu_rows) == 8, cpu_rows  # 3 op + 3 mv + 2 jbu cells, our backend checked and timed in each
    assert all("| float32 |" in r and ("ok, rel. err" in r or "labels identical" in r) for r in cpu_rows)
    assert all("IQR" in r or "min-max" in r for r in cpu_rows)
    # the missing peer is a row that says how to install it (two kornia settings per jbu cell)
    kornia = [r for r in rows if "kornia" in r]
    assert len(kornia) == 4 and all("not installed: pip install kornia" in r for r in kornia), kornia
    pot = [r for r in rows if "POT sinkhorn, C histograms in one call" in r]
    assert len(pot) == 3
    if importlib.util.find_spec("ot") is None:
        assert all("not installed: pip install pot" in r for r in pot)
    else:
        assert all("ok, rel. err" in r for r in pot), pot
    if importlib.util.find_spec("geomloss") is None:
        assert "not installed: pip install 'geomloss" in text
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots not written: matplotlib not installed: pip install matplotlib" in text
    else:
        for name in ("op", "mv", "jbu"):
            png = tmp_path / "plots" / f"{name}_scaling.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"(plots/{name}_scaling.png)" in text
    with (tmp_path / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert any(r["backend"] == "cpu" and r["median_ms"] for r in csv_rows)
    assert any(r["backend"].startswith("kornia") and "not installed" in r["note"] for r in csv_rows)
    # the smoke run never touches the committed results
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def _run_smoke(module: str, out: Path, *extra: str) -> str:
    """``python -m bench.<module> --smoke --out OUT ...`` on one thread; its RESULTS.md text."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", f"bench.{module}", "--smoke", "--out", str(out), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return (out / "RESULTS.md").read_text()


def test_pipeline_smoke_writes_its_section_plot_and_rows(tmp_path):
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    text = _run_smoke("bench_pipeline", tmp_path, "--threads", "1")
    assert "## Pipeline (cpu)" in text and "checks passed" in text
    rows = [line for line in text.splitlines() if line.startswith(("| voc21:", "| cityscapes:"))]
    # 2 protocols x (mv, op) x (per-window reference, batched auto), the batched rows carry the check
    assert len(rows) == 8, rows
    batched = [r for r in rows if "| batched auto" in r]
    assert len(batched) == 4 and all("ok: scores rel. err" in r for r in batched)
    assert all(r.count("|") == 17 for r in rows)  # 16 columns: every stage has a number
    # the dslo protocol's whole image beside them, checked against backend "reference"
    whole = [line for line in text.splitlines() if line.startswith(("| voc21 (dslo):", "| cityscapes (dslo):"))]
    assert len(whole) == 4 and all("| whole image auto" in r and "vs backend reference" in r for r in whole)
    assert all("ok: scores rel. err" in r and r.count("|") == 17 for r in whole)
    loader = [line for line in text.splitlines() if line.startswith(("| voc21 |", "| cityscapes |"))]
    assert len(loader) == 2 and all(line.rstrip(" |").endswith("%") for line in loader)
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot not written: matplotlib not installed" in text
    else:
        assert (tmp_path / "plots" / "pipeline_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "(plots/pipeline_breakdown.png)" in text
    with (tmp_path / "results.csv").open() as f:
        csv_rows = [r for r in csv.DictReader(f) if r["bench"] == "pipeline"]
    assert len(csv_rows) == 12
    assert {r["backend"] for r in csv_rows} == {"per-window reference", "batched auto", "whole image auto"}
    assert all(float(r["median_ms"]) > 0 for r in csv_rows)
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_bench_discrepancy_smoke_writes_regime_records(tmp_path):
    """bench_discrepancy --smoke: the GPU regime table's machinery on the CPU at tiny shapes; every record
    has the results_gpu.json keys, the CPU backends are checked against float64 and timed, the GPU ones
    are rows saying why they did not run; the committed results are left alone."""
    import json

    before = (ROOT / "bench" / "RESULTS.md").read_text()
    out = tmp_path / "results_gpu.json"
    cmd = [sys.executable, "-m", "bench.bench_discrepancy", "--smoke", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = json.loads(out.read_text())
    keys = {"op", "B", "N", "C", "backend", "median_ms", "rel_err", "card", "date", "commit"}
    assert records and all(keys <= set(r) for r in records)
    assert {r["op"] for r in records} == {"sinkhorn_scores", "markov_scores"}
    timed = [r for r in records if r["backend"] in ("reference eager", "cpu")]
    assert len(timed) == 8 and all(r["median_ms"] > 0 and r["rel_err"] <= 1e-4 and r["passed"] for r in timed)
    assert all(r["gflops"] > 0 for r in timed)
    gpu = [r for r in records if r["backend"] in ("cuda", "triton[window]")]
    assert len(gpu) == 8 and all(r["median_ms"] is None and r["note"].startswith("not run") for r in gpu)
    assert "| % fp32 peak |" in res.stdout and "| x eager |" in res.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_fp32_peak_table():
    sys.path.insert(0, str(ROOT))
    try:
        from bench import bench_discrepancy as bd
    finally:
        sys.path.remove(str(ROOT))
    assert bd.fp32_peak_tflops("NVIDIA H200") == bd.fp32_peak_tflops("NVIDIA H100 80GB HBM3") == 66.9
    assert bd.fp32_peak_tflops("NVIDIA H100 PCIe") == 51.2
    assert bd.fp32_peak_tflops("AMD EPYC 7B13") is None
    assert bd.batch_flops("op", 15, 196, 199) == 15 * 101 * 2.0 * 196 * 196 * 199
    shapes = {(b, n, c) for _, b, n, c in bd.regimes()}
    assert {(6, 196, 46), (15, 196, 199), (15, 196, 223), (36, 196, 29)} <= shapes
    assert {(1, n, c) for n in (784, 1024, 2304, 4096) for c in (21, 171)} <= shapes
    assert {(b, n, c) for _, b, n, c in bd.TARGETS} <= {(b, n, c) for _, b, n, c in bd.regimes(quick=True)}


def test_gpu_session_script_parses():
    """bench/gpu_session.sh (the GPU session's one command) is valid bash and builds for sm_90 only."""
    script = ROOT / "bench" / "gpu_session.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text and "--no-build-isolation --no-deps -e ." in text
    assert "bench.gpu_check" in text and "open_clip" not in text.split("set -uo pipefail")[1]


@pytest.mark.slow
def test_bench_refiners_smoke(tmp_path):
    """bench/bench_refiners.py --smoke (PAMR; NACLIP's module only with OVSS_FAST_NACLIP): correctness first,
    then every measurement in its own process, the section and the rows written where --out says (the
    committed results stay as they are)."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    text = _run_smoke("bench_refiners", tmp_path, "--reps", "2")
    assert "## Refiners" in text and "correctness" in text.lower()
    rows = [line for line in text.splitlines() if line.startswith("| B=1")]
    cpu = [r for r in rows if "| ovss_fast cpu |" in r]
    assert len(cpu) == 3 and all(" s (" in r for r in cpu), rows  # two sizes and the big one, all measured
    assert len([r for r in rows if "| ovss_fast reference |" in r]) == 2
    naclip = [r for r in rows if "NACLIP" in r]
    assert len(naclip) == (2 if os.environ.get("OVSS_FAST_NACLIP") else 0)
    assert "| C=171 1024x2048 | 21.38 GiB | 42.75 GiB |" in text  # the peers' computed requirement
    assert (tmp_path / "results.csv").read_text().count("bench_refiners") >= 5
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before
