"""Every shipped config loads and names a dataset layout the loader understands."""

from pathlib import Path

import pytest

from odkd.config import load_config
from odkd.data.voc import parse_image_sets

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"vgg16_ssd300_voc0712.yaml", "vgg16_lite300_voc0712.yaml", "mobilenetv2_ssdlite300_voc0712.yaml"} <= names
    assert any(name.startswith("demo_") for name in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    parse_image_sets(cfg.data.train_sets)
    parse_image_sets(cfg.data.test_sets)
    assert cfg.optim.max_iters > max([*cfg.optim.milestones, 0]) or cfg.optim.schedule == "cosine"
