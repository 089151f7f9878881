"""The pretrained files in weights/ are the ones weights/README.md describes (by digest, so a replaced file
cannot silently carry the documented numbers), and every run of an experiment file that starts from one gets
every weight of its model from it (a DFL model: all but its box outputs), class names included."""

import hashlib
from pathlib import Path

import pytest

from odkd.checkpoint import init_from_checkpoint, load_model
from odkd.compare import load_experiment, plan_runs
from odkd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = sorted((ROOT / "weights").glob("*.pt"))
EXPERIMENTS = sorted((ROOT / "configs").glob("compare_*.yaml"))


def _runs_from_shipped_weights(path: Path):
    configs = {run.name: run.cfg for run in plan_runs(load_experiment(path))}  # what the harness trains, a seed each
    for name, cfg in configs.items():
        if cfg.model.init_checkpoint and Path(cfg.model.init_checkpoint).parts[0] == "weights":
            yield name, cfg


def test_shipped_weights_are_the_documented_files():
    readme = (ROOT / "weights" / "README.md").read_text()
    assert WEIGHTS
    for path in WEIGHTS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{path.name}` |"))
        assert f"`{hashlib.sha256(path.read_bytes()).hexdigest()}`" in row, path.name


def test_the_main_job_starts_from_shipped_weights():
    names = {cfg.model.init_checkpoint for _, cfg in _runs_from_shipped_weights(ROOT / "configs" / "compare_demo.yaml")}
    assert names == {f"weights/{p.name}" for p in WEIGHTS}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_runs_from_shipped_weights_get_every_weight(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # experiment files name the weights relative to the repository, as the data
    for name, cfg in _runs_from_shipped_weights(path):
        model = build_model(cfg.model.name, cfg.num_classes, None, cfg.model.width_mult, cfg.model.dfl_bins)
        copied, left = init_from_checkpoint(model, cfg.model.init_checkpoint)
        # a distribution (DFL) box head's last conv has 4 x (bins + 1) outputs per prior, the files' 4: only
        # those (a weight and a bias per level) start as initialised
        box_outputs = 2 * len(model.loc_heads) if cfg.model.dfl_bins else 0
        assert (copied, left) == (len(model.state_dict()) - box_outputs, box_outputs), name
        assert list(load_model(cfg.model.init_checkpoint).class_names) == list(cfg.class_names), name
