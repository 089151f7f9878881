"""ImageNet backbone weights through torchvision's weights API, or from a local file.

Our machines (and many clusters) are offline: when the download fails, the error says which file to
fetch and where to put it so that torchvision finds it next time, or how to pass it directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.models import MobileNet_V2_Weights, VGG16_Weights, WeightsEnum

__all__ = ["IMAGENET_WEIGHTS", "load_backbone_state"]

IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    "vgg16": VGG16_Weights.IMAGENET1K_V1,
    "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1,
}


def load_backbone_state(backbone: str, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The torchvision ImageNet state dict of ``backbone`` ("vgg16" or "mobilenet_v2").

    ``source`` is ``"imagenet"`` (torchvision's weights API: the torch hub cache, else a download) or
    the path of a local copy of the same file.
    """
    weights = IMAGENET_WEIGHTS[backbone]
    if str(source) != "imagenet":
        return _load_file(Path(source))
    try:
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a truncated file a RuntimeError
        file_name = weights.url.rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        raise RuntimeError(
            f"could not get the ImageNet weights of {backbone} ({err}).\n"
            f"Fetch {weights.url} on a machine with internet access and either place it at {cache} "
            f"(torchvision's cache; TORCH_HOME moves it) or pass its path as pretrained_backbone."
        ) from err


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"{path}: not a readable PyTorch weights file ({err})") from err
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state
