"""Distillation methods behind one interface (:class:`Distiller`); any of them combine in one run.

| name | method | reads |
|---|---|---|
| ``chen2017`` | :class:`ObjectDistillationLoss`: soft CE, teacher-bounded regression, hint | logits, boxes, conf maps |
| ``hinton`` | :class:`HintonKD`: temperature KL on the class logits | logits |
| ``ld`` | :class:`LocalizationDistillation`: KL of the box-edge distributions | box distributions (DFL heads) |
| ``fgd`` | :class:`FGD`: focal + attention + global feature distillation | feature maps |
| ``crosskd`` | :class:`CrossKD`: student head intermediates through the teacher's last convs | head intermediates |
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from odkd.distill.base import (
    BOX_DISTRIBUTIONS,
    BOXES,
    CONF_MAPS,
    FEATURES,
    HEAD_INTERMEDIATES,
    LOGITS,
    DistillBatch,
    Distiller,
)
from odkd.distill.chen2017 import ObjectDistillationLoss
from odkd.distill.crosskd import CrossKD
from odkd.distill.fgd import FGD
from odkd.distill.hinton import HintonKD
from odkd.distill.ld import LocalizationDistillation
from odkd.models import SSD

__all__ = [
    "BOXES",
    "BOX_DISTRIBUTIONS",
    "CONF_MAPS",
    "DISTILLERS",
    "FEATURES",
    "FGD",
    "HEAD_INTERMEDIATES",
    "LOGITS",
    "CrossKD",
    "DistillBatch",
    "Distiller",
    "HintonKD",
    "LocalizationDistillation",
    "ObjectDistillationLoss",
    "build_distillers",
]

DISTILLERS: dict[str, type[Distiller]] = {
    "chen2017": ObjectDistillationLoss,
    "hinton": HintonKD,
    "ld": LocalizationDistillation,
    "fgd": FGD,
    "crosskd": CrossKD,
}


def build_distillers(methods: Mapping[str, Mapping], student: SSD, teacher: SSD) -> nn.ModuleDict:
    """``{name: settings}`` (names of :data:`DISTILLERS`, settings their keyword arguments) -> the modules."""
    unknown = sorted(set(methods) - set(DISTILLERS))
    if unknown:
        raise ValueError(f"unknown distillation method {unknown[0]!r}; known methods: {', '.join(DISTILLERS)}")
    if not methods:
        raise ValueError(f"no distillation method given; choose from {', '.join(DISTILLERS)}")
    return nn.ModuleDict(
        {name: DISTILLERS[name].from_models(student, teacher, **settings) for name, settings in methods.items()}
    )
