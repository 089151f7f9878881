"""How an image is normalised before a network: :class:`Preprocessing`, and the ImageNet numbers odkd's
models use (:data:`IMAGENET`). It imports nothing of odkd, so the data pipeline, model files and
exports share it without loading the models."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["IMAGENET", "Preprocessing"]


@dataclass(frozen=True)
class Preprocessing:
    """How an image must be normalised before the network: ``(pixel - mean) / std`` per channel.

    ``mean`` and ``std`` are in 0-255 pixel units, listed in the order of ``channels`` (the channel
    order the network's first convolution expects).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: str = "RGB"

    def __post_init__(self) -> None:
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"preprocessing channels must be 'RGB' or 'BGR', got {self.channels!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocessing needs 3 means and 3 positive stds, got {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        return asdict(self)

    def normalize(
        self,
        images: torch.Tensor,
        channels: str = "RGB",
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels in 0-255, channel order ``channels`` -> network input (float).

        ``mean`` / ``std``: these numbers as ``(1, 3, 1, 1)`` tensors already on the images' device, when
        the caller keeps them there (:meth:`odkd.models.SSD.normalize`); otherwise they are made here, a copy from the
        host at every call."""
        if channels != self.channels:
            images = images.flip(1)
        if mean is None or std is None:
            mean = images.new_tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = images.new_tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (images.float() - mean) / std


# torchvision's ImageNet weights: RGB in [0, 1], mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
IMAGENET = Preprocessing(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
