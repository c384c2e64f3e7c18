"""The house rules that tools can check: ruff lint and format, mypy --strict on gateway/,
and CI running the very test command the README gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "gateway", "tests"], id="ruff-check"),
        pytest.param(["ruff", "format", "--check", "gateway", "tests"], id="ruff-format"),
        pytest.param(["mypy", "gateway"], id="mypy-strict"),
    ],
)
def test_style(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    """CI must prove what the README promises: its last line is the README's command."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0].strip() for block in section.split("```bash\n")[1:]]
    assert len(blocks) == 2, "the README gives exactly two set-up commands"
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == blocks[1]
    assert "pytest" in blocks[1] and "gateway serve" in blocks[0]
