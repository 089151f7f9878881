"""Size, arithmetic and inference latency of the model zoo's architectures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from odkd.bench.timing import time_ms
from odkd.models import build_model

__all__ = ["ModelProfile", "count_gmacs", "inference_ms", "profile_model"]


@dataclass(frozen=True)
class ModelProfile:
    """Parameters at 21 classes, GMACs of one forward pass on one image, and per ``(device, batch)`` the
    median milliseconds of inference per image."""

    name: str
    params: int
    gmacs: float
    ms_per_image: dict[tuple[torch.device, int], float]


def count_gmacs(model: torch.nn.Module, image_size: int) -> float:
    """Multiply-accumulates of one forward pass on one image, in billions (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 2e9


def inference_ms(model: torch.nn.Module, device: torch.device, batch: int, iters: int, warmup: int) -> float:
    """Median ms per image of inference at ``batch`` on ``device`` (where ``model`` is); CUDA runs bf16
    autocast + channels_last."""
    size = model.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    return time_ms(forward, device, iters, warmup) / batch


def profile_model(
    name: str, devices: Sequence[torch.device], batches: Sequence[int], iters: int, warmup: int
) -> ModelProfile:
    """:class:`ModelProfile` of the architecture ``name`` (random weights, 21 classes)."""
    model = build_model(name, num_classes=21).eval()
    params = sum(p.numel() for p in model.parameters())
    gmacs = count_gmacs(model, model.image_size)
    latency = {}
    for device in devices:
        model = model.to(device)
        latency.update({(device, batch): inference_ms(model, device, batch, iters, warmup) for batch in batches})
    return ModelProfile(name, params, gmacs, latency)
