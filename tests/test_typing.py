"""The library's typed API stays honest: mypy --strict over dtx/ and
rendezvous/ (the configuration is in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="needs mypy (pip install -e '.[test]' brings it)")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "dtx", "rendezvous"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
