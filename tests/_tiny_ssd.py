"""Tiny SSDs whose heads are 1x1 convolutions of the (normalised) image itself: outputs are affine in the
pixels, so tests can set them by hand or get distinct scores everywhere from random weights."""

import torch
from torch import nn

from odkd.models import SSD
from odkd.models.ssd import plain_head, separable_head
from odkd.preprocessing import IMAGENET
from odkd.priors import PriorLayout


class ImageAsSource(nn.Module):
    """A 'backbone' whose one source map is its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = (channels,)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


def tiny_ssd(
    size: int, num_classes: int, channels: int = 3, min_size: float = 2.0, max_size: float = 4.0, dfl_bins: int = 0
) -> SSD:
    """One ``size x size`` level with two priors per cell (squares of ``min_size`` and
    ``sqrt(min_size * max_size)`` pixels on a ``size``-pixel image) and 1x1 plain heads (a distribution box
    head with ``dfl_bins`` intervals per edge when > 0)."""
    layout = PriorLayout(size, (size,), (1,), (min_size,), (max_size,), ((),))
    conf = nn.ModuleList([plain_head(channels, 2 * num_classes, 1)])
    loc = nn.ModuleList([plain_head(channels, 2 * 4 * (dfl_bins + 1), 1)])
    return SSD(ImageAsSource(channels), conf, loc, num_classes, layout, preprocessing=IMAGENET, dfl_bins=dfl_bins)


class ConvSource(nn.Module):
    """A small convolutional backbone: conv 3x3 + BN + ReLU6, then the same with stride 2; one source map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        self.out_channels = (channels,)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(x)]


def conv_ssd(size: int, num_classes: int, channels: int = 8) -> SSD:
    """SSDLite in miniature: :class:`ConvSource` to a ``size / 2`` map and SSDLite's separable heads
    (depthwise 3x3 + BN + ReLU6, then a 1x1 predictor), two priors per cell. Six convolutions: two in the
    backbone, a depthwise and a 1x1 per head; only the two predictors are 1x1."""
    layout = PriorLayout(size, (size // 2,), (2,), (4.0,), (8.0,), ((),))
    conf = nn.ModuleList([separable_head(channels, 2 * num_classes)])
    loc = nn.ModuleList([separable_head(channels, 2 * 4)])
    return SSD(ConvSource(channels), conf, loc, num_classes, layout, preprocessing=IMAGENET)
