"""The Python steps of ``scripts/gpu_check.sh``: size its real-photo stage to the seconds left at the speed
its throughput stage measured (:func:`plan_experiment`), and read its logs into one summary
(:func:`summarise`, :func:`digest`), the goals met or missed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUSY_GOAL",
    "COST_DISTILLED",
    "EVAL_GOAL_S",
    "FALLBACK_IMAGES_PER_S",
    "GOALS",
    "MIN_ITERS",
    "ONCE_OVERHEAD_S",
    "RUN_OVERHEAD_S",
    "SPEED_DISCOUNT",
    "PlannedRun",
    "RealPhotoPlan",
    "digest",
    "log_blocks",
    "plan_experiment",
    "stage_results",
    "summarise",
    "throughput_numbers",
]

# Issue 8's goals on one GPU (docs/BENCHMARKS.md): images/s of the throughput commands, GPU busy share, and
# the seconds of the student's evaluation of VOC07 test (4,952 images).
GOALS = {"teacher": 1500, "student": 3000, "distill": 2000}
BUSY_GOAL = 90
EVAL_GOAL_S = 15

# Sizing the real-photo stage. Cost of an image relative to training MobileNetV2-SSDLite x1.0 (the measured
# "student" throughput): x0.5 is taken as no cheaper (at this size the loader and kernel launches, not the
# arithmetic, set the pace); a distilled image adds the x1.0 teacher's forward pass (about a third of training
# it) and the distiller's terms. Per run, seconds besides the iterations: start-up, the decoded-image cache,
# loader workers, cuDNN's autotuning, checkpoints and the final evaluation of the 400 test photos; once: the
# imports, the report and its pictures. The measured speed is discounted for the real-photo data and logging.
COST_DISTILLED = 1.5
RUN_OVERHEAD_S = 20
ONCE_OVERHEAD_S = 15
SPEED_DISCOUNT = 0.75
FALLBACK_IMAGES_PER_S = 1000  # no throughput measured (stage 2 skipped or failed): a cautious guess
MIN_ITERS = 20


# ---------------------------------------------------------------------------------------------- reading logs
def log_blocks(path: Path) -> dict[str, list[str]]:
    """The lines of each command in a stage log, keyed by the name in its ``### name: command`` header."""
    blocks: dict[str, list[str]] = {}
    lines: list[str] = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            header = re.match(r"### (\S+): ", line)
            if header:
                lines = blocks.setdefault(header.group(1), [])
            lines.append(line)
    return blocks


def _search(pattern: str, lines: list[str]) -> re.Match | None:
    return next((m for m in (re.search(pattern, line) for line in lines) if m), None)


def _number(pattern: str, lines: list[str]) -> float | None:
    found = _search(pattern, lines)
    return float(found.group(1)) if found else None


def throughput_numbers(lines: list[str]) -> dict:
    """What one ``benchmark.py train | distill | eval`` command printed (None where it printed nothing):
    images/s, GPU busy %, peak memory in GiB, per phase ms and % of the step, the evaluation's seconds."""
    phases = {}
    for line in lines:
        found = re.match(r"\s+(data wait|forward|matching \+ loss|backward|optimizer)\s+([\d.]+) ms\s+([\d.]+)%", line)
        if found:
            phases[found.group(1)] = {"ms": float(found.group(2)), "share_pct": float(found.group(3))}
    step = _search(r"step\s+([\d.]+) ms -> ([\d.]+) images/s; device busy ([\d.]+)%", lines)
    done = _search(r"^--- \S+: exit (\d+) after (\d+) s", lines)
    return {
        "command": lines[0].split(": ", 1)[1] if lines else None,
        "exit": int(done.group(1)) if done else None,
        "seconds": int(done.group(2)) if done else None,
        "what": next((line for line in lines if re.match(r"(train|distill): ", line)), None),
        "images_per_s": _number(r"the trainer's loop: ([\d.]+) images/s", lines),
        "gpu_busy_median_pct": _number(r"GPU busy during the loop .*: median (\d+)%", lines),
        "peak_memory_gib": _number(r"peak GPU memory: ([\d.]+) GiB", lines),
        "phases": phases,
        "step_ms": float(step.group(1)) if step else None,
        "device_busy_pct": float(step.group(3)) if step else None,
        "eval_detection_s": _number(r"^detection \(.*?\)\s+([\d.]+) s", lines),
        "eval_total_s": _number(r"^total\s+([\d.]+) s", lines),
        "eval_images_per_s": _number(r"^total\s+[\d.]+ s\s+([\d.]+) images/s", lines),
    }


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its model, batch size, iterations, and the seconds expected (start-up included)."""

    model: str
    width_mult: float
    batch_size: int
    iterations: int
    seconds: float


@dataclass(frozen=True)
class RealPhotoPlan:
    """The experiment for ``scripts/compare.py`` (one seed, the schedules at their planned lengths), the
    student's measured images/s (None: not measured), the speed planned at, and each run's plan."""

    experiment: dict
    measured_images_per_s: float | None
    planned_images_per_s: float
    runs: dict[str, PlannedRun]

    def write(self, path: str | Path) -> None:
        """The experiment file, as JSON (which is YAML), its folder made if need be."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.experiment, indent=1) + "\n")


