"""Writing files: where outputs may go."""

import sys

import pytest
import torch

from odkd.checkpoint import save_model
from odkd.files import check_output_path
from odkd.models import build_model
from tests.conftest import load_script


def test_output_paths_blocked_by_a_file_or_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for path, folder in (
        (tmp_path / "new" / "deeper", True),
        (tmp_path / "folder", True),
        (tmp_path / "f.onnx", False),
    ):
        check_output_path(path, "out", folder)
    for path, folder in (
        (tmp_path / "file", True),
        (tmp_path / "file" / "run", True),
        (tmp_path / "file" / "x", False),
    ):
        with pytest.raises(ValueError) as err:
            check_output_path(path, "out", folder)
        assert str(err.value) == f"out {path}: {tmp_path / 'file'} is a file, not a folder"
    with pytest.raises(ValueError) as err:
        check_output_path(tmp_path / "folder", "out")
    assert str(err.value) == f"out {tmp_path / 'folder'} is a folder: give a file name"


def exit_line(main, argv: list, monkeypatch=None) -> str:
    """The message a script's main exits with (``argv`` as its arguments, or as sys.argv for a main that
    takes none)."""
    with pytest.raises(SystemExit) as exited:
        if monkeypatch is None:
            main([str(a) for a in argv])
        else:
            monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
            main()
    return exited.value.code


def test_scripts_refuse_an_output_path_under_a_file_at_start(tmp_path, monkeypatch):
    """Each stopped at the end of its work (a training run's first write, an export's minute of tracing,
    a whole evaluation) with an OS error, or a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5), tmp_path / "m.pt")
    under = blocker / "out"
    line = exit_line(load_script("train_teacher").main, [f"train.output_dir={under}"], monkeypatch)
    assert line == f"error: train.output_dir {under}: {blocker} is a file, not a folder"
    line = exit_line(load_script("export_onnx").main, ["--checkpoint", tmp_path / "m.pt", "--output", under])
    assert line == f"error: --output {under}: {blocker} is a file, not a folder"
    line = exit_line(load_script("export_onnx").main, ["--checkpoint", tmp_path / "m.pt", "--output", tmp_path])
    assert line == f"error: --output {tmp_path} is a folder: give a file name"
    common = ["--checkpoint", tmp_path / "m.pt", "--voc-root", tmp_path, "--year", "2007", "--image-set", "test"]
    line = exit_line(load_script("evaluate").main, [*common, "--output-json", under])
    assert line == f"error: --output-json {under}: {blocker} is a file, not a folder"
    line = exit_line(load_script("evaluate").main, [*common, "--detections", blocker])
    assert line == f"error: --detections {blocker}: {blocker} is a file, not a folder"
    demo = ["--checkpoint", tmp_path / "m.pt", "--input", tmp_path, "--output", blocker]
    line = exit_line(load_script("demo").main, demo, monkeypatch)
    assert line == f"error: --output {blocker}: {blocker} is a file, not a folder"
