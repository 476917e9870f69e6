"""Shared fixtures and markers. Tests never touch the network."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| over finite entries; -inf entries must coincide."""
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e), "infinite entries differ"
    assert torch.equal(a[inf_a], e[inf_e]), "infinite entries differ in sign"
    fin = ~inf_e
    if not bool(fin.any()):
        return 0.0
    scale = e[fin].abs().max().clamp_min(1e-30)
    return float((a[fin] - e[fin]).abs().max() / scale)
