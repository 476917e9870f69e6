"""A Markdown table of mIoU from ``ovss-fast eval`` results files: ``python -m ovss_fast.eval.table results/*.json``.

One row per (model, affinity, mode, features, head, protocol), one column per dataset, in the order of
:data:`ovss_fast.eval.DATASETS` (synthetic last), plus the average over the columns a
row has. A cell evaluated on fewer images than its split holds (``--limit``) is marked
with ``*``; a protocol some of whose values were overridden by flags is marked
"dslo*" (the results file's ``config.protocol.overridden`` lists them). A results file with Boundary
IoU (``mBIoU``) shows it beside mIoU in its cell, "mIoU / mBIoU", and the row's average likewise when
every cell of the row has it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from ovss_fast.errors import InputError
from ovss_fast.eval.datasets import DATASETS

COLUMNS = ("model", "affinity", "mode", "features", "head", "protocol")


def _row_key(config: dict) -> tuple[str, ...]:
    proto = config.get("protocol")
    proto = proto.get("protocol", "-") if isinstance(proto, dict) else (proto or "dslo")  # older files: dslo
    if isinstance(config.get("protocol"), dict) and config["protocol"].get("overridden"):
        proto += "*"  # some of the protocol's values were overridden by flags (see the results file)
    return (str(config.get("model", "-")), str(config.get("affinity", "-")), str(config.get("mode", "-")),
            str(config.get("features", "clip")), str(config.get("head", "dslo")), proto)


def format_table(reports: Sequence[dict]) -> str:
    """Reports (the JSON objects written by ``ovss-fast eval``) -> a Markdown table of mIoU (and mBIoU)."""
    if not reports:
        raise InputError("no results to tabulate")
    order = [*DATASETS, "synthetic"]
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    values: dict[tuple[str, ...], list[float]] = {}
    bvalues: dict[tuple[str, ...], list[float | None]] = {}
    seen = set()
    for r in reports:
        cfg = r.get("config", {})
        name = cfg.get("dataset")
        if name not in order or "mIoU" not in r:
            raise InputError(f"not an ovss-fast eval results file (dataset {name!r})")
        key = _row_key(cfg)
        partial = cfg.get("limit") is not None and r.get("images", 0) < cfg.get("images_in_split", 0)
        miou = r["mIoU"]
        cell = "n/a" if miou is None else f"{miou:.1f}"
        if "mBIoU" in r:
            cell += " / " + ("n/a" if r["mBIoU"] is None else f"{r['mBIoU']:.1f}")
        rows.setdefault(key, {})[name] = cell + ("*" if partial else "")
        if miou is not None:
            values.setdefault(key, []).append(miou)
            bvalues.setdefault(key, []).append(r.get("mBIoU"))
        seen.add(name)
    cols = [c for c in order if c in seen]
    lines = ["| " + " | ".join(COLUMNS) + " | " + " | ".join(cols) + " | avg |",
             "| " + " | ".join("---" for _ in COLUMNS) + " | " + " | ".join("---:" for _ in cols) + " | ---: |"]
    for key, cells in rows.items():
        vals = values.get(key, [])
        avg = f"{sum(vals) / len(vals):.1f}" if vals else "n/a"
        bvals = bvalues.get(key, [])
        if bvals and all(b is not None for b in bvals):
            avg += f" / {sum(bvals) / len(bvals):.1f}"
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells.get(c, "") for c in cols) + f" | {avg} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m ovss_fast.eval.table RESULTS.json [RESULTS.json ...]", file=sys.stderr)
        return 2
    try:
        reports = []
        for p in paths:
            with open(p) as f:
                reports.append(json.load(f))
        print(format_table(reports))
    except (OSError, ValueError) as exc:
        print(f"ovss_fast.eval.table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
