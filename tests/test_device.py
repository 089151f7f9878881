"""--device cuda on a machine without CUDA: one line from every script that takes --device."""

import re
import sys

import pytest
import torch

from odkd.checkpoint import save_model
from odkd.models import build_model
from tests.conftest import ROOT, load_script

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_every_script_says_there_is_no_cuda_device(tmp_path, monkeypatch, capsys):
    """The training scripts stopped with a ZeroDivisionError (LOCAL_RANK modulo zero GPUs), the others with
    torch's assertions deep inside, after reading the model and the data."""
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5), tmp_path / "m.pt")
    run = f"train.output_dir={tmp_path / 'run'}"
    evaluate = ["--checkpoint", tmp_path / "m.pt", "--voc-root", tmp_path, "--year", "2007", "--image-set", "test"]
    for script, argv in (
        ("train_teacher", [run]),
        ("distill", ["--teacher", tmp_path / "m.pt", run]),
        (
            "compare",
            ["--arm", "base", ROOT / "configs" / "demo_teacher_synthetic.yaml", "--output-dir", tmp_path / "compare"],
        ),
        ("benchmark", ["train", "--root", tmp_path / "data"]),
        ("benchmark", ["loss"]),
        ("demo", ["--checkpoint", tmp_path / "m.pt", "--input", tmp_path, "--output", tmp_path / "out"]),
        ("evaluate", evaluate),
    ):
        main = load_script(script).main
        monkeypatch.setattr(sys, "argv", [script, *map(str, argv), "--device", "cuda"])
        with pytest.raises(SystemExit) as exited:
            main(sys.argv[1:]) if script == "evaluate" else main()
        assert re.fullmatch(r"error: --device cuda: no CUDA device is available \(PyTorch .*\)", exited.value.code)
        assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing done first
