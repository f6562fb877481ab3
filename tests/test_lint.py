"""The tree is lint-clean and formatted (``make lint``), checked with the tests so CI runs it.

Skipped where ruff is not installed (it is in the ``dev`` extra). The paths and exclusions are ``pyproject.toml``'s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_PATHS = ("src", "tests", "benchmarks", "examples")  # as the Makefile's LINT_PATHS


def _ruff() -> str | None:
    beside_python = Path(sys.executable).with_name("ruff")
    return str(beside_python) if beside_python.exists() else shutil.which("ruff")


@pytest.mark.parametrize("command", [("check",), ("format", "--check")], ids=["check", "format"])
def test_ruff(command):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, *command, *LINT_PATHS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`ruff {' '.join(command)}` failed (run `make lint`):\n{result.stdout[-4000:]}"
