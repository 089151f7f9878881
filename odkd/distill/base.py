"""The distiller interface: what a distillation method reads and the named loss terms it returns.

A :class:`Distiller` is an ``nn.Module`` (its adaptation layers train with the student) that declares in
``needs`` which outputs it reads and in ``weight_keys`` which of its settings weighs each term, may rescale
the detection loss (``detection_weights``, e.g. Chen et al.'s ``mu`` on the hard classification loss) and
maps a :class:`DistillBatch` to named, already weighted loss terms. The distillation task runs student and
teacher once, matches once, and hands the same batch to every configured distiller, so methods combine
(Chen2017 + FGD, ...) without the trainer knowing.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from odkd.models import SSD, SSDOutput

__all__ = [
    "BOXES",
    "BOX_DISTRIBUTIONS",
    "CONF_MAPS",
    "DISTILLERS",
    "FEATURES",
    "HEAD_INTERMEDIATES",
    "LOGITS",
    "DistillBatch",
    "Distiller",
    "adapter_1x1",
    "level_adapters",
    "register_distiller",
    "resize_to",
    "settings_of",
]

# What a distiller may read (``Distiller.needs``). Every SSD gives all of them; the task checks which
# ones a teacher and student of different prior layouts can still pair (prior-relative outputs cannot).
LOGITS = "class logits"  # (B, P, C), the teacher's on the student's priors
BOXES = "box regressions"  # (B, P, 4), the teacher's encoded on the student's priors
CONF_MAPS = "conf-head maps"  # per level (B, A_k * C, H_k, W_k)
FEATURES = "feature maps"  # per level source maps (B, D_k, H_k, W_k)
# per level the heads' pre-activation intermediates (PredictionHead), and the teacher's heads
HEAD_INTERMEDIATES = "head intermediates"
BOX_DISTRIBUTIONS = "box distributions"  # (B, P, 4, n + 1) edge bin logits of DFL heads


@dataclass
class DistillBatch:
    """One training step as the distillers see it. ``B`` images, ``P`` student priors, ``C`` classes."""

    student: SSDOutput  # the student's forward pass (with gradient)
    teacher: SSDOutput  # the teacher's forward pass on the same images (no gradient; its own priors)
    teacher_model: SSD  # the frozen teacher, for methods that run part of it (CrossKD)
    teacher_loc: torch.Tensor  # (B, P, 4) teacher boxes encoded on the student's priors (re-mapped if needed)
    teacher_conf: torch.Tensor  # (B, P, C) teacher logits on the student's priors
    loc_targets: torch.Tensor  # (B, P, 4) matched GT boxes, encoded
    labels: torch.Tensor  # (B, P) matched classes, 0 = background
    sampled: torch.Tensor  # (B, P) bool: positives + hard-mined negatives (the detection CE's priors)
    gt_boxes: torch.Tensor  # (B, N, 4) x1,y1,x2,y2 in [0, 1], padded
    gt_valid: torch.Tensor  # (B, N) bool: real objects (not padding)
    priors: torch.Tensor  # (P, 4) student priors cx,cy,w,h
    iteration: int | torch.Tensor  # training iterations done before this one (0-dim int64 tensor in training)
    iou_threshold: float = 0.5  # the matching's positive IoU threshold (loss.iou_threshold)

    @property
    def positive(self) -> torch.Tensor:
        return self.labels > 0

    @property
    def num_pos(self) -> torch.Tensor:
        """N, the number of positive priors in the batch (at least 1): every output-level term is / N."""
        return self.positive.sum().clamp(min=1)


class Distiller(nn.Module):
    """Base class of the distillation methods (see the module docstring). A method's settings are the
    keyword-only arguments of its ``__init__`` (their defaults are the method's defaults); the arguments
    before them come from the two models (:meth:`from_models`)."""

    needs: ClassVar[frozenset[str]] = frozenset()
    # term -> the setting that weighs it (``distill.<method>.<setting>``), named in the step-0 warnings
    weight_keys: ClassVar[dict[str, str]] = {}
    # setting -> (test, what the value must be), checked with the config (``odkd.config.range_problems``)
    ranges: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    @classmethod
    def from_models(cls, student: SSD, teacher: SSD, **settings) -> Distiller:
        """The method for this student/teacher pair (adapter channels come from the models), with the
        config's ``settings``."""
        return cls(**settings)

    def detection_weights(self, iteration: int | torch.Tensor) -> dict[str, float | torch.Tensor]:
        """Factors this method puts on the detection terms (``"conf"``, ``"loc"``, ``"dfl"``); default none.
        ``iteration`` as in :class:`DistillBatch` (a schedule computes on it as a tensor)."""
        return {}

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# name -> class of every registered method: what distill.methods names.
DISTILLERS: dict[str, type[Distiller]] = {}
D = TypeVar("D", bound=type[Distiller])


def register_distiller(name: str) -> Callable[[D], D]:
    """Class decorator: the method ``name`` of configs (``distill.methods: [name]``, settings in the section
    ``distill.<name>``). A method defined outside odkd registers the same way, once its module is imported."""

    def register(cls: D) -> D:
        if DISTILLERS.get(name, cls) is not cls:
            raise ValueError(f"a distiller named {name!r} is registered already ({DISTILLERS[name].__qualname__})")
        DISTILLERS[name] = cls
        return cls

    return register


def settings_of(cls: type[Distiller]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (type annotation, default)}``: the keyword-only arguments of ``cls.__init__``."""
    hints = typing.get_type_hints(cls.__init__)
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: (hints.get(p.name, Any), p.default) for p in parameters if p.kind is p.KEYWORD_ONLY}


def checked_settings(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` settings of method ``name`` checked against its class (unknown keys and wrong types are
    :class:`odkd.config.ConfigError` naming ``distill.<name>.<setting>``); unset ones are left to its defaults."""
    from odkd.config import ConfigError, check_value, range_problems

    if name not in DISTILLERS:
        raise ConfigError(f"distill.methods: unknown method {name!r}; known: {', '.join(sorted(DISTILLERS))}")
    known = settings_of(DISTILLERS[name])
    if unknown := sorted(set(given) - set(known)):
        raise ConfigError(f"unknown setting distill.{name}.{unknown[0]}; {name}'s settings: {sorted(known)}")
    checked = {key: check_value(value, known[key][0], f"distill.{name}.{key}") for key, value in given.items()}
    limits = DISTILLERS[name].ranges
    problems = [
        problem
        for key in limits.keys() & checked
        for problem in range_problems(f"distill.{name}.{key}", checked[key], limits[key])
    ]
    if problems:
        raise ConfigError("; ".join(sorted(problems)))
    return checked


def adapter_1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A learned 1x1 conv from student to teacher channels; the identity when the counts agree, so the
    loss starts by comparing the maps themselves rather than a random projection of the student's."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    if in_channels == out_channels:
        nn.init.eye_(conv.weight.view(out_channels, in_channels))
        nn.init.zeros_(conv.bias)
    return conv


def level_adapters(
    student_channels: Sequence[int], teacher_channels: Sequence[int], what: str, levels: Sequence[int] | None = None
) -> tuple[list[int], nn.ModuleList]:
    """The pyramid ``levels`` a method compares (default: all) and an :func:`adapter_1x1` for each.

    Student and teacher must have as many levels; ``what`` names the method in the errors."""
    if len(student_channels) != len(teacher_channels):
        raise ValueError(
            f"{what} pairs levels one to one: the student has {len(student_channels)} levels, "
            f"the teacher {len(teacher_channels)}"
        )
    levels = list(range(len(student_channels))) if levels is None else list(levels)
    if not levels or any(not 0 <= k < len(student_channels) for k in levels):
        raise ValueError(f"{what} levels must be indices of the {len(student_channels)} levels, got {levels}")
    return levels, nn.ModuleList(adapter_1x1(student_channels[k], teacher_channels[k]) for k in levels)


def resize_to(teacher_map: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """``(B, D, H, W)`` teacher map at the student's spatial ``size`` (bilinear; unchanged when equal)."""
    if tuple(teacher_map.shape[-2:]) == tuple(size):
        return teacher_map
    return F.interpolate(teacher_map, size=tuple(size), mode="bilinear", align_corners=False)