def plan_experiment(
    experiment: Path,
    seconds: int,
    throughput_log: Path,
    output_dir: str,
    iters: int | None = None,
    overrides: Sequence[str] = (),
) -> RealPhotoPlan:
    """The experiment file ``experiment`` with one seed, its runs in ``output_dir``, ``overrides`` for every
    run, and every run's iterations scaled so that all fit ``seconds`` at the student's images/s in the
    throughput stage's log (``iters``: that many for every run instead); the teacher keeps its longer
    schedule."""
    # Configs import torch: only the plan needs them, the summary reads text.
    from odkd.compare import Arm, load_experiment
    from odkd.config import load_config

    loaded = load_experiment(experiment)
    overrides = [*loaded.overrides, *overrides]
    runs = [("teacher", loaded.teacher)] if loaded.teacher else []
    runs += [(arm.name, arm) for arm in loaded.arms]
    configs = {name: load_config(arm.config, [*overrides, *arm.overrides]) for name, arm in runs}

    measured = throughput_numbers(log_blocks(Path(throughput_log)).get("student", []))["images_per_s"]
    speed = SPEED_DISCOUNT * measured if measured else FALLBACK_IMAGES_PER_S
    cost = {name: COST_DISTILLED if cfg.distill is not None else 1.0 for name, cfg in configs.items()}

    def run_seconds(name: str, iterations: int) -> float:
        return iterations * configs[name].data.batch_size * cost[name] / speed

    for_training = seconds - ONCE_OVERHEAD_S - RUN_OVERHEAD_S * len(runs)
    scale = max(for_training, 0) / sum(run_seconds(name, cfg.optim.max_iters) for name, cfg in configs.items())
    planned = {name: iters or max(MIN_ITERS, round(cfg.optim.max_iters * scale)) for name, cfg in configs.items()}

    def spec(name: str, arm: Arm) -> dict:
        """The run's config file and overrides, with its schedule at the planned length (warm-up and
        evaluation scaled with it: one evaluation, at the end)."""
        cfg, n = configs[name], planned[name]
        warmup = max(1, round(n * cfg.optim.warmup_iters / cfg.optim.max_iters))
        schedule = [f"optim.max_iters={n}", f"optim.warmup_iters={warmup}", f"train.eval_every={n}",
                    f"train.checkpoint_every={n}"]  # fmt: skip
        return {"config": str(Path(arm.config).resolve()), "overrides": [*arm.overrides, *schedule]}

    plan = {
        "output_dir": output_dir,
        "seeds": loaded.seeds[:1],
        "overrides": overrides,
        "baseline": loaded.baseline,
        "arms": {arm.name: spec(arm.name, arm) for arm in loaded.arms},
    }
    if loaded.teacher:
        plan["teacher"] = spec("teacher", loaded.teacher)
    planned_runs = {
        name: PlannedRun(
            cfg.model.name,
            cfg.model.width_mult,
            cfg.data.batch_size,
            planned[name],
            RUN_OVERHEAD_S + run_seconds(name, planned[name]),
        )
        for name, cfg in configs.items()
    }
    return RealPhotoPlan(plan, measured, speed, planned_runs)


