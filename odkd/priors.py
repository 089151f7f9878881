"""Prior (default) boxes of SSD detectors.

A :class:`PriorLayout` says, per feature level ``k``: the square grid size ``f_k``, the step ``s_k``
(pixels between cell centres), the box sizes ``min_k`` and ``max_k`` (pixels) and the extra aspect
ratios. :func:`build_priors` turns a layout into a ``(P, 4)`` tensor of ``(cx, cy, w, h)`` relative
to the image, in the order the detection heads emit them:

- levels in order, cells row by row (``i`` = row, ``j`` = column), centre
  ``((j + 0.5) / (image_size / s_k), (i + 0.5) / (image_size / s_k))``;
- per cell: a square of side ``min_k``, a square of side ``sqrt(min_k * max_k)``, then for each
  aspect ratio ``ar`` the box ``(min_k * sqrt(ar), min_k / sqrt(ar))`` and its transpose.

This order is the one of ssd.pytorch, qfgaohao/pytorch-ssd and lufficc/SSD, so their published
checkpoints line up prior for prior.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LAYOUTS", "PriorLayout", "build_priors", "get_layout"]


@dataclass(frozen=True)
class PriorLayout:
    """Geometry of the prior boxes; sizes and steps are in input-image pixels."""

    image_size: int
    feature_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = True  # clamp (cx, cy, w, h) to [0, 1], as the reference implementations do

    def __post_init__(self) -> None:
        # Accept lists (YAML, JSON) but store tuples so layouts stay hashable and immutable.
        for name in ("feature_sizes", "steps", "min_sizes", "max_sizes"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        ratios = _as_tuple("aspect_ratios", self.aspect_ratios)
        object.__setattr__(self, "aspect_ratios", tuple(_as_tuple("aspect_ratios", r) for r in ratios))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"prior layout: image_size must be a positive int, got {self.image_size!r}")
        levels = len(self.feature_sizes)
        if levels == 0:
            raise ValueError("prior layout: feature_sizes is empty")
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"prior layout: {name} has {len(getattr(self, name))} entries but feature_sizes has "
                    f"{levels}; give one entry per feature level"
                )
        for name in ("steps", "min_sizes", "max_sizes"):
            _require_numbers(name, getattr(self, name))
        for ratios in self.aspect_ratios:
            _require_numbers("aspect_ratios", ratios)
        for k in range(levels):
            f, step = self.feature_sizes[k], self.steps[k]
            lo, hi = self.min_sizes[k], self.max_sizes[k]
            if not isinstance(f, int) or f <= 0:
                raise ValueError(f"prior layout: feature_sizes[{k}] must be a positive int, got {f!r}")
            if step <= 0 or lo <= 0:
                raise ValueError(f"prior layout: steps[{k}] and min_sizes[{k}] must be > 0, got {step}, {lo}")
            if hi < lo:
                raise ValueError(f"prior layout: max_sizes[{k}]={hi} is smaller than min_sizes[{k}]={lo}")
            if any(ar <= 0 for ar in self.aspect_ratios[k]):
                raise ValueError(f"prior layout: aspect_ratios[{k}] must be > 0, got {self.aspect_ratios[k]}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Priors per feature-map cell, per level: 2 squares + 2 per aspect ratio."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        return sum(f * f * a for f, a in zip(self.feature_sizes, self.boxes_per_location, strict=True))


def _as_tuple(name: str, value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"prior layout: {name} must be a list, got {value!r}")
    return tuple(value)


def _require_numbers(name: str, values: tuple) -> None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"prior layout: {name} must hold numbers, got {list(values)!r}")


LAYOUTS: dict[str, PriorLayout] = {
    # VGG16-SSD300 (ssd.pytorch, lufficc/SSD, the SSD paper): 8732 priors.
    "ssd300": PriorLayout(
        image_size=300,
        feature_sizes=(38, 19, 10, 5, 3, 1),
        steps=(8, 16, 32, 64, 100, 300),
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    ),
    # MobileNetV2-SSDLite 300 (qfgaohao mb2-ssd-lite) and the lite-layout VGG teacher: 3000 priors.
    "lite300": PriorLayout(
        image_size=300,
        feature_sizes=(19, 10, 5, 3, 2, 1),
        steps=(16, 32, 64, 100, 150, 300),
        min_sizes=(60, 105, 150, 195, 240, 285),
        max_sizes=(105, 150, 195, 240, 285, 330),
        aspect_ratios=((2, 3),) * 6,
    ),
}
# MobileNetV2-SSDLite 320: the lite300 boxes on a 320 input with a 20x20 first grid, 3234 priors, centred on
# each level's grid. Not lufficc/SSD's 320 layout, whose strides (16, 32, 64, 100, 150, 300) put the centres
# of the three coarse levels off-grid at 320 px (and whose first head reads the 96-channel block output).
LAYOUTS["lite320"] = dataclasses.replace(
    LAYOUTS["lite300"], image_size=320, feature_sizes=(20, 10, 5, 3, 2, 1), steps=(16, 32, 64, 107, 160, 320)
)


def get_layout(layout: str | PriorLayout | Mapping) -> PriorLayout:
    """Resolve a layout name (``"ssd300"``, ``"lite300"``, ``"lite320"``), a mapping or a layout."""
    if isinstance(layout, PriorLayout):
        return layout
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown prior layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
        return LAYOUTS[layout]
    if isinstance(layout, Mapping):
        known = {f.name for f in dataclasses.fields(PriorLayout)}
        unknown = sorted(set(layout) - known)
        if unknown:
            raise ValueError(f"prior layout: unknown key(s) {unknown}; expected keys: {sorted(known)}")
        required = {f.name for f in dataclasses.fields(PriorLayout) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(layout))
        if missing:
            raise ValueError(f"prior layout: missing key(s) {missing}")
        return PriorLayout(**layout)
    raise TypeError(f"a prior layout is a name, a mapping or a PriorLayout, got {type(layout).__name__}")


def build_priors(layout: str | PriorLayout | Mapping, device: torch.device | str | None = None) -> torch.Tensor:
    """Prior boxes of ``layout``: ``(P, 4)`` float32, ``(cx, cy, w, h)`` relative to the image."""
    layout = get_layout(layout)
    size = layout.image_size
    levels = []
    for f, step, lo, hi, ratios in zip(
        layout.feature_sizes, layout.steps, layout.min_sizes, layout.max_sizes, layout.aspect_ratios, strict=True
    ):
        # Float64 so that the float32 result is the correctly rounded value of the formula.
        cells_per_image = size / step
        centres_1d = (torch.arange(f, dtype=torch.float64) + 0.5) / cells_per_image
        cy, cx = torch.meshgrid(centres_1d, centres_1d, indexing="ij")  # row-major: i = row, j = column
        centres = torch.stack((cx, cy), dim=-1).reshape(f * f, 1, 2)

        sizes = [(lo, lo), (math.sqrt(lo * hi),) * 2]
        for ar in ratios:
            sizes += [(lo * math.sqrt(ar), lo / math.sqrt(ar)), (lo / math.sqrt(ar), lo * math.sqrt(ar))]
        wh = torch.tensor(sizes, dtype=torch.float64).div_(size).expand(f * f, -1, 2)

        levels.append(torch.cat((centres.expand_as(wh), wh), dim=-1).reshape(-1, 4))
    priors = torch.cat(levels)
    if layout.clip:
        priors.clamp_(0.0, 1.0)
    return priors.to(device=device, dtype=torch.float32)
