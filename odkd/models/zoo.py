"""The named architectures and :func:`build_model`.

| name | backbone | heads | priors | params (21 classes) |
|---|---|---|---|---|
| ``vgg16_ssd300`` | VGG16, conv4_3 + fc7 + 4 extras | 3x3 conv | ssd300, 8732 | 26,285,486 |
| ``vgg16_lite300`` | VGG16, fc7 + 5 extras | SSDLite separable | lite300, 3000 | 23,711,684 |
| ``mobilenetv2_ssdlite300`` | MobileNetV2 (x width) | SSDLite separable | lite300, 3000 | 3,388,228 |
| ``mobilenetv2_ssdlite320`` | MobileNetV2 (x width) | SSDLite separable | lite320, 3234 | 3,388,228 |
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from odkd.box_distribution import DEFAULT_MAX_EDGE
from odkd.models.mobilenetv2 import MobileNetV2Backbone
from odkd.models.pretrained import load_backbone_state
from odkd.models.ssd import SSD, PredictionHead, plain_head, separable_head
from odkd.models.vgg import LITE_EXTRAS, SSD300_EXTRAS, VGGBackbone, reduced_fc_state_dict
from odkd.preprocessing import IMAGENET
from odkd.priors import LAYOUTS

__all__ = ["MODELS", "build_model", "init_background_prior"]

Pretrained = str | os.PathLike | None


def _heads(
    make: Callable[[int, int], PredictionHead], channels: Sequence[int], anchors: Sequence[int], per_anchor: int
) -> nn.ModuleList:
    return nn.ModuleList(make(c, a * per_anchor) for c, a in zip(channels, anchors, strict=True))


def _lite_heads(channels: Sequence[int], anchors: Sequence[int], per_anchor: int) -> nn.ModuleList:
    """SSDLite heads: separable on every level but the last (a 1x1 map), which gets a plain 1x1 conv."""
    heads = _heads(separable_head, channels[:-1], anchors[:-1], per_anchor)
    heads.append(plain_head(channels[-1], anchors[-1] * per_anchor, kernel_size=1))
    return heads


def _xavier_init(modules: Sequence[nn.Module]) -> None:
    """Xavier-uniform convs with zero bias for the parts no pretrained weights cover (extras, heads)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _init_edge_bias(loc_heads: nn.ModuleList, dfl_bins: int) -> None:
    """Start a distribution head at the priors themselves (every edge at half the prior size, as a plain
    head starts at loc = 0): Gaussian bin logits around 0.5 instead of a flat distribution (mean 1.0)."""
    if not dfl_bins:
        return
    values = torch.linspace(0.0, DEFAULT_MAX_EDGE, dfl_bins + 1)
    logits = -0.5 * ((values - 0.5) / 0.25) ** 2
    for head in loc_heads:
        bias = head.predictor.bias
        with torch.no_grad():
            bias.copy_(logits.repeat(bias.numel() // len(logits)))


def init_background_prior(model: SSD, background_prob: float) -> None:
    """Set the class heads' last biases so that every prior starts with ``background_prob`` (in (0, 1))
    of background and the rest shared by the C - 1 classes (the conv weights' share of the logits aside).

    RetinaNet's prior-probability init (Lin et al. 2017) for a softmax head: the background logit's bias
    is ``log(p (C - 1) / (1 - p))``, the classes' 0. A from-scratch detector then starts where it will be
    on nearly every prior, and its first steps learn the objects instead of background (SSD starts at 1/C
    for everything; docs/BENCHMARKS.md, "The CPU regime", measures what this changes)."""
    if not 0 < background_prob < 1:
        raise ValueError(f"background_prob must be in (0, 1), got {background_prob}")
    logit = math.log(background_prob * (model.num_classes - 1) / (1 - background_prob))
    with torch.no_grad():
        for head in model.conf_heads:
            bias = head.predictor.bias.view(-1, model.num_classes)  # (A, C): anchor-major, as _flatten reads
            bias.zero_()
            bias[:, 0] = logit


def _vgg_ssd(
    name: str, layout: str, lite: bool, num_classes: int, pretrained_backbone: Pretrained, dfl_bins: int
) -> SSD:
    backbone = VGGBackbone(LITE_EXTRAS if lite else SSD300_EXTRAS, use_conv4_3=not lite)
    anchors = LAYOUTS[layout].boxes_per_location
    if lite:
        conf_heads = _lite_heads(backbone.out_channels, anchors, num_classes)
        loc_heads = _lite_heads(backbone.out_channels, anchors, 4 * (dfl_bins + 1))
    else:
        conf_heads = _heads(plain_head, backbone.out_channels, anchors, num_classes)
        loc_heads = _heads(plain_head, backbone.out_channels, anchors, 4 * (dfl_bins + 1))
    _xavier_init([backbone.extras, conf_heads, loc_heads])
    _init_edge_bias(loc_heads, dfl_bins)
    if pretrained_backbone is None:
        for m in backbone.vgg.modules():
            if isinstance(m, nn.Conv2d):  # as torchvision's VGG: trainable from scratch, if slowly
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    else:
        state = reduced_fc_state_dict(load_backbone_state("vgg16", pretrained_backbone))
        backbone.vgg.load_state_dict(state)
    return SSD(backbone, conf_heads, loc_heads, num_classes, layout, IMAGENET, {"name": name}, dfl_bins)


def vgg16_ssd300(num_classes: int = 21, pretrained_backbone: Pretrained = None, dfl_bins: int = 0) -> SSD:
    """VGG16-SSD300 as ssd.pytorch / the SSD paper (the standard teacher)."""
    return _vgg_ssd("vgg16_ssd300", "ssd300", False, num_classes, pretrained_backbone, dfl_bins)


def vgg16_lite300(num_classes: int = 21, pretrained_backbone: Pretrained = None, dfl_bins: int = 0) -> SSD:
    """The lite-layout teacher: VGG16 trunk, five extras and SSDLite heads on the student's 3000 priors."""
    return _vgg_ssd("vgg16_lite300", "lite300", True, num_classes, pretrained_backbone, dfl_bins)


def _mobilenetv2_ssdlite(
    name: str, layout: str, num_classes: int, pretrained_backbone: Pretrained, width_mult: float, dfl_bins: int
) -> SSD:
    backbone = MobileNetV2Backbone(width_mult)
    anchors = LAYOUTS[layout].boxes_per_location
    conf_heads = _lite_heads(backbone.out_channels, anchors, num_classes)
    loc_heads = _lite_heads(backbone.out_channels, anchors, 4 * (dfl_bins + 1))
    _xavier_init([backbone.extras, conf_heads, loc_heads])
    _init_edge_bias(loc_heads, dfl_bins)
    if pretrained_backbone is not None:
        if str(pretrained_backbone) == "imagenet" and width_mult != 1.0:
            raise ValueError(
                f"torchvision has ImageNet weights for MobileNetV2 at width 1.0 only, not {width_mult}; "
                "pass a file with weights of that width or train from scratch"
            )
        state = load_backbone_state("mobilenet_v2", pretrained_backbone)
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        backbone.features.load_state_dict(features)
    spec = {"name": name, "width_mult": width_mult}
    return SSD(backbone, conf_heads, loc_heads, num_classes, layout, IMAGENET, spec, dfl_bins)


def mobilenetv2_ssdlite300(
    num_classes: int = 21, pretrained_backbone: Pretrained = None, width_mult: float = 1.0, dfl_bins: int = 0
) -> SSD:
    """MobileNetV2-SSDLite on 300 px (qfgaohao mb2-ssd-lite), the student."""
    return _mobilenetv2_ssdlite(
        "mobilenetv2_ssdlite300", "lite300", num_classes, pretrained_backbone, width_mult, dfl_bins
    )


def mobilenetv2_ssdlite320(
    num_classes: int = 21, pretrained_backbone: Pretrained = None, width_mult: float = 1.0, dfl_bins: int = 0
) -> SSD:
    """MobileNetV2-SSDLite on 320 px: the 300 px model's architecture with a 20x20 first grid. lufficc/SSD's
    320 px model differs (its first head reads the 96-channel block output, its coarse priors sit off-grid),
    so its weights and published mAP do not carry over."""
    return _mobilenetv2_ssdlite(
        "mobilenetv2_ssdlite320", "lite320", num_classes, pretrained_backbone, width_mult, dfl_bins
    )


MODELS: dict[str, Callable[..., SSD]] = {
    "vgg16_ssd300": vgg16_ssd300,
    "vgg16_lite300": vgg16_lite300,
    "mobilenetv2_ssdlite300": mobilenetv2_ssdlite300,
    "mobilenetv2_ssdlite320": mobilenetv2_ssdlite320,
}


def build_model(
    name: str,
    num_classes: int = 21,
    pretrained_backbone: Pretrained = None,
    width_mult: float = 1.0,
    dfl_bins: int = 0,
) -> SSD:
    """Build a named model. ``pretrained_backbone``: None (random init), ``"imagenet"`` (torchvision's
    weights) or a path to a local copy of them. ``width_mult`` (0.5, 0.75, 1.0, ...) is for MobileNetV2.
    ``dfl_bins`` > 0 gives a distribution (DFL) box head with that many bin intervals per edge (GFL: 16)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if name.startswith("mobilenetv2"):
        model = MODELS[name](num_classes, pretrained_backbone, width_mult, dfl_bins)
    elif width_mult != 1.0:
        raise ValueError(f"{name} has no width multiplier (got width_mult={width_mult})")
    else:
        model = MODELS[name](num_classes, pretrained_backbone, dfl_bins)
    return model
