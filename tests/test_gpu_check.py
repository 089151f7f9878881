"""scripts/gpu_check.sh, the first GPU run's one command: its dry run on the CPU goes through every stage at tiny
sizes, so that on the GPU machine only the GPU itself is new; its options; the real-photo stage's sizing."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from odkd.class_names import SYNTHETIC_CLASSES
from odkd.compare import load_experiment
from odkd.config import load_config
from odkd.data.synthetic import make_synthetic_voc
from odkd.gpu_check import (
    COST_DISTILLED,
    FALLBACK_IMAGES_PER_S,
    GOALS,
    ONCE_OVERHEAD_S,
    RUN_OVERHEAD_S,
    SPEED_DISCOUNT,
    plan_experiment,
)
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
EXPERIMENT = ROOT / "configs" / "compare_voc5_real.yaml"


def gpu_check(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}  # the Python of this test run, whatever python3 is
    return subprocess.run(
        ["bash", SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs
    )


def test_dry_run_goes_through_every_stage_and_leaves_its_files(tmp_path):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 8, "test": 4}, min_size=100, max_size=160)
    out, work = tmp_path / "out", tmp_path / "work"
    stand_in = [f"data.voc_root={tmp_path / 'voc'}", "data.train_sets=SYN_trainval", "data.test_sets=SYN_test",
                "data.classes=synthetic"]  # fmt: skip
    # A budget for a slow shared CPU: the stages' time limits are not what the dry run checks.
    done = gpu_check("--dry-run", "--budget", 1500, "--work", work, out, *stand_in, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    # The GPU tool brings back 8 files at most: these, and on the GPU detections.jpg (--no-picture here).
    assert files == sorted(["gpu_check.log", "1_tests.log", "2_throughput.log", "3_real_photos.log", "summary.json",
                            "compare.md", "compare.png"])  # fmt: skip
    assert len(files) + 1 <= 8
    main_log = (out / "gpu_check.log").read_text()
    assert main_log.startswith("gpu_check.sh dry run: budget 1500 s, stages 123")
    for stage in ("1 (CUDA tests)", "2 (throughput)", "3 (real photos)"):
        assert re.search(rf"stage {re.escape(stage)}: exit 0 after \d+ s", main_log), stage

    # Stage 1: pytest -m cuda collects the CUDA tests; without a GPU each one is skipped, none fails.
    counts = re.findall(r"^(\d+) skipped, \d+ deselected in", (out / "1_tests.log").read_text(), re.M)
    assert counts and int(counts[0]) > 0

    # Stage 2: each command's images/s and phase times, read into summary.json. No torch.compile on the CPU, and
    # no teacher: its stand-in would be the student's command again.
    summary = json.loads((out / "summary.json").read_text())
    throughput = summary["throughput"]
    assert list(throughput) == ["student", "distill", "eval"] and "teacher: not run in the dry run" in main_log
    for name in ("student", "distill"):
        numbers = throughput[name]
        assert numbers["exit"] == 0 and numbers["images_per_s"] > 0 and numbers["step_ms"] > 0, name
        assert set(numbers["phases"]) == {"data wait", "forward", "matching + loss", "backward", "optimizer"}
    distill_line = re.search(r"distill\.methods=\[([^]]*)\]", EXPERIMENT.read_text()).group(1)
    methods = " ".join(m.strip() for m in distill_line.split(","))  # the experiment's best-measured method
    assert f"--methods {methods} " in throughput["distill"]["command"]
    assert throughput["eval"]["eval_total_s"] > 0 and throughput["eval"]["exit"] == 0
    # images/s and GPU busy share per training command, and the evaluation's seconds
    assert len(summary["goals"]) == 2 * len(GOALS) + 1
    assert all(isinstance(goal["met"], bool) for goal in summary["goals"].values())

    # Stage 3: the teacher, the student alone and distilled, per-class AP and the teacher-student gap.
    report = (out / "compare.md").read_text()
    assert "| teacher (trained once) |" in report and "| alone (baseline) |" in report
    assert re.search(r"^\| distilled \|.*\| [+-][\d.]+ \|$", report, re.M)  # its gap to the teacher
    real = summary["real_photos"]
    per_class = real["arms"]["alone"]["per_class"]  # the classes with GT in the 4 test images
    assert per_class and set(per_class) <= set(SYNTHETIC_CLASSES)
    assert all(re.search(rf"^\| {name} \| [\d.]+ \| [\d.]+ \| [\d.]+ ", report, re.M) for name in per_class)
    assert set(real["arms"]) == {"alone", "distilled"} and real["teacher"]["mAP"] >= 0
    for arm in real["arms"].values():
        assert arm["vs_teacher"]["mean"] == pytest.approx(arm["mean"] - real["teacher"]["mAP"])
    planned = yaml.safe_load((work / "voc5_real.yaml").read_text())
    assert planned["seeds"] == [1] and "optim.max_iters=2" in planned["teacher"]["overrides"]
    assert f"distill.methods=[{distill_line}]" in planned["arms"]["distilled"]["overrides"]


def test_options_are_checked():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    for args, message in (
        (["--nope", "out"], "unknown option --nope"),
        ([], "OUTDIR is missing"),
        (["--stages", "14", "out"], "--stages takes digits 1-3"),
        (["--budget", "soon", "out"], "--budget takes seconds"),
        (["--budget"], "--budget needs a value"),
        (["a", "b"], "one OUTDIR, got a and b"),
    ):
        done = gpu_check(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert "--dry-run" in gpu_check("--help").stdout


def test_printed_gpu_commands_are_valid(tmp_path, run_scripts):
    """The dry run swaps the VGG16 models and the sizes for small ones: the GPU's own command lines, printed,
    must parse (the benchmarks') and hold the stages' essentials."""
    done = gpu_check("--print", "--work", tmp_path / "work", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    commands = dict(re.findall(r"^(\w+) \(limit \d+ s\): (.*)$", done.stdout, re.M))
    assert list(commands) == ["tests", "teacher", "student", "distill", "eval", "student_compile", "distill_compile",
                              "teacher_compile", "plan", "compare"]  # fmt: skip
    assert commands["tests"].endswith("-m pytest -q -m cuda -n 0 -p no:cacheprovider --durations=15 tests")
    bench = {name: shlex.split(line)[2:] for name, line in commands.items() if "benchmark.py" in line}
    for name in ("teacher", "student", "distill"):  # the same commands, compiled
        assert bench[f"{name}_compile"] == [*bench[name], "--compile"], name
    # Each subcommand's lines parse: the only error benchmark.py finds is the unknown option put last, which it
    # reports after reading everything else (and before running anything). The student's lines differ from the
    # teacher's only in values of the kinds the dry run's lines hold (a model name, an iteration count).
    probed = ["teacher_compile", "distill_compile", "eval"]
    probes = run_scripts(*(("benchmark.py", *bench[name], "--probe") for name in probed))
    for name, probe in zip(probed, probes, strict=True):
        assert probe.returncode == 2, (name, probe.stderr)
        assert probe.stderr.strip().endswith("error: unrecognized arguments: --probe"), (name, probe.stderr)

    def value(name: str, option: str) -> str:
        return bench[name][bench[name].index(option) + 1]

    assert value("teacher", "--model") == "vgg16_ssd300" and value("distill", "--teacher-model") == "vgg16_lite300"
    assert value("eval", "--images") == "4952" and all(value(name, "--batch") == "64" for name in bench)
    assert all("--device" not in args for args in bench.values())
    assert all("--cache" in args for name, args in bench.items() if name != "eval")
    assert "configs/compare_voc5_real.yaml" in commands["plan"] and "voc5_real.yaml" in commands["compare"]


def test_real_photo_plan_fits_the_seconds_at_the_measured_speed(tmp_path):
    log = tmp_path / "2_throughput.log"
    log.write_text("### student: benchmark.py train\nend to end, the trainer's loop: 3200.0 images/s in total\n")
    experiment = load_experiment(EXPERIMENT)
    arms = {"teacher": experiment.teacher, **{arm.name: arm for arm in experiment.arms}}
    configs = {name: load_config(arm.config, arm.overrides) for name, arm in arms.items()}

    def plan(seconds, log_file, iters=None):
        """The iterations planned per run, and the runs' specs."""
        planned = plan_experiment(EXPERIMENT, seconds, log_file, str(tmp_path / "runs"), iters)
        planned.write(tmp_path / "plan.yaml")
        written = planned.experiment
        assert yaml.safe_load((tmp_path / "plan.yaml").read_text()) == written  # a file compare.py reads
        assert written["seeds"] == experiment.seeds[:1] and written["output_dir"] == str(tmp_path / "runs")
        runs = {"teacher": written["teacher"], **written["arms"]}
        lengths = {name: run.iterations for name, run in planned.runs.items()}
        assert all(f"optim.max_iters={lengths[name]}" in spec["overrides"] for name, spec in runs.items())
        return lengths, runs

    def seconds_spent(iterations, images_per_s):
        """What the plan expects the comparison to take: the overheads and each run's images at its cost."""
        return ONCE_OVERHEAD_S + sum(
            RUN_OVERHEAD_S + n * configs[name].data.batch_size
            * (COST_DISTILLED if configs[name].distill is not None else 1.0) / images_per_s
            for name, n in iterations.items()
        )  # fmt: skip

    def rounding(images_per_s):
        """At most an iteration per run: what rounding the iterations may add or take."""
        return seconds_spent(dict.fromkeys(arms, 1), images_per_s) - seconds_spent(dict.fromkeys(arms, 0), images_per_s)

    speed = SPEED_DISCOUNT * 3200
    for seconds in (400, 800):
        n, runs = plan(seconds, log)
        assert seconds_spent(n, speed) == pytest.approx(seconds, abs=rounding(speed))
        # The configs' schedules, scaled alike: the teacher's longer one, the two students paired.
        ratio = configs["teacher"].optim.max_iters / configs["alone"].optim.max_iters
        assert n["alone"] == n["distilled"] and n["teacher"] == pytest.approx(ratio * n["alone"], abs=1)
    for name, spec in runs.items():  # (800 s) one evaluation, at the end; the warm-up scaled with the run
        cfg = configs[name]
        assert spec["config"] == str(arms[name].config) and spec["overrides"][: len(arms[name].overrides)] == list(
            arms[name].overrides
        )  # the experiment's own overrides (the distillation method) come first
        warmup = max(1, round(n[name] * cfg.optim.warmup_iters / cfg.optim.max_iters))
        assert {f"optim.warmup_iters={warmup}", f"train.eval_every={n[name]}"} <= set(spec["overrides"])
    # Nothing measured: a cautious speed; a dry run: the iterations given.
    guessed, _ = plan(400, tmp_path / "missing.log")
    fallback = FALLBACK_IMAGES_PER_S
    assert seconds_spent(guessed, fallback) == pytest.approx(400, abs=rounding(fallback))
    assert set(plan(400, log, iters=2)[0].values()) == {2}
