"""SSD models: ``build_model(name, num_classes=21, pretrained_backbone=None, width_mult=1.0)``."""

from odkd.models.ssd import SSD, PredictionHead, SSDOutput
from odkd.models.zoo import MODELS, build_model, init_background_prior

__all__ = ["MODELS", "SSD", "PredictionHead", "SSDOutput", "build_model", "init_background_prior"]
