"""Every shipped config loads and names a dataset layout the loader understands; every experiment file
(``compare_*.yaml``, for scripts/compare.py) names configs that do."""

from pathlib import Path

import pytest

from odkd.compare import load_experiment
from odkd.config import load_config
from odkd.data.voc import parse_image_sets

FILES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXPERIMENTS = [p for p in FILES if p.name.startswith("compare_")]
CONFIGS = [p for p in FILES if p not in EXPERIMENTS]


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


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_loads(path):
    experiment = load_experiment(path)
    for arm in experiment.every_arm:
        cfg = load_config(arm.config, [*experiment.overrides, *arm.overrides])
        assert Path(arm.config) in CONFIGS and cfg.optim.max_iters > 0
