"""VGG16 backbones: SSD300's (conv4_3 + fc7 + 4 extras) and the lite-layout teacher's (fc7 + 5 extras).

The trunk keeps ssd.pytorch's (and torchvision's ``features``) layer indices: conv layers at
0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; pool3 (index 16) with ceil_mode so 75 -> 38; pool5
(index 30) 3x3/s1/p1; fc6 as a 3x3 conv with dilation 6 (index 31) and fc7 as a 1x1 conv (index 33).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["L2Norm", "VGGBackbone", "reduced_fc_state_dict", "vgg16_trunk"]

# conv4_3's ReLU is layer 22: the trunk up to and including it gives the 38x38 source of SSD300.
CONV4_3_END = 23
# (in, mid, out, stride, padding) of each extra block: 1x1 in->mid, 3x3 mid->out.
SSD300_EXTRAS = ((1024, 256, 512, 2, 1), (512, 128, 256, 2, 1), (256, 128, 256, 1, 0), (256, 128, 256, 1, 0))
LITE_EXTRAS = ((1024, 256, 512, 2, 1), (512, 128, 256, 2, 1)) + ((256, 128, 256, 2, 1),) * 3


def vgg16_trunk() -> nn.Sequential:
    """VGG16 conv1_1 .. conv5_3, pool5 3x3/s1, fc6 (3x3, dilation 6, 1024) and fc7 (1x1, 1024), with ReLUs."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    layers += [
        nn.MaxPool2d(3, 1, padding=1),
        nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, 1),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers)


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (initialised to 20)."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum of squares overflows fp16 for conv4_3 activations: normalise in float32.
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (x32 / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


def _extra_block(in_ch: int, mid: int, out: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out, 3, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


class VGGBackbone(nn.Module):
    """VGG16 trunk + extras; ``forward`` returns the source maps, one per prior level.

    ``use_conv4_3``: SSD300 takes conv4_3 (L2-normalised, 38x38) as its first source; the lite-layout
    teacher starts at fc7 (19x19).
    """

    def __init__(self, extras: tuple[tuple[int, int, int, int, int], ...], use_conv4_3: bool) -> None:
        super().__init__()
        self.vgg = vgg16_trunk()
        self.l2norm = L2Norm(512) if use_conv4_3 else None
        self.extras = nn.ModuleList(_extra_block(*spec) for spec in extras)

    @property
    def out_channels(self) -> list[int]:
        first = [512] if self.l2norm is not None else []
        return [*first, 1024] + [block[2].out_channels for block in self.extras]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sources = []
        x = self.vgg[:CONV4_3_END](x)
        if self.l2norm is not None:
            sources.append(self.l2norm(x))
        x = self.vgg[CONV4_3_END:](x)
        sources.append(x)
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources


def reduced_fc_state_dict(vgg16_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trunk weights (keys of :func:`vgg16_trunk`) from a torchvision ``vgg16`` ImageNet state dict.

    Conv layers are copied; fc6 (4096 x 512*7*7) and fc7 (4096 x 4096) become the 1024-channel fc6
    (3x3, dilated) and fc7 (1x1) convs by subsampling, the usual "reduced fc" conversion of the SSD
    paper: every 4th output (and, for fc7, input) unit, and every 3rd of fc6's 7x7 taps (0, 3, 6).
    """
    missing = [k for k in ("classifier.0.weight", "classifier.3.weight") if k not in vgg16_state]
    if missing:
        raise ValueError(f"not a torchvision vgg16 state dict: missing {missing}")
    state = {k[len("features.") :]: v for k, v in vgg16_state.items() if k.startswith("features.")}
    fc6_w = vgg16_state["classifier.0.weight"].view(4096, 512, 7, 7)
    state["31.weight"] = fc6_w[::4, :, ::3, ::3].clone()
    state["31.bias"] = vgg16_state["classifier.0.bias"][::4].clone()
    state["33.weight"] = vgg16_state["classifier.3.weight"][::4, ::4].reshape(1024, 1024, 1, 1).clone()
    state["33.bias"] = vgg16_state["classifier.3.bias"][::4].clone()
    return state
