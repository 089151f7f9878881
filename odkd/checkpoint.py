"""Saving and loading models: atomic writes, and a self-describing model file.

A model file holds what is needed to rebuild the model without a config: the architecture spec
(name, classes, width), the preprocessing its weights expect, and the state dict.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from odkd.models import SSD, Preprocessing, build_model

__all__ = ["atomic_save", "load_model", "save_model"]

MODEL_FORMAT = "odkd-model"
MODEL_FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a
    truncated file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: SSD, path: str | os.PathLike) -> None:
    """Write ``model`` as a self-describing model file (atomically)."""
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "spec": dict(model.spec),
            "preprocessing": model.preprocessing.to_dict(),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SSD:
    """Rebuild a model saved by :func:`save_model` (weights, classes, width and preprocessing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"{path}: not a readable PyTorch file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path}: not an odkd model file. Published ssd.pytorch / qfgaohao checkpoints must be converted "
            f"first: python scripts/convert_checkpoint.py --source ssd.pytorch|qfgaohao --input {path} --output OUT"
        )
    if data.get("version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: model file version {data.get('version')} is not supported")
    spec = dict(data["spec"])
    model = build_model(spec.pop("name"), **spec)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {model.arch}: {err}") from err
    model.preprocessing = Preprocessing(**data["preprocessing"])
    return model
