"""The settings of SSD's train augmentation (the config's ``data.augment`` section); the transforms that
apply them are :mod:`odkd.data.transforms`. Plain Python, so that a config is checked without loading
torch or OpenCV."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MIN_IOUS", "Augmentation"]

# SSD's sampling modes: keep the whole image, a crop whose IoU with every object is at least one of
# these, or any crop ("any", no IoU constraint).
MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class Augmentation:
    """SSD's train augmentation settings, the config's ``data.augment`` section. The defaults are
    ssd.pytorch's (and lufficc/SSD's); a probability of 0 turns its step off."""

    distort_p: float = 0.5  # each photometric step on its own: brightness, contrast, saturation, hue
    brightness: float = 32.0  # + U(-brightness, brightness) grey levels
    contrast: list[float] = field(default_factory=lambda: [0.5, 1.5])  # x U(low, high)
    saturation: list[float] = field(default_factory=lambda: [0.5, 1.5])  # x U(low, high)
    hue: float = 18.0  # + U(-hue, hue) degrees
    channel_swap_p: float = 0.5  # the channels in one of their six orders (colour-coded classes: set 0)
    expand_p: float = 0.5  # zoom out onto a mean-filled canvas U(1, expand_max_ratio) times larger per side
    expand_max_ratio: float = 4.0
    crop: bool = True  # SSD's min-IoU random crop
    min_ious: list[float] = field(default_factory=lambda: list(MIN_IOUS))  # crop modes besides "whole" and "any"
    min_crop_scale: float = 0.3  # crop sides from this fraction of the canvas's to all of it
    crop_aspect: list[float] = field(default_factory=lambda: [0.5, 2.0])  # crop height / width range
    flip_p: float = 0.5

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its key (empty if nothing)."""
        found = []
        for key in ("distort_p", "channel_swap_p", "expand_p", "flip_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                found.append(f"{key} is a probability, got {getattr(self, key)}")
        for key in ("contrast", "saturation", "crop_aspect"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0.0 < low_high[0] <= low_high[1]:
                found.append(f"{key} is [low, high] with 0 < low <= high, got {low_high}")
        if not 0.0 <= self.brightness <= 255.0:
            found.append(f"brightness is 0-255 grey levels, got {self.brightness}")
        if not 0.0 <= self.hue <= 180.0:
            found.append(f"hue is 0-180 degrees, got {self.hue}")
        if self.expand_max_ratio < 1.0:
            found.append(f"expand_max_ratio is at least 1, got {self.expand_max_ratio}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            found.append(f"min_crop_scale is in (0, 1], got {self.min_crop_scale}")
        if not all(0.0 <= iou <= 1.0 for iou in self.min_ious):
            found.append(f"min_ious are IoUs in [0, 1], got {self.min_ious}")
        return found
