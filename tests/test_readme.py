"""The README's set-up commands are the ones CI runs, and the main job works."""

import re
from pathlib import Path

import pytest

from odkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_commands():
    install, test = readme_commands()
    assert "pip install" in install and "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci_lines
    assert test in ci_lines


def test_main_job_runs(run_script, tmp_path):
    """The main job, shrunk: the demo teacher, the student alone and the distilled student trained on the
    synthetic data it writes, printed side by side (mAP, per-class AP) with a picture of their detections."""
    install, _ = readme_commands()
    assert install.endswith("python scripts/compare.py")
    result = run_script(
        "compare.py", f"data.voc_root={tmp_path / 'voc'}", "data.synthetic_sizes={trainval: 8, test: 4}",
        "data.batch_size=2", "data.num_workers=0", "optim.max_iters=2", "optim.warmup_iters=1",
        "train.eval_every=2", "train.checkpoint_every=2", "--output-dir", tmp_path / "demo",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "voc" / "VOCSYN").is_dir()
    for run in ("teacher", "alone/seed1", "distilled/seed1"):
        assert (tmp_path / "demo" / run / "model_final.pt").is_file(), run
    table = result.stdout[result.stdout.index("# Paired comparison") :]
    rows = ("One seed: a demonstration", "| teacher (trained once) |", "| alone (baseline) |", "| distilled |")
    for row in (*rows, "| class | teacher | alone | distilled |"):
        assert row in table, row
    assert (tmp_path / "demo" / "detections.jpg").stat().st_size > 0
    # The distilled arm learnt from the teacher the main job trained, not from another file.
    distilled = load_config(tmp_path / "demo" / "distilled" / "seed1" / "config.yaml")
    assert distilled.distill.teacher == str(tmp_path / "demo" / "teacher" / "model_final.pt")


def test_models_benchmark_runs(run_script):
    args = ("--models", "mobilenetv2_ssdlite300", "--batches", 1, "--iters", 1, "--warmup", 0, "--device", "cpu")
    result = run_script("benchmark.py", "models", *args)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("mobilenetv2_ssdlite300"))
    assert "3,388,228" in row
    assert float(row.split()[2]) == pytest.approx(0.66, abs=0.01)  # docs/DESIGN.md §3: ~0.66 GMACs
