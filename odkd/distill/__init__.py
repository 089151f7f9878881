"""Distillation methods behind one interface (:class:`Distiller`); any of them combine in one run. Each is one
module whose class registers itself (:func:`register_distiller`) and declares its settings as the keyword
arguments of its ``__init__``; a method of your own is the same, in your own module, imported before the run.

| name | method | reads |
|---|---|---|
| ``chen2017`` | :class:`ObjectDistillationLoss`: soft CE, teacher-bounded regression, hint | logits, boxes, conf maps |
| ``hinton`` | :class:`HintonKD`: temperature KL on the class logits | logits |
| ``ld`` | :class:`LocalizationDistillation`: KL of the box-edge distributions | box distributions (DFL heads) |
| ``fgd`` | :class:`FGD`: focal + attention + global feature distillation | feature maps |
| ``crosskd`` | :class:`CrossKD`: student head intermediates through the teacher's last convs | head intermediates |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from odkd.distill.base import (
    BOX_DISTRIBUTIONS,
    BOXES,
    CONF_MAPS,
    DISTILLERS,
    FEATURES,
    HEAD_INTERMEDIATES,
    LOGITS,
    DistillBatch,
    Distiller,
    checked_settings,
    register_distiller,
    settings_of,
)
from odkd.distill.chen2017 import ObjectDistillationLoss
from odkd.distill.crosskd import CrossKD
from odkd.distill.fgd import FGD
from odkd.distill.hinton import HintonKD
from odkd.distill.ld import LocalizationDistillation
from odkd.models import SSD

if TYPE_CHECKING:
    from odkd.config import DistillConfig

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
    "check_distill_settings",
    "register_distiller",
    "settings_of",
]


def check_distill_settings(cfg: DistillConfig) -> dict[str, dict]:
    """Each method's section ``cfg.settings[name]`` checked against its class (:func:`checked_settings`),
    by method name; every section must name a registered method (a typo is an error, not a silently
    ignored setting). No model is needed: a run checks this before it touches its folder."""
    from odkd.config import ConfigError

    if stray := sorted(set(cfg.settings) - set(DISTILLERS)):
        raise ConfigError(
            f"distill.{stray[0]}: no distillation method of that name; known: {', '.join(sorted(DISTILLERS))}"
        )
    return {name: checked_settings(name, cfg.settings.get(name, {})) for name in cfg.methods}


def build_distillers(cfg: DistillConfig, student: SSD, teacher: SSD) -> nn.ModuleDict:
    """The methods of ``cfg.methods`` for this student and teacher, with their checked settings
    (:func:`check_distill_settings`)."""
    from odkd.config import ConfigError

    methods = {}
    for name, settings in check_distill_settings(cfg).items():
        try:
            methods[name] = DISTILLERS[name].from_models(student, teacher, **settings)
        except ValueError as err:  # settings that do not fit together, or do not fit these models
            raise ConfigError(f"distill.{name}: {err}") from None
    return nn.ModuleDict(methods)
