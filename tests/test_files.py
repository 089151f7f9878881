"""Writing files: where outputs may go, who may read them."""

import json
import os
import stat

import pytest
import torch

from odkd.checkpoint import save_model
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset
from odkd.data.image_cache import ImageCache
from odkd.data.synthetic import make_synthetic_voc
from odkd.files import atomic_write, check_output_path, json_line
from odkd.models import build_model


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


def test_scripts_refuse_an_output_path_under_a_file_at_start(tmp_path, run_scripts):
    """Each stopped at the end of its work (a training run's first write, an export's minute of tracing,
    a whole evaluation) with an OS error, or a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    torch.manual_seed(0)
    model, under, not_folder = tmp_path / "m.pt", blocker / "out", f"{blocker} is a file, not a folder"
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5), model)
    common = ["--checkpoint", model, "--voc-root", tmp_path, "--year", "2007", "--image-set", "test"]
    cases = [
        (("train_teacher.py", f"train.output_dir={under}"), f"train.output_dir {under}: {not_folder}"),
        (("export_onnx.py", "--checkpoint", model, "--output", under), f"--output {under}: {not_folder}"),
        (("export_onnx.py", "--checkpoint", model, "--output", tmp_path),
         f"--output {tmp_path} is a folder: give a file name"),
        (("evaluate.py", *common, "--output-json", under), f"--output-json {under}: {not_folder}"),
        (("evaluate.py", *common, "--detections", blocker), f"--detections {blocker}: {not_folder}"),
        (("demo.py", "--checkpoint", model, "--input", tmp_path, "--output", blocker),
         f"--output {blocker}: {not_folder}"),
    ]  # fmt: skip
    for (call, message), done in zip(cases, run_scripts(*(call for call, _ in cases)), strict=True):
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == f"error: {message}", (call, done.stderr)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    """Model files, checkpoints and a dataset's caches were 0600 whatever the umask (mkstemp's mode, kept
    by the rename): a second user of a shared dataset could not read its caches."""
    make_synthetic_voc(tmp_path / "voc", {"trainval": 2}, min_size=40, max_size=50)
    old = os.umask(mask)
    try:
        save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.35), tmp_path / "m.pt")
        atomic_write(tmp_path / "a" / "b.bin", lambda f: f.write(b"x"))
        dataset = VOCDataset(tmp_path / "voc", "SYN_trainval", SYNTHETIC_CLASSES)
        cache = ImageCache.for_images(
            tmp_path / "cache", dataset.image_paths, dataset.image_shapes, workers=0, progress=False
        )
    finally:
        os.umask(old)
    written = [tmp_path / "m.pt", tmp_path / "a" / "b.bin", cache.path, *(tmp_path / "voc" / ".odkd_cache").iterdir()]
    assert len(written) == 4
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_json_lines_are_strict_json():
    line = json_line({"iter": 3, "loss": float("nan"), "terms": {"a": float("inf"), "b": [1.5, -float("inf")]}})
    assert json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {line}")) == {
        "iter": 3,
        "loss": None,
        "terms": {"a": None, "b": [1.5, None]},
    }
