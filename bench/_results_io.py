"""Shared by the benchmarks: the environment line, rows for bench/results.csv, sections of bench/RESULTS.md.

Only torch (and optionally triton) is imported, so the GPU check can use it on a
machine with no package index.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
#: the columns of bench/results.csv (an existing file keeps its own header)
CSV_FIELDS = ["date", "bench", "device", "versions", "op", "shape", "dtype", "backend", "median_ms", "peak_mem_mb",
              "note"]


def device_name(device: str) -> str:
    """The card (torch.cuda.get_device_name) or the CPU model and core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton -")
    return ", ".join(parts)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def append_rows(rows: Iterable[Mapping[str, object]], path: Path | None = None) -> Path:
    """Append rows to bench/results.csv, creating it with CSV_FIELDS when absent."""
    path = path or BENCH_DIR / "results.csv"
    fields = CSV_FIELDS
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header:
            fields = header
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})
    return path


def write_section(heading: str, body: str, path: Path | None = None) -> Path:
    """Replace (or append) the ``## heading`` section of bench/RESULTS.md; other sections stay as they are."""
    path = path or BENCH_DIR / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"## {heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
