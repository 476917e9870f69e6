"""pytest entry for the benchmarks: ``python -m pytest bench/ --benchmark-only``.

pyproject.toml's addopts carry ``--benchmark-disable`` (the test suite, which is all that
``python -m pytest`` collects through ``testpaths = ["tests"]``, never times anything);
pytest-benchmark refuses ``--benchmark-only`` beside it, so an explicit ``--benchmark-only``
here turns timing back on.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
