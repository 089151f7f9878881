"""--device cuda on a machine without CUDA: one line from every script that takes --device."""

import re

import pytest
import torch

from odkd.checkpoint import save_model
from odkd.models import build_model
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_every_script_says_there_is_no_cuda_device(tmp_path, run_scripts):
    """The training scripts stopped with a ZeroDivisionError (LOCAL_RANK modulo zero GPUs), the others with
    torch's assertions deep inside, after reading the model and the data."""
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5), tmp_path / "m.pt")
    evaluate = ["--checkpoint", tmp_path / "m.pt", "--voc-root", tmp_path, "--year", "2007", "--image-set", "test"]
    calls = [
        ("train_teacher.py", f"train.output_dir={tmp_path / 'teacher'}"),  # side by side: a run folder each
        ("distill.py", "--teacher", tmp_path / "m.pt", f"train.output_dir={tmp_path / 'student'}"),
        ("compare.py", "--arm", "base", ROOT / "configs" / "demo_teacher_synthetic.yaml", "--output-dir",
         tmp_path / "compare"),
        ("benchmark.py", "train", "--root", tmp_path / "data"),
        ("benchmark.py", "loss"),
        ("demo.py", "--checkpoint", tmp_path / "m.pt", "--input", tmp_path, "--output", tmp_path / "out"),
        ("evaluate.py", *evaluate),
    ]  # fmt: skip
    for call, done in zip(calls, run_scripts(*((*call, "--device", "cuda") for call in calls)), strict=True):
        assert done.returncode == 1, (call, done.stderr[-2000:])
        line = done.stderr.strip()
        assert re.fullmatch(r"error: --device cuda: no CUDA device is available \(PyTorch .*\)", line), (call, line)
    assert not any((tmp_path / name).exists() for name in ("teacher", "student", "data"))  # nothing done first
