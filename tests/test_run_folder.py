"""A run owns its folder; resuming picks the checkpoint that loads and follows the configured lr; what a
run writes never half-exists."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from odkd.config import load_config
from odkd.data.synthetic import make_synthetic_voc
from odkd.engine import TrainResult, lr_factor
from odkd.engine.build import run_training, summary
from odkd.engine.run_folder import RunFolderError, claim_run_folder
from odkd.engine.trainer import latest_checkpoint, read_metrics


def tiny(tmp_path, *extra):
    """mbv2 x0.5 on 6 synthetic images, batch 2, no test set: about a second per iteration on CPU."""
    make_synthetic_voc(tmp_path / "voc", {"trainval": 6}, seed=1, min_size=100, max_size=160)
    return load_config(
        None,
        [
            "model.width_mult=0.5", f"data.voc_root={tmp_path / 'voc'}", "data.test_sets=''", "data.batch_size=2",
            "data.num_workers=0", "optim.max_iters=2", "optim.warmup_iters=0", "optim.schedule=cosine",
            f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=1", "train.log_every=1", *extra,
        ],
    )  # fmt: skip


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_told_to_overwrite(tmp_path):
    cfg = tiny(tmp_path)
    run_training(cfg, device="cpu", progress=False)
    first = latest_checkpoint(tmp_path / "run").read_bytes()
    with pytest.raises(
        RunFolderError, match=r"holds another run \(checkpoint_0000001.pt, .*--resume auto.*--overwrite"
    ):
        run_training(cfg, device="cpu", progress=False)
    assert latest_checkpoint(tmp_path / "run").read_bytes() == first  # untouched
    run_training(tiny(tmp_path, "optim.max_iters=1"), device="cpu", progress=False, overwrite=True)
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint_*.pt"))] == ["checkpoint_0000001.pt"]
    assert [r["iter"] for r in read_metrics(tmp_path / "run")] == [1]  # the other run's records are gone


def test_a_folder_in_use_is_refused_and_orphaned_temporary_files_are_removed(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".checkpoint_0000002.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (folder / "notes.txt").write_text("the user's own file")
    with claim_run_folder(folder, fresh=True):
        assert not list(folder.glob("*.tmp")) and (folder / "notes.txt").is_file()
        with (
            pytest.raises(RunFolderError, match=r"in use by another run \(process \d+\)"),
            claim_run_folder(folder, fresh=False),
        ):
            pass
    with claim_run_folder(folder, fresh=False):  # released at the end of the block
        pass


def test_resume_auto_falls_back_past_a_checkpoint_that_does_not_load_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odkd")
    cfg = tiny(tmp_path, "optim.max_iters=3")
    run_training(tiny(tmp_path), device="cpu", progress=False)
    run = tmp_path / "run"
    cut = run / "checkpoint_0000002.pt"
    cut.write_bytes(cut.read_bytes()[:50_000])  # a copy cut short, or a disk that filled up
    result, _ = run_training(cfg, "auto", device="cpu", progress=False)
    assert result.iteration == 3
    assert f"{cut}: not a PyTorch file that loads" in caplog.text and "trying the checkpoint before it" in caplog.text
    assert f"resumed from {run / 'checkpoint_0000001.pt'} at iteration 1" in caplog.text
    with pytest.raises(ValueError, match=r"^\S+checkpoint_0000002.pt: not a PyTorch file that loads"):
        cut.write_bytes(b"not a checkpoint")
        run_training(cfg, str(cut), device="cpu", progress=False)


def test_resume_auto_without_a_checkpoint_says_it_starts_afresh(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    result, _ = run_training(tiny(tmp_path), "auto", device="cpu", progress=False)
    assert result.iteration == 2 and "holds no checkpoint yet, so the run starts from iteration 0" in caplog.text


def test_a_resume_with_another_lr_follows_the_config(tmp_path, caplog):
    """The schedule's state used to win over the config, silently keeping the old lr."""
    same_batch = "optim.reference_batch_size=2"  # the lr as given (not scaled to the batch size)
    run_training(tiny(tmp_path, "optim.max_iters=5", "optim.lr=0.02", same_batch), device="cpu", progress=False)
    for late in ("checkpoint_0000004.pt", "checkpoint_0000005.pt"):
        (tmp_path / "run" / late).unlink()  # resume from iteration 3
    cfg = tiny(tmp_path, "optim.max_iters=5", "optim.lr=0.005", same_batch)
    run_training(cfg, "auto", device="cpu", progress=False)
    assert "optim.lr differs from the checkpoint's (base lr 0.02 -> 0.005)" in caplog.text
    # Each record's lr is the base lr times the schedule's factor at its iteration: the old base lr up to the
    # checkpoint, the configured one after it.
    logged = {r["iter"]: r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    for iteration, lr in logged.items():
        base = 0.02 if iteration <= 3 else 0.005
        assert lr == pytest.approx(base * lr_factor(iteration, cfg.optim), rel=1e-6, abs=1e-12), iteration


def test_the_summary_prints_when_a_score_is_missing(tmp_path):
    cfg = tiny(tmp_path)
    text = summary(cfg, TrainResult(10, False, best_map=None, last_map=0.5), "student")
    assert "last 0.5000, best n/a" in text


def test_a_write_that_fails_names_the_file_and_keeps_the_previous_one(tmp_path):
    """A real failing write: the process may write files of at most 1 MiB (what a full disk looks like to
    torch.save: "unexpected pos" from its zip writer)."""
    target = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.zeros(10)}, target)
    before = target.read_bytes()
    code = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from odkd.checkpoint import atomic_save
        from odkd.files import FileWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            atomic_save({{"w": torch.zeros(2**20)}}, {str(target)!r})
        except FileWriteError as err:
            sys.exit(str(err))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"could not write {target}: ") and "MiB free on its disk" in line, line
    assert line.endswith("the previous file is kept") and "\n" not in line
    assert target.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
