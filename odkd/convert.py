"""Import the published SSD checkpoints users already own.

- ``"ssd.pytorch"``: amdegroot/ssd.pytorch VGG16-SSD300 (``ssd300_mAP_77.43_v2.pth``, 77.43 mAP)
  -> ``vgg16_ssd300``; its input is RGB minus (123, 117, 104), no std scaling.
- ``"qfgaohao"``: qfgaohao/pytorch-ssd MobileNetV2-SSDLite (``mb2-ssd-lite-mp-0_686.pth``, 68.6 mAP)
  -> ``mobilenetv2_ssdlite300``; its input is RGB ``(x - 127) / 128``.

Both use the same prior order as ours, so the imported model computes the original's loc and conf
prior for prior. Every checkpoint key must map onto a model key of the same shape and every model
key must be filled; otherwise the error lists what is missing, unexpected or misshapen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from odkd.class_names import VOC_CLASSES
from odkd.models import SSD, build_model
from odkd.preprocessing import Preprocessing

__all__ = ["SOURCES", "import_checkpoint", "unwrap_state_dict"]

# torchvision's InvertedResidual nests (conv, BN) pairs where the two originals have flat Sequentials.
_EXPANDING_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}  # expand ratio != 1
_FIRST_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # block 1, expand ratio 1: dw, BN, pw, BN
_LITE_HEAD = {"0": "intermediate.0", "1": "intermediate.1", "3": "predictor"}


def _ssd_pytorch_key(key: str) -> str | None:
    if m := re.fullmatch(r"vgg\.(\d+)\.(weight|bias)", key):
        return f"backbone.vgg.{m[1]}.{m[2]}"
    if key == "L2Norm.weight":
        return "backbone.l2norm.weight"
    if m := re.fullmatch(r"extras\.(\d+)\.(weight|bias)", key):
        # Flat list of 8 convs -> 4 blocks of (1x1 conv, ReLU, 3x3 conv, ReLU).
        block, second = divmod(int(m[1]), 2)
        return f"backbone.extras.{block}.{2 * second}.{m[2]}"
    if m := re.fullmatch(r"(loc|conf)\.(\d+)\.(weight|bias)", key):
        return f"{m[1]}_heads.{m[2]}.predictor.{m[3]}"
    return None


def _qfgaohao_key(key: str) -> str | None:
    if m := re.fullmatch(r"base_net\.(0|18)\.([01])\.(\w+)", key):  # first conv and last 1x1: (conv, BN, ReLU6)
        return f"backbone.features.{m[1]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"base_net\.(\d+)\.conv\.(\d)\.(\w+)", key):
        table = _FIRST_BLOCK if m[1] == "1" else _EXPANDING_BLOCK
        return f"backbone.features.{m[1]}.conv.{table[m[2]]}.{m[3]}" if m[2] in table else None
    if m := re.fullmatch(r"extras\.(\d+)\.conv\.(\d)\.(\w+)", key):
        return f"backbone.extras.{m[1]}.conv.{_EXPANDING_BLOCK[m[2]]}.{m[3]}" if m[2] in _EXPANDING_BLOCK else None
    if m := re.fullmatch(r"(classification|regression)_headers\.(\d+)\.(\d)\.(\w+)", key):
        head = "conf" if m[1] == "classification" else "loc"
        return f"{head}_heads.{m[2]}.{_LITE_HEAD[m[3]]}.{m[4]}" if m[3] in _LITE_HEAD else None
    if m := re.fullmatch(r"(classification|regression)_headers\.(\d+)\.(weight|bias)", key):  # last level: 1x1 conv
        head = "conf" if m[1] == "classification" else "loc"
        return f"{head}_heads.{m[2]}.predictor.{m[3]}"
    return None


class _Source(NamedTuple):
    arch: str  # our architecture
    rename: Callable[[str], str | None]  # checkpoint key -> our key (None: no such layer in ours)
    class_key: str  # a conf-head weight whose output channels = priors per cell * classes
    first_level_anchors: int  # priors per cell of that head
    preprocessing: Preprocessing


SOURCES: dict[str, _Source] = {
    "ssd.pytorch": _Source(
        "vgg16_ssd300",
        _ssd_pytorch_key,
        "conf.0.weight",
        4,
        Preprocessing(mean=(123.0, 117.0, 104.0), std=(1.0, 1.0, 1.0)),
    ),
    "qfgaohao": _Source(
        "mobilenetv2_ssdlite300",
        _qfgaohao_key,
        "classification_headers.0.3.weight",
        6,
        Preprocessing(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    ),
}


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: accepts a bare state dict or one under ``state_dict`` /
    ``model``, and strips the ``module.`` prefix that (Distributed)DataParallel adds."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict: entries {bad[:5]} are not tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def import_checkpoint(state_dict: Mapping, source: str) -> SSD:
    """Build our model from a published checkpoint's state dict (``source``: "ssd.pytorch" or "qfgaohao").

    The model comes with the preprocessing those weights expect (``model.preprocessing``).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; known sources: {', '.join(SOURCES)}")
    spec = SOURCES[source]
    state = unwrap_state_dict(state_dict)
    if spec.class_key not in state:
        raise ValueError(f"not a {source} checkpoint: it has no {spec.class_key!r}")
    num_classes, rest = divmod(state[spec.class_key].shape[0], spec.first_level_anchors)
    if rest:
        raise ValueError(
            f"{source}: {spec.class_key} has {state[spec.class_key].shape[0]} outputs, not a "
            f"multiple of {spec.first_level_anchors} priors per cell"
        )
    model = build_model(spec.arch, num_classes=num_classes)
    target = model.state_dict()

    renamed, unexpected, misshapen = {}, [], []
    for key, value in state.items():
        new_key = spec.rename(key)
        if new_key is None or new_key not in target:
            unexpected.append(key)
            continue
        if value.shape != target[new_key].shape:
            misshapen.append(f"{key} {tuple(value.shape)} (model {new_key} {tuple(target[new_key].shape)})")
        renamed[new_key] = value
    for key in target:  # checkpoints of PyTorch < 0.4.1 have no BatchNorm step counts: 0, as BatchNorm loads them
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros_like(target[key])
    missing = [k for k in target if k not in renamed]
    if unexpected or misshapen or missing:
        problems = [
            f"unexpected keys: {_list(unexpected)}" if unexpected else "",
            f"wrong shapes: {_list(misshapen)}" if misshapen else "",
            f"missing model keys: {_list(missing)}" if missing else "",
        ]
        raise ValueError(
            f"cannot import this {source} checkpoint into {spec.arch}:\n  " + "\n  ".join(p for p in problems if p)
        )
    model.load_state_dict(renamed)  # strict: every key checked above
    model.preprocessing = spec.preprocessing
    if num_classes == len(VOC_CLASSES) + 1:  # both projects publish VOC models, in the devkit's class order
        model.class_names = VOC_CLASSES
    return model
