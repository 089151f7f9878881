"""Shared test helpers."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_script():
    """Run ``python scripts/<name> args...`` from the repository root; returns the CompletedProcess."""

    def run(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        command = [sys.executable, f"scripts/{name}", *map(str, args)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run
