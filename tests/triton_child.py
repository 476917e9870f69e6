"""Run a test module's ``triton_interpret`` tests in one TRITON_INTERPRET=1 child pytest.

Triton decides once per process, when ``triton.language`` is first imported, whether kernels
compile or are interpreted, and TRITON_INTERPRET=1 must not leak into the other test modules
(``backend="auto"`` would then pick the slow interpreter for CPU tensors). So a module's
interpreter tests run in ONE child pytest process started with TRITON_INTERPRET=1; in the
parent each of them reports the outcome its twin had in the child (a failure carries the
child's message). Used by tests/test_triton.py and tests/test_triton_pamr.py.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

CHILD = os.environ.get("OVSS_FAST_TRITON_CHILD") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]


class InterpreterChild:
    """The child pytest of one test file: run once, on the first interpreter test the parent meets."""

    def __init__(self, test_file: str, timeout: int = 1200) -> None:
        self.test_file = Path(test_file).resolve()
        self.timeout = timeout
        self.results: dict[str, tuple[str, str]] | None = None
        self.log = ""

    def run(self) -> dict[str, tuple[str, str]]:
        """Every triton_interpret test of the file, run once in a TRITON_INTERPRET=1 subprocess."""
        if self.results is None:
            env = dict(os.environ, TRITON_INTERPRET="1", OVSS_FAST_TRITON_CHILD="1")
            results: dict[str, tuple[str, str]] = {}
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "triton_interpret.xml"
                cmd = [sys.executable, "-m", "pytest", str(self.test_file), "-m", "triton_interpret", "-q",
                       "-p", "no:cacheprovider", f"--junitxml={report}"]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=self.timeout)
                self.log = (proc.stdout + proc.stderr)[-6000:]
                if report.exists():
                    for case in ET.parse(report).getroot().iter("testcase"):
                        outcome, detail = "passed", ""
                        for child in case:
                            if child.tag in ("failure", "error"):
                                outcome, detail = "failed", f"{child.get('message', '')}\n{child.text or ''}"
                            elif child.tag == "skipped":
                                outcome, detail = "skipped", child.get("message", "")
                        results[case.get("name", "")] = (outcome, detail)
            self.results = results
        return self.results

    def interpreted(self, fn: Callable) -> Callable:
        """Mark a test as an interpreter test: run in the child, mirrored here."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # noqa: ANN202
            if CHILD:
                return fn(*args, **kwargs)
            if not HAS_TRITON:
                pytest.skip("triton is not installed")
            current = os.environ.get("PYTEST_CURRENT_TEST", "")
            name = current.split("::")[-1].rsplit(" ", 1)[0]
            results = self.run()
            if name not in results:
                pytest.fail(f"{name} did not run in the TRITON_INTERPRET=1 child pytest; its output:\n{self.log}",
                            pytrace=False)
            outcome, detail = results[name]
            if outcome == "failed":
                pytest.fail(f"failed under the Triton interpreter (child pytest):\n{detail}", pytrace=False)
            if outcome == "skipped":
                pytest.skip(detail)

        return pytest.mark.triton_interpret(wrapper)
