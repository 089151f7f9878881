"""Saving and loading models: atomic writes, a self-describing model file, and :func:`load_model`, the one
way to get a model's weights from a file (a model file, a training checkpoint or a published checkpoint).

A model file holds what is needed to rebuild the model without a config: the architecture spec
(name, classes, width), the preprocessing its weights expect, and the state dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from odkd.files import atomic_write
from odkd.models import SSD, build_model
from odkd.preprocessing import Preprocessing

__all__ = [
    "ModelFileError",
    "atomic_save",
    "init_from_checkpoint",
    "load_model",
    "read_torch_file",
    "save_model",
]

MODEL_FORMAT = "odkd-model"
MODEL_FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`odkd.files.atomic_write`: a crash never leaves a truncated file at
    ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(model: SSD, path: str | os.PathLike) -> None:
    """Write ``model`` as a self-describing model file (atomically)."""
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "spec": dict(model.spec),
            "preprocessing": model.preprocessing.to_dict(),
            "class_names": list(model.class_names) if model.class_names else None,
            "state_dict": model.state_dict(),
        },
        path,
    )


class ModelFileError(ValueError):
    """A model or checkpoint file that does not load; the message names it, in one line."""


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (a file from elsewhere must not run code when loaded);
    FileNotFoundError if there is no file, :class:`ModelFileError` if it does not load (a truncated copy,
    a text file, a pickle of other objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here, with messages of many lines (or just "'101'")
        reason = str(err).strip().partition("\n")[0].partition(". ")[0][:200]
        raise ModelFileError(
            f"{path}: not a PyTorch file that loads: truncated, damaged or another kind of file "
            f"(torch.load: {type(err).__name__} {reason})"
        ) from None


def _odkd_weights(data: dict, path: Path) -> dict[str, torch.Tensor]:
    """The detector's weights from a model file or a training checkpoint (its EMA weights if it has them)."""
    if data.get("format") == MODEL_FORMAT:
        if data.get("version") != MODEL_FORMAT_VERSION:
            raise ValueError(f"{path}: model file version {data.get('version')} is not supported")
        return data["state_dict"]
    if data.get("format") == "odkd-train":
        ema = data.get("ema")
        if ema:
            if isinstance(ema.get("module"), dict):  # odkd.engine.ema.ModelEMA: {"module": weights, "updates": n}
                return ema["module"]
            # Before ModelEMA, torch's AveragedModel: "module.<key>" entries plus its n_averaged counter.
            return {k[len("module.") :]: v for k, v in ema.items() if k.startswith("module.")}
        return {k[len("model.") :]: v for k, v in data["task"].items() if k.startswith("model.")}
    raise ValueError(
        f"{path}: not an odkd model file. Published ssd.pytorch / qfgaohao checkpoints must be converted "
        f"first: python scripts/convert_checkpoint.py --source ssd.pytorch|qfgaohao --input {path} --output OUT"
    )


def load_model(path: str | os.PathLike, source: str = "odkd", *, map_location: str | torch.device = "cpu") -> SSD:
    """The model whose weights the file at ``path`` holds.

    ``source`` "odkd": a model file of :func:`save_model` or the detector of a training checkpoint
    (weights, classes and their names, width and preprocessing); a published format of :mod:`odkd.convert`
    ("ssd.pytorch", "qfgaohao"): imported with the preprocessing its weights expect. FileNotFoundError
    without a file, ValueError (naming the file) for one that does not load or fit."""
    path = Path(path)
    data = read_torch_file(path, map_location)
    if source != "odkd":
        from odkd.convert import import_checkpoint

        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: not a state dict but a {type(data).__name__}")
        try:
            return import_checkpoint(data, source)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an odkd model file")
    state = _odkd_weights(data, path)
    spec = dict(data["spec"])
    model = build_model(spec.pop("name"), **spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {model.arch}: {err}") from err
    model.preprocessing = Preprocessing(**data["preprocessing"])
    model.class_names = data.get("class_names")  # absent in files of odkd before class names were saved
    return model


def init_from_checkpoint(model: SSD, path: str | os.PathLike, source: str = "odkd") -> tuple[int, int]:
    """Copy into ``model`` every weight of the checkpoint at ``path`` whose name and shape match.

    For fine-tuning: e.g. an SSD300 checkpoint into the lite-layout teacher fills the VGG trunk and the
    four extras of equal shape, and leaves the rest as initialised. ``source``: "odkd" (model file or
    training checkpoint), or a published format of :mod:`odkd.convert` ("ssd.pytorch", "qfgaohao").
    Returns (tensors copied, tensors of ``model`` left as they were).
    """
    state = load_model(path, source).state_dict()
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"{path}: no weight fits {model.arch} (names or shapes all differ)")
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own) - len(matched)
