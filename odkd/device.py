"""Which device a script runs on."""

from __future__ import annotations

import torch

__all__ = ["select_device"]


def select_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cuda", "cuda:1", "cpu") as a device, or with None CUDA when there is a GPU, else the
    CPU. ValueError when CUDA is asked for on a machine without a CUDA device: torch would fail later,
    deep inside (a division by zero GPUs, a driver assertion)."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ValueError(f"--device {requested}: no CUDA device is available (PyTorch {torch.__version__}, {build})")
    return device
