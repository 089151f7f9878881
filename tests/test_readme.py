"""The README's set-up commands are the ones CI runs, and the main job works."""

import re
from pathlib import Path

import pytest

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
    install, _ = readme_commands()
    assert install.endswith("python scripts/train_teacher.py")
    # The demo with its default config, shrunk: synthetic data written, trained, evaluated, files reported.
    result = run_script(
        "train_teacher.py", f"data.voc_root={tmp_path / 'voc'}", "data.synthetic_sizes={trainval: 8, test: 4}",
        "data.batch_size=2", "data.num_workers=0", "optim.max_iters=2", "optim.warmup_iters=1",
        f"train.output_dir={tmp_path / 'run'}", "train.eval_every=2", "model.width_mult=0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "voc07 mAP on SYN_test" in result.stdout
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "voc" / "VOCSYN").is_dir()
    assert "best model: " in result.stdout and "checkpoint (resume): " in result.stdout


def test_models_benchmark_runs(run_script):
    args = ("--models", "mobilenetv2_ssdlite300", "--batches", 1, "--iters", 1, "--warmup", 0, "--device", "cpu")
    result = run_script("benchmark.py", "models", *args)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("mobilenetv2_ssdlite300"))
    assert "3,388,228" in row
    assert float(row.split()[2]) == pytest.approx(0.66, abs=0.01)  # docs/DESIGN.md §3: ~0.66 GMACs
