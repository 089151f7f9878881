"""The SSD detector: a backbone that yields one feature map per prior level, and per-level heads.

Every model in odkd is an :class:`SSD`; only the backbone and the head type differ. The forward pass
returns an :class:`SSDOutput` that carries, besides the flattened predictions, every intermediate the
distillers need (source features, head intermediates, per-level head output maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from odkd.box_distribution import DEFAULT_MAX_EDGE, edges_to_loc, expected_edges
from odkd.preprocessing import Preprocessing
from odkd.priors import PriorLayout, build_priors, get_layout

__all__ = ["SSD", "PredictionHead", "SSDOutput", "plain_head", "separable_head"]


class SSDOutput(NamedTuple):
    """Everything one forward pass produces. ``B`` batch, ``P`` priors, ``C`` classes (with background),
    per level ``k``: ``A_k`` priors per cell on an ``H_k x W_k`` map with ``D_k`` channels."""

    loc: torch.Tensor  # (B, P, 4) box regressions, encoded against the priors
    conf: torch.Tensor  # (B, P, C) raw class logits
    features: list[torch.Tensor]  # per level (B, D_k, H_k, W_k): the source maps fed to the heads
    loc_maps: list[torch.Tensor]  # per level (B, A_k*4, H_k, W_k): loc head outputs before flattening
    conf_maps: list[torch.Tensor]  # per level (B, A_k*C, H_k, W_k): conf head outputs before flattening
    loc_intermediates: list[torch.Tensor]  # per level: the loc head's pre-activation intermediate (PredictionHead)
    conf_intermediates: list[torch.Tensor]  # per level: the conf head's pre-activation intermediate
    # (B, P, 4, n+1) bin logits of the edges (l, t, r, b) for a distribution (DFL) box head, else None
    loc_dist: torch.Tensor | None = None


class PredictionHead(nn.Module):
    """One level of a head: ``predictor(activation(intermediate(x)))``.

    For SSDLite's separable heads ``intermediate`` is the depthwise 3x3 conv + BN, ``activation`` ReLU6 and
    ``predictor`` the pointwise 1x1 conv; for plain heads ``intermediate`` and ``activation`` are the identity
    and ``predictor`` the whole conv. The split is what CrossKD needs: it feeds one model's pre-activation
    intermediates, standardised, through another's activation and predictor.
    """

    def __init__(self, intermediate: nn.Module, predictor: nn.Conv2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.activation = activation if activation is not None else nn.Identity()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> (the pre-activation intermediate, the head's output map)."""
        mid = self.intermediate(x)
        return mid, self.predictor(self.activation(mid))


def plain_head(in_channels: int, out_channels: int, kernel_size: int = 3) -> PredictionHead:
    """A single conv (SSD300's 3x3 heads, or SSDLite's last-level 1x1)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return PredictionHead(nn.Identity(), conv)


def separable_head(in_channels: int, out_channels: int) -> PredictionHead:
    """SSDLite head: depthwise 3x3 (with bias, as in qfgaohao's mb2-ssd-lite) + BN + ReLU6, then 1x1."""
    depthwise = nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
        nn.BatchNorm2d(in_channels),
    )
    # Not in place: the pre-activation map is an output of the head (CrossKD reads it).
    return PredictionHead(depthwise, nn.Conv2d(in_channels, out_channels, 1), nn.ReLU6())


def _flatten(maps: Sequence[torch.Tensor], last_dim: int) -> torch.Tensor:
    """Per-level ``(B, A*last_dim, H, W)`` -> ``(B, sum H*W*A, last_dim)`` in prior order (cells row by
    row, then the A priors of a cell)."""
    batch = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, last_dim) for m in maps], dim=1)


