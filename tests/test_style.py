"""The house rules that tools can check: ruff lint and format, mypy --strict on gateway/."""

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
