"""Accuracy and wall time of the CPU demo trained to convergence."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from odkd.config import Config, load_config
from odkd.engine import TrainResult, read_metrics
from odkd.engine.build import run_training

__all__ = ["DemoRun", "train_demo"]


@dataclass(frozen=True)
class DemoRun:
    """The run's config and result, its wall time in minutes, and its mAP (a fraction) by iteration."""

    cfg: Config
    result: TrainResult
    minutes: float
    map_curve: list[tuple[int, float]]


def train_demo(
    config: Path, iters: int, eval_every: int, output_dir: str, overrides: Sequence[str], cpu: bool
) -> DemoRun:
    """Train ``config`` for ``iters`` iterations into ``output_dir`` (overwritten), evaluating every
    ``eval_every`` and checkpointing at the end; ``overrides`` after those; on the CPU if ``cpu``, else
    on CUDA when available."""
    schedule = [
        f"optim.max_iters={iters}",
        f"train.eval_every={eval_every}",
        f"train.output_dir={output_dir}",
        f"train.checkpoint_every={iters}",
    ]
    cfg = load_config(config, [*schedule, *overrides])
    start = time.perf_counter()
    result, _ = run_training(cfg, device="cpu" if cpu else None, progress=False, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    curve = [(r["iter"], r["mAP"]) for r in read_metrics(output_dir) if "mAP" in r]
    return DemoRun(cfg, result, minutes, curve)
