"""Wall-clock timing for the benchmarks, and the names of the devices they ran on."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from odkd.device import select_device

__all__ = ["benchmark_devices", "cpu_name", "device_name", "interleaved_ms", "time_ms"]


def benchmark_devices(requested: str) -> list[torch.device]:
    """``"all"``: the CPU, and CUDA when there is a GPU; else the one device asked for (ValueError for CUDA
    without a GPU: :func:`odkd.device.select_device`)."""
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [select_device(requested)]


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``iters`` calls after ``warmup`` (CUDA synchronised
    around each call, so that queued kernels count)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function in milliseconds, the functions called in turn at every iteration
    so that a load that comes and goes on the machine slows them alike and their ratios hold."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_name() -> str:
    """The CPU's model name (lscpu's), else what Python's platform module says."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's thread count and processor."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
