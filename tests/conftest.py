"""Shared test helpers."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, to call in-process (a subprocess spends seconds importing torch)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_script():
    """Run ``python scripts/<name> args...`` from the repository root; returns the CompletedProcess."""

    def run(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        command = [sys.executable, f"scripts/{name}", *map(str, args)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run
