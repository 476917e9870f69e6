"""The Triton backend on whole-image sizes without per-image retuning (CPU only: no kernel runs).

* autotuning keyed on size buckets: over 200 whole-image sizes drawn like VOC's and like ADE20K's
  (bench/_sizes.py, the ``dslo`` protocol's patch grids and annotation sizes), every op's autotuners
  (the real ``triton.autotune`` objects of the kernel modules, their real bucketing) see at most 12
  distinct keys in all; exact-shape keys would have seen one per distinct size;
* the CUDA-graph policy (pure Python): captures over the same sequences, per-stream keys;
* the Triton options: explicit keywords, environment defaults read once at import.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ovss_fast.kernels.triton._runtime import (
    BucketedCache,
    GraphPolicy,
    TritonOptions,
    bucket_sizes,
    graph_key,
    size_bucket,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._sizes import whole_image_sizes  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
SEQUENCES = {"voc-336": ("voc", None), "ade-336": ("ade", 336), "ade-448": ("ade", 448)}
MAX_TUNINGS = 12


def test_size_bucket_is_a_power_of_two_ladder():
    assert [size_bucket(n) for n in (1, 2, 3, 16, 17, 441, 512, 513, 861, 1540)] == [
        1, 2, 4, 16, 32, 512, 512, 1024, 1024, 2048]
    # every size-dependent launcher choice changes only at a power of two, i.e. a bucket boundary
    for n in range(1, 5000):
        b = size_bucket(n)
        assert b >= n and (b == 1 or b // 2 < n)
        assert (n <= 512) == (b <= 512) and (n <= 256) == (b <= 256)  # WINDOW_MAX_N, persistent_block_n


def test_bucketed_cache_maps_keys_to_buckets():
    cache = BucketedCache(["N", "C", "MODE"], bucket_sizes)
    cache[(441, 21, 0, "torch.float32")] = "cfg"
    assert (500, 30, 0, "torch.float32") in cache and cache[(512, 17, 0, "torch.float32")] == "cfg"
    assert (513, 21, 0, "torch.float32") not in cache  # next bucket
    assert (441, 21, 1, "torch.float32") not in cache  # MODE stays exact
    assert (441, 21, 0, "torch.float16") not in cache  # dtypes stay exact
    assert cache.get((300, 21, 0, "torch.float32")) == "cfg" and len(cache) == 1
    key = cache.bucket_key((441, 21, 0, "torch.float32"))
    assert cache.bucket_key(key) is key  # bucketing a bucketed key (the disk cache's) is the identity


def _tuners():
    from ovss_fast.kernels.triton import class_distributions as cd
    from ovss_fast.kernels.triton import gibbs_kernel as gk
    from ovss_fast.kernels.triton import jbu
    from ovss_fast.kernels.triton import kl_scores as kl
    from ovss_fast.kernels.triton import markov_scores as mk
    from ovss_fast.kernels.triton import sinkhorn_scores as sk

    # per op, the autotuners a whole image can run (fused AND split schedules counted: auto picks one by SMs)
    return {
        "class_distributions": [cd._tuned],
        "gibbs_kernel": [gk._range_tuned, gk._tile_tuned],
        "kl_scores": [kl._sums_tuned, kl._kl_tuned],
        "sinkhorn_scores": [sk._tuned, sk._step_tuned],
        "markov_scores": [mk._rows_tuned, mk._cols_tuned, mk._chain_tuned, mk._step_tuned],
        "jbu_argmax": [jbu._argmax_tuned],
        "jbu_upsample": [jbu._up_tuned],
    }


def tuning_counts(sizes, tuners) -> tuple[dict[str, int], dict[str, int]]:
    """Per op: distinct bucketed keys (tunings) and distinct exact keys over ``sizes``, summed over its tuners."""
    bucketed: dict[str, int] = {}
    exact: dict[str, int] = {}
    for op, group in tuners.items():
        for tuner in group:
            seen, seen_exact = set(), set()
            for s in sizes:
                for mode in (0, 1, 2) if "MODE" in tuner.keys else (None,):
                    values = {"B": 1, "N": s.N, "C": s.C, "D": 512, "h": s.h, "w": s.w, "H": s.H, "W": s.W, "R": 2,
                              "MODE": mode, "VELOCITY": False, "SYMMETRIC": True, "PRECISION": "ieee"}
                    key = (*(values[k] for k in tuner.keys), "torch.float32")
                    assert isinstance(tuner.cache, BucketedCache)
                    seen.add(tuner.cache.bucket_key(key))
                    seen_exact.add(key)
            bucketed[op] = bucketed.get(op, 0) + len(seen)
            exact[op] = exact.get(op, 0) + len(seen_exact)
    return bucketed, exact


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", SEQUENCES)
def test_whole_image_sizes_tune_at_most_12_times_per_op(name):
    dataset, short = SEQUENCES[name]
    sizes = whole_image_sizes(dataset, 200, seed=0, short=short)
    bucketed, exact = tuning_counts(sizes, _tuners())
    print(name, "tunings per op (bucketed / exact keys):", {op: (bucketed[op], exact[op]) for op in bucketed})
    assert max(bucketed.values()) <= MAX_TUNINGS, bucketed
    # exact keys would retune on most images: one tuning per distinct N (or H x W)
    assert exact["class_distributions"] >= 4 * bucketed["class_distributions"]
    assert exact["jbu_argmax"] >= 10 * bucketed["jbu_argmax"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_autotuner_is_bucketed():
    from ovss_fast.kernels.triton import _runtime

    _tuners()  # imports every kernel module
    from ovss_fast.kernels.triton import _schedules  # noqa: F401

    assert len(_runtime.TUNERS) >= 20
    for tuner in _runtime.TUNERS:
        assert isinstance(tuner.cache, BucketedCache), tuner
        assert set(tuner.cache.names) == set(tuner.keys)


def _graph_calls(sizes, stream: int = 0) -> list[tuple]:
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    params = (0.2, 50, True, "auto", "ieee")
    return [graph_key("sinkhorn_scores", params, 0, stream, (meta(1, s.N, s.C), meta(1, s.N, s.N))) for s in sizes]


@pytest.mark.parametrize("name", SEQUENCES)
def test_graph_captures_over_whole_image_sizes(name):
    dataset, short = SEQUENCES[name]
    sizes = whole_image_sizes(dataset, 200, seed=0, short=short)
    keys = _graph_calls(sizes)
    policy = GraphPolicy()  # the backend's: capacity 32, capture on the second call of a shape
    plans = []
    for k in keys:  # as GraphCache.run: plan, and keep what a capture made
        plans.append(policy.plan(k))
        if plans[-1] == "capture":
            policy.store(k, object())
    distinct = len(set(keys))
    repeated = sum(1 for k in set(keys) if keys.count(k) >= 2)
    print(name, f"distinct shapes {distinct}, captures {policy.captures}, replays {plans.count('replay')}, "
          f"eager {plans.count('eager')}")
    # no eviction at capacity 32: one capture per shape met twice, never one for a shape met once
    assert policy.captures == repeated <= distinct <= policy.capacity
    assert plans.count("eager") == distinct and plans.count("replay") == 200 - distinct - repeated


def test_graph_policy_bounds_and_streams():
    policy = GraphPolicy(capacity=2, capture_after=2)
    a, b, c = ("a",), ("b",), ("c",)
    assert [policy.plan(a), policy.plan(a)] == ["eager", "capture"]
    policy.store(a, 1)
    assert policy.plan(a) == "replay"
    for k in (b, c):
        assert [policy.plan(k), policy.plan(k)] == ["eager", "capture"]
        policy.store(k, 1)
    assert len(policy.captured) == 2 and a not in policy.captured  # least recently used out
    once = GraphPolicy(capture_after=1)
    assert once.plan(a) == "capture"
    # two streams, one shape: two keys, so two sets of static buffers (no race between copy and replay)
    voc = whole_image_sizes("voc", 1)
    assert _graph_calls(voc, stream=1) != _graph_calls(voc, stream=2)


def test_triton_options_checked():
    opts = TritonOptions()
    assert opts.with_({"schedule": "split", "graphs": None}) == TritonOptions(schedule="split")
    with pytest.raises(ValueError, match="backend_options: unknown Triton option.*'shedule'"):
        opts.with_({"shedule": "split"})
    with pytest.raises(ValueError, match="precision must be one of 'ieee', 'tf32x3', got 'fp16'"):
        TritonOptions(precision="fp16")
    with pytest.raises(ValueError, match="graphs must be True or False"):
        TritonOptions(graphs="no")


def _defaults_in_child(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OVSS_FAST_TRITON_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**full, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_environment_overrides_are_read_once_at_import():
    code = ("import os\nfrom ovss_fast.kernels.triton import _runtime as r\n"
            "os.environ['OVSS_FAST_TRITON_SCHEDULE'] = 'fused'\n"  # too late: read at import
            "d = r.defaults()\nprint(d.schedule, d.precision, d.gibbs, d.graphs, r.AUTOTUNE_REP_MS)")
    proc = _defaults_in_child({"OVSS_FAST_TRITON_SCHEDULE": "Split", "OVSS_FAST_TRITON_PRECISION": "tf32x3",
                               "OVSS_FAST_TRITON_GIBBS": "fused", "OVSS_FAST_TRITON_GRAPHS": "0",
                               "OVSS_FAST_TRITON_AUTOTUNE_REP_MS": "20"}, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["split", "tf32x3", "fused", "False", "20"]
    proc = _defaults_in_child({}, code)
    assert proc.stdout.split() == ["auto", "ieee", "separate", "True", "100"]


@pytest.mark.slow
def test_invalid_environment_override_fails_on_use_naming_the_variable():
    code = ("import ovss_fast\nfrom ovss_fast.kernels.triton import _runtime as r\n"
            "print(r.TritonOptions(schedule='split').schedule)\n"  # explicit options still work
            "r.defaults()")
    proc = _defaults_in_child({"OVSS_FAST_TRITON_PRECISION": "fp8"}, code)
    assert proc.stdout.split() == ["split"]
    assert "OVSS_FAST_TRITON_PRECISION" in proc.stderr and "got 'fp8'" in proc.stderr


def test_discrepancy_checks_backend_options():
    import ovss_fast

    q = torch.rand(1, 9, 3)
    a = torch.rand(1, 9, 9)
    with pytest.raises(ValueError, match="backend_options: unknown Triton option"):
        ovss_fast.discrepancy(q, a, mode="op", backend="reference", backend_options={"iters": 3})
    with pytest.raises(ValueError, match="backend_options: schedule must be one of"):
        ovss_fast.discrepancy(q, a, mode="op", backend="reference", backend_options={"schedule": "fast"})
    with pytest.raises(TypeError, match="backend_options must be a dict"):
        ovss_fast.discrepancy(q, a, mode="op", backend="reference", backend_options="split")
    # backends without options ignore valid ones
    want = ovss_fast.discrepancy(q, a, mode="op", backend="reference")
    got = ovss_fast.discrepancy(q, a, mode="op", backend="reference", backend_options={"schedule": "split"})
    assert torch.equal(want, got)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gpu_check_whole_image_row_smoke_in_the_interpreter():
    """bench/gpu_check.py's dslo row (run_whole_images) on 2 tiny whole images in the Triton interpreter
    (a child process with TRITON_INTERPRET=1): the head runs end to end and the row reports its times."""
    code = ("import json\nfrom bench import gpu_check as g\n"
            "print(json.dumps(g.run_whole_images('cpu', smoke=True)))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row[0] == "dslo head, 2 whole images" and row[2] == "triton", row
    assert "failed" not in row[6] and "total" in row[6] and "first call" in row[6], row
    assert row[3].endswith("(mean)") and float(row[3].split()[0]) > 0, row


_REAL_AUTOTUNER = """
import torch
import triton
import triton.language as tl

from ovss_fast.kernels.triton._runtime import autotune, configs

timed = []


def bench(fn, quantiles=None, **kw):
    timed.append(1)
    fn()
    return 1.0


@triton.jit
def add_one(x_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=m) + 1, mask=m)


tuned = autotune(configs("BLOCK", [(16, 4), (32, 4)]), key=["N"], do_bench=bench, restore_value=["x_ptr"])(add_one)
for n in (20, 30, 32, 17, 33, 40, 64):
    x = torch.zeros(n)
    tuned[lambda m, n=n: (triton.cdiv(n, m["BLOCK"]),)](x, n)
    assert bool((x == 1).all()), n
print(len(timed), len(tuned.cache))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_autotuner_tunes_once_per_bucket():
    """Triton's own Autotuner.run with our BucketedCache (in the interpreter, a timing function that
    counts): 7 sizes in 2 buckets are timed twice (2 configs each), not 7 times, and every size is right."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OVSS_FAST_TRITON_AUTOTUNE_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _REAL_AUTOTUNER], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "2"]  # exact keys: 14 timings, 7 tunings