class SSD(nn.Module):
    """An SSD detector.

    Args:
        backbone: module mapping images ``(B, 3, S, S)`` to the list of per-level source maps.
        conf_heads / loc_heads: one :class:`PredictionHead` per level.
        num_classes: classes including background.
        layout: the prior layout the heads predict for (its name or a :class:`PriorLayout`).
        preprocessing: what the weights expect as input.
        spec: ``name`` (the registry name of the architecture) and any other :func:`odkd.models.build_model`
            arguments, so a checkpoint can rebuild the model; ``num_classes`` is added here.
        dfl_bins: 0 for the usual box head (4 offsets per prior); ``n`` > 0 for a distribution (DFL) head
            whose loc heads emit ``4 (n + 1)`` bin logits per prior (:mod:`odkd.box_distribution`);
            ``loc`` is then their expectation, encoded as usual.
    """

    def __init__(
        self,
        backbone: nn.Module,
        conf_heads: nn.ModuleList,
        loc_heads: nn.ModuleList,
        num_classes: int,
        layout: str | PriorLayout,
        preprocessing: Preprocessing,
        spec: dict | None = None,
        dfl_bins: int = 0,
    ) -> None:
        super().__init__()
        if dfl_bins < 0 or dfl_bins == 1:
            raise ValueError(f"dfl_bins must be 0 (plain box head) or >= 2, got {dfl_bins}")
        self.backbone = backbone
        self.conf_heads = conf_heads
        self.loc_heads = loc_heads
        self.num_classes = num_classes
        self.layout = get_layout(layout)
        # The preprocessing's mean and std as device tensors, kept in step with it by its setter: tensors
        # built from its numbers at every call would be a blocking copy to the GPU in every step.
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.preprocessing = preprocessing
        self.spec = {**(spec or {"name": "custom"}), "num_classes": num_classes}
        if dfl_bins:  # plain heads keep the spec (and so the model files) they always had
            self.spec["dfl_bins"] = dfl_bins
        self.dfl_bins, self.dfl_max_edge = dfl_bins, DEFAULT_MAX_EDGE
        self._class_names: tuple[str, ...] | None = None
        # Not persistent: priors are derived from the layout and need not travel in checkpoints.
        self.register_buffer("priors", build_priors(self.layout), persistent=False)

    @property
    def arch(self) -> str:
        return self.spec["name"]

    @property
    def preprocessing(self) -> Preprocessing:
        """What the weights expect as input (saved in model files)."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, preprocessing: Preprocessing) -> None:
        self._preprocessing = preprocessing
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
            self.pixel_std.copy_(torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB pixels in 0-255 (uint8 or float) on the model's device -> network input:
        :attr:`preprocessing` applied with the model's own tensors (no copy from the host)."""
        return self.preprocessing.normalize(images, mean=self.pixel_mean, std=self.pixel_std)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of classes 1..C-1 when known (set by training, saved in model files), else None."""
        return self._class_names

    @class_names.setter
    def class_names(self, names: tuple[str, ...] | list[str] | None) -> None:
        if names is not None and len(names) != self.num_classes - 1:
            raise ValueError(f"{self.arch} has {self.num_classes - 1} object classes, got {len(names)} names")
        self._class_names = None if names is None else tuple(names)

    @property
    def label_names(self) -> list[str]:
        """Names to show for labels 1..C-1: :attr:`class_names`, or ``class1``, ``class2``... when unknown."""
        return list(self.class_names or (f"class{i}" for i in range(1, self.num_classes)))

    @property
    def image_size(self) -> int:
        return self.layout.image_size

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the per-level source maps."""
        return list(self.backbone.out_channels)

    def predictions(
        self, conf_maps: Sequence[torch.Tensor], loc_maps: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-level head output maps -> ``loc`` (B, P, 4), ``conf`` (B, P, C) and, for a distribution head,
        the edge bin logits (B, P, 4, n + 1) (else None). CrossKD calls it on maps of its own making."""
        conf = _flatten(conf_maps, self.num_classes)
        if not self.dfl_bins:
            return _flatten(loc_maps, 4), conf, None
        loc_dist = _flatten(loc_maps, 4 * (self.dfl_bins + 1)).unflatten(-1, (4, self.dfl_bins + 1))
        return edges_to_loc(expected_edges(loc_dist, self.dfl_max_edge)), conf, loc_dist

    def forward(self, images: torch.Tensor) -> SSDOutput:
        """``images``: ``(B, 3, S, S)`` normalised with :attr:`preprocessing`, ``S`` = :attr:`image_size`."""
        features = self.backbone(images)
        conf_mid, conf_maps = zip(*(head(f) for head, f in zip(self.conf_heads, features, strict=True)), strict=True)
        loc_mid, loc_maps = zip(*(head(f) for head, f in zip(self.loc_heads, features, strict=True)), strict=True)
        loc, conf, loc_dist = self.predictions(conf_maps, loc_maps)
        if loc.shape[1] != self.priors.shape[0]:
            raise ValueError(
                f"{self.arch}: input {tuple(images.shape[-2:])} gives {loc.shape[1]} predictions but "
                f"the model has {self.priors.shape[0]} priors; feed {self.image_size}x{self.image_size} images"
            )
        return SSDOutput(
            loc, conf, list(features), list(loc_maps), list(conf_maps), list(loc_mid), list(conf_mid), loc_dist
        )
