"""pytest-benchmark view of the peer benchmarks (bench/run_all.py has the tables and plots).

    python -m pytest bench/ --benchmark-only [-k "op and 1024"] [--benchmark-json out.json]

One test per (cell, backend or peer of bench/peers.py): correctness against the float64
reference first (the same check as bench/run_all.py), then ``benchmark.pedantic`` over
whole calls, grouped by cell. A peer that is not installed is skipped with the pip
command in the reason (``-ra`` lists it); POT's per-class and batched log-domain solvers,
GeomLoss and kornia at the JBU's window only run on the small op cell (seconds to minutes
per call on the others).
"""

from __future__ import annotations

import pytest
import torch

from bench import peers as P
from bench.run_all import Check, shape_of, work

CELLS = [{"mode": "op", "B": 1, "N": 196, "C": 21}, {"mode": "op", "B": 1, "N": 1024, "C": 171},
         {"mode": "mv", "B": 1, "N": 1024, "C": 21}, {"mode": "jbu", "B": 1, "C": 21, "H": 512}]
SLOW = ("POT sinkhorn_log", "POT ot.batch", "GeomLoss", "kornia: bilinear + joint_bilateral_blur, the JBU")
_CACHE: dict[str, tuple[dict, Check]] = {}


def _cell(case: dict) -> tuple[dict, Check]:
    key = shape_of(case) + case["mode"]
    if key not in _CACHE:
        _CACHE.clear()  # one cell's inputs at a time
        x = P.jbu_inputs(case["B"], case["C"], case["H"]) if case["mode"] == "jbu" else \
            P.op_inputs(case["B"], case["N"], case["C"])
        check = Check(case, x)
        if case["mode"] == "jbu":
            check.set_jbu_reference(x)
        _CACHE[key] = (x, check)
    return _CACHE[key]


PARAMS = [pytest.param(case, label, id=f"{case['mode']}-{shape_of(case).replace(' ', '-')}-{label}")
          for case in CELLS for label in P.runners(case["mode"])]


@pytest.mark.parametrize(("case", "label"), PARAMS)
def test_peer(benchmark, case, label):
    torch.set_num_threads(2)
    fn = P.runners(case["mode"])[label]
    if isinstance(fn, str):
        pytest.skip(fn)
    if label.startswith(SLOW) and work(case) > 196 * 196 * 21:
        pytest.skip("tens of seconds per call at this size: python -m bench.run_all times it")
    x, check = _cell(case)
    if label.startswith("torch.compile"):
        fn(x)  # compile outside the timing
    ok, text = check(label, fn(x))
    assert ok, text
    benchmark.group = f"{case['mode']} {shape_of(case)}"
    benchmark.extra_info.update(check=text, version=P.version_of(label), dtype="float32", threads=2)
    benchmark.pedantic(fn, args=(x,), rounds=3, iterations=1)
