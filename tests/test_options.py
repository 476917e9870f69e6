"""HeadOptions: the head's knobs declared once, and everything that takes them reads that one list."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import ovss_fast
from ovss_fast.ops import api as ops
from ovss_fast.ops.options import HeadOptions, flag

OP_FUNCTIONS = {"class_distributions": [ops.class_distributions], "discrepancy": [ops.discrepancy],
                "jbu": [ops.jbu_upsample, ops.jbu_argmax]}
NOT_OPTIONS = {"backend", "backend_options", "mode"}  # keywords of the ops that are not head options


@pytest.mark.parametrize("op", list(OP_FUNCTIONS))
def test_the_options_are_exactly_the_ops_keywords(op):
    """An op keyword missing here (or an option no op takes) fails: add it as one HeadOptions field."""
    want = set(HeadOptions().for_op(op))
    for fn in OP_FUNCTIONS[op]:
        params = inspect.signature(fn).parameters
        keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - NOT_OPTIONS
        assert keywords == want, (fn.__name__, sorted(keywords ^ want))
        for name in want:  # the same defaults as the op's own
            assert params[name].default == getattr(HeadOptions(), name), (fn.__name__, name)


def test_checks_name_the_keyword_and_convert_numpy_scalars():
    o = HeadOptions(iters=np.int64(3), scale=np.float32(40))
    assert type(o.iters) is int and o.iters == 3 and type(o.scale) is float
    with pytest.raises(ValueError, match="sk_iters must be >= 1"):
        HeadOptions(sk_iters=0)
    with pytest.raises(ValueError, match="readout must be one of 'integrated', 'velocity'; got 'fast'"):
        HeadOptions(readout="fast")
    with pytest.raises(TypeError, match=r"segment_features got unknown parameters \['itres'\]"):
        HeadOptions.of("segment_features", {"itres": 3})


def test_segment_features_and_dslo_head_take_every_option():
    g = torch.Generator().manual_seed(0)
    feats, text = torch.randn(1, 12, 8, generator=g), torch.randn(3, 8, generator=g)
    aff = torch.rand(1, 12, 12, generator=g)
    guide = torch.rand(1, 3, 12, 16, generator=g)
    opts = {**HeadOptions().as_dict(), "scale": 50.0, "nms": 0.2, "eps": 0.2, "iters": 5, "sk_iters": 3, "steps": 4,
            "readout": "velocity", "tau": 0.5, "sigma_spatial": 2.0, "sigma_range": 0.2, "radius": 1}
    labels = ovss_fast.segment_features(feats, text, aff, grid=(3, 4), guide=guide, backend="reference", **opts)
    head = ovss_fast.DSLOHead(mode="mv", backend="reference", **opts)
    assert torch.equal(head(feats, text, aff, grid=(3, 4), guide=guide), labels)
    with pytest.raises(TypeError, match="segment_features got unknown parameters"):
        ovss_fast.segment_features(feats, text, aff, grid=(3, 4), itres=3)
    with pytest.raises(ValueError, match="radius must be <= 64"):
        ovss_fast.DSLOHead(radius=65)  # checked when built, not at the first forward


def test_every_option_is_a_flag_of_segment_and_eval():
    import argparse

    from ovss_fast.apps import flags as _cli
    from ovss_fast.apps.evaluate import add_arguments as eval_arguments
    from ovss_fast.apps.segment import add_arguments as segment_arguments

    for add in (segment_arguments, eval_arguments):
        p = argparse.ArgumentParser()
        add(p)
        flags = {s for a in p._actions for s in a.option_strings}
        assert {flag(n) for n in HeadOptions.names()} <= flags
    args = argparse.ArgumentParser()
    segment_arguments(args)
    ns = args.parse_args(["x.png", "--classes", "a, b", "--out", "l.png", "--sk-iters", "3", "--readout", "velocity"])
    assert _cli.method_kwargs(ns) == {"sk_iters": 3, "readout": "velocity"}