# ---------------------------------------------------------------------------------------------- summary
def stage_results(main_log: Path) -> dict:
    """Per stage, its ``stage N (name): ...`` line of gpu_check.log: exit status and seconds, or why skipped."""
    stages = {}
    text = main_log.read_text(errors="replace") if main_log.is_file() else ""
    for found in re.finditer(r"stage (\d) \(([^)]*)\): (?:exit (\d+) after (\d+) s|(skipped.*))", text):
        number, name, rc, seconds, skipped = found.groups()
        stages[number] = {"name": name, "exit": int(rc) if rc else None, "seconds": int(seconds) if seconds else None}
        if skipped:
            stages[number]["skipped"] = skipped
    return stages


def summarise(out: Path, compare_json: Path | None) -> dict:
    """Everything the logs in ``out`` hold (the run, device, stages, test counts, throughput numbers, goals),
    and the comparison's report ``compare_json``."""
    text = (out / "gpu_check.log").read_text(errors="replace") if (out / "gpu_check.log").is_file() else ""
    tests = (out / "1_tests.log").read_text(errors="replace") if (out / "1_tests.log").is_file() else ""
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)\s*=*$", tests, re.M)
    throughput = {name: throughput_numbers(lines) for name, lines in log_blocks(out / "2_throughput.log").items()}
    goals = {}
    for name, goal in GOALS.items():
        numbers = throughput.get(name, {})
        rate, busy = numbers.get("images_per_s"), numbers.get("gpu_busy_median_pct")
        goals[f"{name} >= {goal} images/s"] = {"value": rate, "met": rate is not None and rate >= goal}
        goals[f"{name} GPU busy >= {BUSY_GOAL}%"] = {"value": busy, "met": busy is not None and busy >= BUSY_GOAL}
    seconds = throughput.get("eval", {}).get("eval_total_s")
    goals[f"student evaluation < {EVAL_GOAL_S} s"] = {
        "value": seconds, "met": seconds is not None and seconds < EVAL_GOAL_S
    }  # fmt: skip
    header = re.search(r"^(gpu_check.sh.*)$", text, re.M)
    device, started = re.search(r"^device: (.*)$", text, re.M), re.search(r"started: (\S+)", text)
    return {
        "run": header.group(1) if header else None,
        "started": started.group(1) if started else None,
        "device": device.group(1) if device else None,
        "stages": stage_results(out / "gpu_check.log"),
        "tests": counts[-1] if counts else None,
        "throughput": throughput,
        "goals": goals,
        "real_photos": json.loads(compare_json.read_text()) if compare_json and compare_json.is_file() else None,
    }


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.4g}{unit}"


def digest(data: dict) -> str:
    """The summary of :func:`summarise` in a few lines: stages, throughput, goals, the real-photo mAPs and gap."""
    lines = [f"{data['run']}; {data['device']}", f"tests: {data['tests']}"]
    for number, stage in data["stages"].items():
        how = stage.get("skipped") or f"exit {stage['exit']} after {stage['seconds']} s"
        lines.append(f"stage {number} ({stage['name']}): {how}")
    lines += ["", "| command | images/s | GPU busy (NVML) | step | data wait | peak memory | exit |", "|---" * 7 + "|"]
    for name, row in data["throughput"].items():
        if row["eval_total_s"] is not None:  # the evaluation: images/s over the whole set
            cells = [_fmt(row["eval_images_per_s"]), "", f"{_fmt(row['eval_total_s'], ' s')} in all", "", ""]
        else:
            wait = row["phases"].get("data wait", {}).get("share_pct")
            cells = [_fmt(row["images_per_s"]), _fmt(row["gpu_busy_median_pct"], "%"), _fmt(row["step_ms"], " ms"),
                     _fmt(wait, "%"), _fmt(row["peak_memory_gib"], " GiB")]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} | {row['exit']} |")
    lines.append("")
    for goal, result in data["goals"].items():
        lines.append(f"goal {goal}: {'met' if result['met'] else 'MISSED'} ({_fmt(result['value'])})")
    real = data["real_photos"]
    if real:
        parts = [f"teacher {_fmt(real['teacher']['mAP'])}"] if real.get("teacher") else []
        for name, arm in real["arms"].items():
            gap = arm.get("vs_teacher", {}).get("mean")
            versus = arm.get("vs_baseline", {}).get("mean")
            against = f", vs {real['baseline']} {_fmt(versus)}" if versus is not None else ""
            parts.append(f"{name} {_fmt(arm['mean'])} (vs teacher {_fmt(gap)}{against})")
        lines += ["", "real photos, mAP: " + "; ".join(parts)]
    return "\n".join(lines)
