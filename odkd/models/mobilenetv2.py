"""MobileNetV2 backbone of SSDLite (as qfgaohao's mb2-ssd-lite).

The trunk is torchvision's ``mobilenet_v2().features`` (so its ImageNet weights load as they are).
Sources: the expansion 1x1 conv output of inverted-residual block 14 (576 channels, 19x19 at 300 px),
the final 1x1-1280 conv (10x10; 1280 x width above width 1), then four inverted-residual extras 1280->512 (expand 0.2),
512->256 (0.25), 256->256 (0.5), 256->64 (0.25), all stride 2 (5, 3, 2, 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

__all__ = ["MobileNetV2Backbone"]

# Block 14 is the first stride-2 block after the 19x19 stage; its expansion output is source 0.
SPLIT_BLOCK = 14
EXTRAS = ((512, 0.2), (256, 0.25), (256, 0.5), (64, 0.25))  # (out channels, expand ratio), stride 2


class MobileNetV2Backbone(nn.Module):
    """``forward(images) -> [19x19 expansion, 10x10 final conv, 5x5, 3x3, 2x2, 1x1]`` at 300 px."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.features = mobilenet_v2(width_mult=width_mult).features
        inputs = [self.features[-1][0].out_channels] + [out for out, _ in EXTRAS[:-1]]
        self.extras = nn.ModuleList(
            InvertedResidual(i, o, stride=2, expand_ratio=e) for i, (o, e) in zip(inputs, EXTRAS, strict=True)
        )
        if self.features[SPLIT_BLOCK].use_res_connect:  # never true for torchvision's V2; guards the split
            raise RuntimeError("MobileNetV2 block 14 has a residual connection; the source split needs none")

    @property
    def out_channels(self) -> list[int]:
        expansion = self.features[SPLIT_BLOCK].conv[0][0].out_channels
        return [expansion, self.features[-1][0].out_channels] + [e.out_channels for e in self.extras]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.features[:SPLIT_BLOCK](x)
        block = self.features[SPLIT_BLOCK].conv
        expanded = block[0](x)
        x = self.features[SPLIT_BLOCK + 1 :](block[1:](expanded))
        sources = [expanded, x]
        for extra in self.extras:
            x = extra(x)
            sources.append(x)
        return sources
