"""README.md stays true: CI runs exactly its install, test and main commands."""

from __future__ import annotations

import re
from pathlib import Path

import ovss_fast

ROOT = Path(__file__).resolve().parents[1]


def code_block_after(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_commands = {line.strip().replace(" -q", "") for line in ci}
    for heading in ("Install", "Tests"):
        for command in code_block_after(heading):
            assert command in ci_commands, f"README {heading} command {command!r} is not what .ci/run runs"


def test_readme_main_command_exists():
    (command,) = code_block_after("Main command")
    assert command.startswith("python -m ovss_fast demo")


def test_readme_names_every_public_function():
    text = (ROOT / "README.md").read_text()
    for name in ovss_fast.__all__:
        assert name in text, f"README does not document ovss_fast.{name}"
