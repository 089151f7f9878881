"""Shared test helpers."""

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist runs the suite in one process per core (setup.cfg: -n auto): each process, and the scripts
# the tests start, then computes on its share of the cores instead of all of them, as one process would.
# Set here, before any test module imports torch, which reads it once.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, share))


def _run(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, f"scripts/{name}", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_script():
    """Run ``python scripts/<name> args...`` from the repository root; returns the CompletedProcess."""
    return _run


@pytest.fixture
def run_scripts():
    """Run several ``(name, *args)`` scripts at once; returns their CompletedProcesses in order. Each spends
    seconds importing torch before it does anything: side by side they share the cores instead of queueing."""

    def run(*calls: Sequence, timeout: int = 300) -> list[subprocess.CompletedProcess]:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda call: _run(*call, timeout=timeout), calls))

    return run
