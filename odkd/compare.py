"""Paired comparisons over seeds: does a distilled student beat the student alone, by more than seed noise?

An experiment is a few *arms*, each a config file plus overrides, trained with the same seeds; one arm
is the baseline (usually the student alone), and an optional *teacher* is trained once and given to
every distilled arm. Optional *pretrain* runs are trained once before the rest; an arm or the teacher
naming one as its ``init`` starts from its final weights (``model.init_checkpoint``), as a VOC student
starts from ImageNet weights. The same seed gives every arm the same initial student weights, data
order and augmentation, so ``arm - baseline`` on one seed is a paired difference; over n seeds its mean
and its 95% confidence interval (paired t) say whether a method helps, and by how much::

    experiment = load_experiment("configs/compare_demo.yaml")
    result = run_experiment(experiment)    # resumable: finished runs are reused, cut ones resumed
    write_report(result)                   # compare.md, compare.json, compare.png in experiment.output_dir

An arm distils when its config has a ``distill`` section; the experiment's teacher, when it has one,
replaces the file that section names. Runs go to ``<output_dir>/<arm>/seed<k>``; the final evaluation (at
``optim.max_iters``) is what is compared. Works on any data the trainer reads, on the CPU or GPUs, and
under torchrun (every process runs the loop; rank 0 writes the report).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from odkd.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Arm",
    "ComparisonResult",
    "Experiment",
    "PairedDifference",
    "RunRecord",
    "load_experiment",
    "paired_difference",
    "run_experiment",
    "write_report",
]

TEACHER = "teacher"


@dataclass(frozen=True)
class Arm:
    """One config of the comparison: a YAML file (None: the defaults) and overrides ``section.key=value``."""

    name: str
    config: str | None
    overrides: tuple[str, ...] = ()
    init: str | None = None  # the pretrain run whose final weights this arm starts from


@dataclass
class Experiment:
    arms: list[Arm]  # the baseline among them
    baseline: str
    seeds: list[int]
    output_dir: str
    teacher: Arm | None = None  # trained once (its config's seed); distilled arms distil from its final model
    overrides: tuple[str, ...] = ()  # for every run, the teacher's and the pretrain runs' included
    pretrain: list[Arm] = field(default_factory=list)  # trained once, before the rest (their config's seed)

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    @property
    def every_arm(self) -> list[Arm]:
        """The pretrain runs, the teacher (if any) and the arms, in the order they are trained."""
        return [*self.pretrain, *([self.teacher] if self.teacher else []), *self.arms]

    def __post_init__(self) -> None:
        names = self.arm_names
        pretrain = [p.name for p in self.pretrain]
        every = [*names, *pretrain, TEACHER]
        if not names or len(set(every)) != len(every):
            raise ConfigError(
                f"experiment arms and pretrain runs need distinct names (and none called {TEACHER!r}), "
                f"got arms {names}, pretrain {pretrain}"
            )
        if any(p.init is not None for p in self.pretrain):
            raise ConfigError("a pretrain run starts from its own config's weights; it takes no init")
        for arm in self.every_arm:
            if arm.init is not None and arm.init not in pretrain:
                raise ConfigError(f"{arm.name}: init {arm.init!r} is not a pretrain run (those: {pretrain})")
        if self.baseline not in names:
            raise ConfigError(f"the baseline {self.baseline!r} is not one of the arms {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment seeds must be distinct and at least one, got {self.seeds}")


def load_experiment(path: str | Path) -> Experiment:
    """An experiment file (YAML)::

        output_dir: runs/compare_demo
        seeds: [1, 2, 3, 4, 5]
        overrides: []                  # optional, for every run
        pretrain:                      # optional: trained once, first; arms name one as their init
          student_init: {config: demo_student_synthetic.yaml}
        teacher: {config: demo_teacher_synthetic.yaml}            # optional; may have an init too
        baseline: alone
        arms:
          alone: {config: demo_student_synthetic.yaml, init: student_init}
          hinton: {config: demo_distill_synthetic.yaml, overrides: ["distill.methods=[hinton]"]}

    Config paths are relative to the experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    known = {"output_dir", "seeds", "overrides", "pretrain", "teacher", "baseline", "arms"}
    pretrain = (tree.get("pretrain") or {}) if isinstance(tree, dict) else {}
    if (
        not isinstance(tree, dict) or set(tree) - known or not isinstance(tree.get("arms"), dict)
        or not isinstance(pretrain, dict)
    ):  # fmt: skip
        raise ConfigError(
            f"{path}: an experiment is a mapping with 'arms' (name: {{config, overrides}}) and "
            f"optionally {sorted(known - {'arms'})} (pretrain: a mapping name: {{config, overrides}})"
        )

    def arm(name: str, spec) -> Arm:
        if not isinstance(spec, dict) or set(spec) - {"config", "overrides", "init"}:
            raise ConfigError(
                f"{path}: arm {name}: expected {{config: FILE, overrides: [key=value, ...], init: PRETRAIN}}, "
                f"got {spec}"
            )
        config = spec.get("config")
        return Arm(
            name, str(path.parent / config) if config else None, tuple(spec.get("overrides") or ()), spec.get("init")
        )

    arms = [arm(name, spec) for name, spec in tree["arms"].items()]
    return Experiment(
        arms=arms,
        baseline=tree.get("baseline", arms[0].name),
        seeds=list(tree.get("seeds", [1, 2, 3, 4, 5])),
        output_dir=tree.get("output_dir", f"runs/{path.stem}"),
        teacher=arm(TEACHER, tree["teacher"]) if tree.get("teacher") else None,
        overrides=tuple(tree.get("overrides") or ()),
        pretrain=[arm(name, spec) for name, spec in pretrain.items()],
    )


# ---------------------------------------------------------------------------------------------- running
@dataclass
class RunRecord:
    """What one finished run left: its final evaluation and its training records."""

    arm: str
    seed: int | None
    output_dir: str
    mAP: float
    ap: dict[str, float | None]  # per class
    losses: dict[str, list[tuple[int, float]]]  # term -> (iteration, value) of the training log
    how: str  # "trained", "resumed" or "reused"


@dataclass
class ComparisonResult:
    experiment: Experiment
    runs: dict[str, dict[int, RunRecord]]  # arm -> seed -> run
    teacher: RunRecord | None
    environment: dict[str, str] = field(default_factory=dict)
    pretrain: dict[str, RunRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    """One run of the experiment: its arm (or teacher, or pretrain run), seed (None: trained once), config,
    and the names of the runs trained once that it needs finished first (its init, its teacher)."""

    name: str
    seed: int | None
    cfg: Config
    needs: tuple[str, ...] = ()


def _run_config(experiment: Experiment, arm: Arm, seed: int | None, teacher_file: str | None) -> Config:
    out = Path(experiment.output_dir) / arm.name / (f"seed{seed}" if seed is not None else "")
    overrides = [*experiment.overrides, *arm.overrides, f"train.output_dir={out}"]
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if arm.init is not None:
        overrides.append(f"model.init_checkpoint={_final_model(experiment, arm.init)}")
    cfg = load_config(arm.config, overrides)
    if cfg.distill is not None and teacher_file is not None:  # the experiment's teacher replaces the config's
        cfg = load_config(arm.config, [*overrides, f"distill.teacher={teacher_file}"])
    return cfg


def _final_model(experiment: Experiment, name: str) -> str:
    """Where the run ``name`` that is trained once (the teacher, a pretrain run) leaves its final model."""
    return str(Path(experiment.output_dir) / name / "model_final.pt")


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _input_digests(cfg: Config) -> dict[str, str | None]:
    """The digests of the model files a run starts from (its initial weights) and distils from (its teacher)."""
    return {
        "init": _file_digest(cfg.model.init_checkpoint),
        "teacher": _file_digest(cfg.distill.teacher if cfg.distill is not None else None),
    }


INPUTS_MARKER = "compare_inputs.json"


def earlier_run(cfg: Config) -> tuple[bool, bool]:
    """What an earlier run of exactly this config (and initial weights, and teacher file) left in
    ``train.output_dir``: (finished: its final evaluation is logged, resume: it stopped before). Another
    config, other model files, or nothing there: (False, False), train afresh."""
    from odkd.engine.trainer import read_metrics

    out = Path(cfg.train.output_dir)
    try:
        same = (out / "config.yaml").is_file() and load_config(out / "config.yaml") == cfg
    except ConfigError:  # written by another odkd version: not this config
        same = False
    marker = out / INPUTS_MARKER
    inputs = json.loads(marker.read_text()) if marker.is_file() else None
    if not same or inputs != _input_digests(cfg):
        return False, False
    finished = any(r["iter"] == cfg.optim.max_iters and "mAP" in r for r in read_metrics(out))
    return finished, not finished


def _plan(cfg: Config, fresh: bool) -> str:
    """How the run of ``cfg`` goes: "reused" (finished earlier), "resumed" (cut earlier) or "trained" (its
    folder marked with the model files it starts from and distils from)."""
    finished, resume = (False, False) if fresh else earlier_run(cfg)
    if finished:
        return "reused"
    if resume:
        return "resumed"
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INPUTS_MARKER).write_text(json.dumps(_input_digests(cfg)))
    return "trained"


def _train(cfg: Config, device: str | None, progress: bool, how: str) -> None:
    """Run what :func:`_plan` decided for ``cfg``."""
    from odkd.engine.build import run_training

    if how != "reused":  # a changed arm retrains: its folder holds the old config's files
        run_training(cfg, "auto" if how == "resumed" else None, device, progress, overwrite=True)


def _train_in_process(cfg: Config, device: str | None, how: str, threads: int) -> None:
    """A child process's run (``jobs`` > 1): ``threads`` threads, its output (the readable log, warnings, a
    traceback) in ``<train.output_dir>/compare.log`` instead of interleaved with the other runs'."""
    import os

    import torch

    torch.set_num_threads(threads)
    with open(Path(cfg.train.output_dir) / "compare.log", "a") as log_file:  # the trainer's setup_logging
        os.dup2(log_file.fileno(), 1)  # writes its readable lines to stdout
        os.dup2(log_file.fileno(), 2)
    _train(cfg, device, False, how)


def _record(arm: str, seed: int | None, cfg: Config, how: str) -> RunRecord:
    from odkd.engine.trainer import TrainingError, read_metrics

    records = read_metrics(cfg.train.output_dir)
    final = next((r for r in reversed(records) if r["iter"] == cfg.optim.max_iters and "mAP" in r), None)
    if final is None:  # stopped (Ctrl-C, SIGTERM) with a checkpoint: the next call resumes it
        raise TrainingError(
            f"{cfg.train.output_dir}: stopped before its final evaluation (iteration {cfg.optim.max_iters}); "
            "run the experiment again to resume it"
        )
    losses: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if "lr" not in record:  # evaluations and the step-0 calibration
            continue
        for key, value in record.items():
            if key not in ("iter", "lr", "images_per_s") and isinstance(value, float) and math.isfinite(value):
                losses.setdefault(key, []).append((record["iter"], value))
    return RunRecord(arm, seed, str(cfg.train.output_dir), final["mAP"], final["ap"], losses, how)


def plan_runs(experiment: Experiment, arms: list[str] | None = None) -> list[PlannedRun]:
    """Every run of the experiment with the config it trains, in training order: the pretrain runs the
    chosen arms and the teacher start from, the teacher, then every chosen arm on every seed, seed by seed.
    ``arms``: a subset of the arm names (the baseline is always in)."""
    unknown = sorted(set(arms or ()) - set(experiment.arm_names))
    if unknown:
        raise ConfigError(f"no arm named {', '.join(unknown)} in the experiment (its arms: {experiment.arm_names})")
    chosen = [a for a in experiment.arms if arms is None or a.name in arms or a.name == experiment.baseline]
    teacher = experiment.teacher
    inits = {a.init for a in [*([teacher] if teacher else []), *chosen]}
    plan = [
        PlannedRun(p.name, None, _run_config(experiment, p, None, None)) for p in experiment.pretrain if p.name in inits
    ]

    def needs(arm: Arm, cfg: Config) -> tuple[str, ...]:
        distils = cfg.distill is not None and teacher is not None
        return tuple(name for name in (arm.init, TEACHER if distils else None) if name is not None)

    teacher_file = None
    if teacher is not None:
        cfg = _run_config(experiment, teacher, None, None)
        plan.append(PlannedRun(TEACHER, None, cfg, needs(teacher, cfg)))
        teacher_file = _final_model(experiment, TEACHER)
    for seed in experiment.seeds:
        for arm in chosen:
            cfg = _run_config(experiment, arm, seed, teacher_file)
            plan.append(PlannedRun(arm.name, seed, cfg, needs(arm, cfg)))
    return plan


def run_experiment(
    experiment: Experiment,
    device: str | None = None,
    progress: bool = False,
    fresh: bool = False,
    arms: list[str] | None = None,
    jobs: int = 1,
) -> ComparisonResult:
    """Train the runs of ``plan_runs(experiment, arms)``: the pretrain runs and the teacher (once each), then
    every arm on every seed, seed by seed (so an interrupted experiment holds complete pairs); reuse finished
    runs of the same config and resume cut ones unless ``fresh``. ``jobs`` > 1 (CPU): that many runs at once,
    each in a process of its own with an equal share of this process's threads, a run starting once the
    runs it needs (its init, its teacher) have finished; a small model trains about as fast on one thread as
    on two, so two runs at once on two cores do nearly twice the work."""
    from odkd.engine.build import log

    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    plan = plan_runs(experiment, arms)

    def finished(run: PlannedRun, how: str) -> RunRecord:
        record = _record(run.name, run.seed, run.cfg, how)
        log.info("%-24s mAP %.2f (%s)", _label(run.name, run.seed), 100 * record.mAP, how)
        return record

    if jobs == 1:  # in plan order, which puts every run after the runs it needs
        records = {}
        for run in plan:
            how = _plan(run.cfg, fresh)
            _train(run.cfg, device, progress, how)
            records[run.name, run.seed] = finished(run, how)
    else:
        records = _run_in_parallel(plan, device, fresh, jobs, finished)
    runs: dict[str, dict[int, RunRecord]] = {}
    for run in plan:  # arms in the experiment's order, each with its seeds
        if run.seed is not None:
            runs.setdefault(run.name, {})[run.seed] = records[run.name, run.seed]
    pretrain = {p.name: records[p.name, None] for p in experiment.pretrain if (p.name, None) in records}
    return ComparisonResult(experiment, runs, records.get((TEACHER, None)), _environment(device, jobs), pretrain)


def _run_in_parallel(plan: list[PlannedRun], device: str | None, fresh: bool, jobs: int, finished) -> dict:
    """The runs of ``plan``, ``jobs`` at a time in child processes, in plan order except that a run waits for
    the runs it needs; ``finished(run, how)`` gives each its record. A run that fails stops the others (they
    checkpoint: the next call resumes them) and raises TrainingError."""
    import multiprocessing
    import multiprocessing.connection
    import os

    from odkd.device import select_device
    from odkd.engine.build import log, write_synthetic_data
    from odkd.engine.trainer import TrainingError

    if select_device(device).type != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"jobs={jobs} runs several CPU runs at once (--device cpu); on GPUs: one, or torchrun")
    for run in plan:  # here, once: runs writing the same synthetic data at once would mix their files
        if run.cfg.data.synthetic:
            write_synthetic_data(run.cfg)
    threads = _threads_per_run(jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
    waiting, running, records = list(plan), {}, {}
    while waiting or running:
        # One run started or reused per pass, so a reused run frees its slot at once and a reused teacher
        # makes the distilled runs ready at once.
        run = next((r for r in waiting if all((name, None) in records for name in r.needs)), None)
        if run is not None and len(running) < jobs:
            waiting.remove(run)
            how = _plan(run.cfg, fresh)
            if how == "reused":
                records[run.name, run.seed] = finished(run, how)
            else:
                process = context.Process(target=_train_in_process, args=(run.cfg, device, how, threads))
                process.start()
                log.info("%-24s started (%s)", _label(run.name, run.seed), run.cfg.train.output_dir)
                running[process.sentinel] = (process, run, how)
            continue
        for sentinel in multiprocessing.connection.wait(list(running)):
            process, run, how = running.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                for other, *_ in running.values():
                    other.terminate()  # SIGTERM: the run checkpoints and ends
                    other.join()
                out = run.cfg.train.output_dir
                log_file = Path(out) / "compare.log"
                last = log_file.read_text().strip().splitlines()[-1:] if log_file.is_file() else []
                where = f"{last[0]} (log: {log_file})" if last else "it failed while starting, before its log"
                raise TrainingError(f"{out}: the run failed (exit {process.exitcode}): {where}")
            records[run.name, run.seed] = finished(run, how)
    return records


def _label(name: str, seed: int | None) -> str:
    return name if seed is None else f"seed {seed} {name}"


def _threads_per_run(jobs: int) -> int:
    """This process's threads shared among ``jobs`` runs at once."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def _environment(device: str | None, jobs: int) -> dict[str, str]:
    import torch

    cuda = torch.cuda.is_available() and device != "cpu"
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": where,
        "threads": str(_threads_per_run(jobs)),  # of each run
        "jobs": str(jobs),
        "torch": torch.__version__,
        "commit": commit or "unknown",
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class PairedDifference:
    """``arm - baseline`` over the seeds both ran, in mAP points (x 100)."""

    n: int
    mean: float
    low: float  # 95% confidence interval of the mean (paired t); nan for n < 2
    high: float
    better: int  # seeds on which the arm beat the baseline

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_difference(baseline: list[float], arm: list[float]) -> PairedDifference:
    """Mean of ``arm[i] - baseline[i]`` with its 95% confidence interval: mean +- t(0.975, n - 1) s / sqrt(n)."""
    from scipy.stats import t

    differences = [a - b for a, b in zip(arm, baseline, strict=True)]
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, sum(d > 0 for d in differences))
    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half, sum(d > 0 for d in differences))


def _paired(result: ComparisonResult, name: str) -> tuple[list[int], list[float], list[float]]:
    """Seeds both the arm and the baseline finished, and their mAPs x 100 on them."""
    base, runs = result.runs[result.experiment.baseline], result.runs[name]
    seeds = [s for s in result.experiment.seeds if s in base and s in runs]
    return seeds, [100 * base[s].mAP for s in seeds], [100 * runs[s].mAP for s in seeds]


def _class_means(runs: dict[int, RunRecord]) -> dict[str, float]:
    """Per class, the mean AP x 100 over the seeds (classes without a value on some seed are left out)."""
    classes = list(next(iter(runs.values())).ap)
    values = {c: [r.ap[c] for r in runs.values()] for c in classes}
    return {c: 100 * statistics.fmean(v) for c, v in values.items() if None not in v}


# ---------------------------------------------------------------------------------------------- report
def summary(result: ComparisonResult) -> dict:
    """Everything the report shows, as JSON-ready data."""
    experiment = result.experiment
    arms = {}
    for name, runs in result.runs.items():
        maps = [100 * runs[s].mAP for s in experiment.seeds if s in runs]
        entry = {
            "mAP": {str(s): 100 * runs[s].mAP for s in experiment.seeds if s in runs},
            "mean": statistics.fmean(maps) if maps else None,
            "std": statistics.stdev(maps) if len(maps) > 1 else None,
            "per_class": _class_means(runs) if runs else {},
        }
        if name != experiment.baseline and runs:
            seeds, base, mine = _paired(result, name)
            if seeds:
                diff = paired_difference(base, mine)
                entry["vs_baseline"] = {
                    "n": diff.n, "mean": diff.mean, "ci95": [diff.low, diff.high], "better": diff.better,
                    "per_class": {
                        c: statistics.fmean(
                            100 * (runs[s].ap[c] - result.runs[experiment.baseline][s].ap[c]) for s in seeds
                        )
                        for c in entry["per_class"]
                        if all(runs[s].ap[c] is not None and result.runs[experiment.baseline][s].ap[c] is not None
                               for s in seeds)
                    },
                }  # fmt: skip
        arms[name] = entry
    teacher = result.teacher
    teacher_data = None if teacher is None else {"mAP": 100 * teacher.mAP, "per_class": _class_means({0: teacher})}
    for entry in arms.values():  # the teacher-student gap: how far below the teacher each arm stays
        if teacher_data and entry["mean"] is not None:
            entry["vs_teacher"] = {
                "mean": entry["mean"] - teacher_data["mAP"],
                "per_class": {c: v - teacher_data["per_class"][c] for c, v in entry["per_class"].items()
                              if c in teacher_data["per_class"]},
            }  # fmt: skip
    return {
        "baseline": experiment.baseline,
        "seeds": experiment.seeds,
        "environment": result.environment,
        "teacher": teacher_data,
        "pretrain": {name: 100 * record.mAP for name, record in result.pretrain.items()},  # on their own data
        "arms": arms,
        "overrides": list(experiment.overrides),  # every run's, before its own
        "configs": {  # the runs that ran (``run_experiment(arms=...)`` may leave some arms out)
            a.name: {"config": a.config, "overrides": list(a.overrides), "init": a.init}
            for a in experiment.every_arm
            if a.name in arms or a.name in result.pretrain or (a.name == TEACHER and teacher)
        },
    }


def _number(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


ONE_SEED_NOTE = "One seed: a demonstration, not evidence (no spread, no interval); a claim needs 5 seeds or more."


def markdown(data: dict) -> str:
    """The report as Markdown: arms with the paired difference, per-class AP, per-seed mAP."""
    env = data["environment"]
    seeds = data["seeds"]
    teacher = data["teacher"]
    lines = [
        f"# Paired comparison: {len(seeds)} seed(s) {seeds}, baseline `{data['baseline']}`",
        "",
        f"{env.get('device')}, {env.get('threads')} threads"
        + (f" per run, {env['jobs']} runs at once" if env.get("jobs", "1") != "1" else "")
        + f", torch {env.get('torch')}, odkd {env.get('commit')}, "
        f"{env.get('date')}. mAP x 100 at the last iteration; the difference to the baseline is paired by seed, "
        "its interval the 95% confidence interval of the mean (paired t).",
        "",
        *([ONE_SEED_NOTE, ""] if len(seeds) == 1 else []),
        "| arm | mAP mean +- std | vs baseline | 95% CI | seeds better |" + (" vs teacher |" if teacher else ""),
        "|---|---|---|---|---|" + ("---|" if teacher else ""),
    ]
    if teacher:
        lines.append(f"| teacher (trained once) | {_number(teacher['mAP'])} | | | | |")
    for name, arm in data["arms"].items():
        label = f"{name} (baseline)" if name == data["baseline"] else name
        versus = arm.get("vs_baseline")
        cells = ["", "", ""]
        if versus:
            low, high = versus["ci95"]
            cells = [_number(versus["mean"], sign=True), f"[{_number(low, sign=True)}, {_number(high, sign=True)}]",
                     f"{versus['better']}/{versus['n']}"]  # fmt: skip
        if teacher:
            cells.append(_number(arm.get("vs_teacher", {}).get("mean"), sign=True))
        lines.append(f"| {label} | {_number(arm['mean'])} +- {_number(arm['std'])} | {' | '.join(cells)} |")
    base = data["arms"][data["baseline"]]
    if teacher and base["mean"] is not None and teacher["mAP"] > base["mean"]:
        gap = teacher["mAP"] - base["mean"]
        closed = [
            f"`{name}` closes {100 * arm['vs_baseline']['mean'] / gap:.0f}% of it"
            for name, arm in data["arms"].items()
            if name != data["baseline"] and "vs_baseline" in arm
        ]
        lines += ["", f"Teacher-student gap: the baseline is {gap:.2f} mAP below the teacher"
                  + (f"; {', '.join(closed)}." if closed else ".")]  # fmt: skip
    classes = list(next(iter(data["arms"].values()))["per_class"])
    columns = (["teacher"] if teacher else []) + list(data["arms"])
    lines += ["", "Per-class AP (mean over seeds; in brackets the mean paired difference to the baseline):", ""]
    lines += [f"| class | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for c in classes:
        cells = [_number(teacher["per_class"].get(c))] if teacher else []
        for arm in data["arms"].values():
            delta = arm.get("vs_baseline", {}).get("per_class", {}).get(c)
            cells.append(
                _number(arm["per_class"].get(c)) + (f" ({_number(delta, 1, True)})" if delta is not None else "")
            )
        lines.append(f"| {c} | {' | '.join(cells)} |")
    lines += ["", "Per seed (mAP):", "", f"| seed | {' | '.join(data['arms'])} |", "|---|" + "---|" * len(data["arms"])]
    for seed in seeds:
        lines.append(f"| {seed} | {' | '.join(_number(arm['mAP'].get(str(seed))) for arm in data['arms'].values())} |")
    if data.get("pretrain"):
        trained = ", ".join(f"`{name}` {_number(value)}" for name, value in data["pretrain"].items())
        lines += ["", f"Pretrain runs (trained once; mAP on their own test data): {trained}."]
    lines += ["", "Configs:", ""]
    if data.get("overrides"):
        lines.append(f"- every run: {' '.join(data['overrides'])}, then its own:")
    lines += [
        f"- `{name}`: {spec['config']} {' '.join(spec['overrides'])}"
        + (f" (starts from `{spec['init']}`)" if spec.get("init") else "")
        for name, spec in data["configs"].items()
    ]
    return "\n".join(lines) + "\n"


def plot(result: ComparisonResult, data: dict, path: Path) -> Path:
    """Per-class AP per arm (mean +- std over seeds) and each arm's loss terms over training (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(result.runs)
    classes = list(next(iter(data["arms"].values()))["per_class"])
    fig = plt.figure(figsize=(max(8, 2 + 1.2 * len(classes) * max(1, len(arms)) / 2), 8))
    grid = fig.add_gridspec(2, max(1, len(arms)))
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / (len(arms) + (1 if result.teacher else 0))
    x = np.arange(len(classes))
    offset = 0
    if result.teacher is not None:
        values = [100 * (result.teacher.ap.get(c) or 0.0) for c in classes]
        bars.bar(x + offset * width, values, width, label="teacher", color="0.6")
        offset += 1
    for name in arms:
        runs = result.runs[name].values()
        per_seed = np.array([[100 * (r.ap.get(c) or 0.0) for c in classes] for r in runs])
        std = per_seed.std(axis=0, ddof=1) if len(per_seed) > 1 else None
        bars.bar(x + offset * width, per_seed.mean(axis=0), width, yerr=std, capsize=2, label=name)
        offset += 1
    bars.set_xticks(x + width * (offset - 1) / 2, classes)
    bars.set(ylabel="AP (x 100)", title="per-class AP, mean +- std over seeds")
    bars.legend(fontsize=8)
    for i, name in enumerate(arms):
        ax = fig.add_subplot(grid[1, i])
        terms: dict[str, dict[int, list[float]]] = {}
        for run in result.runs[name].values():
            for term, points in run.losses.items():
                for iteration, value in points:
                    terms.setdefault(term, {}).setdefault(iteration, []).append(value)
        for term, by_iter in terms.items():
            iterations = sorted(by_iter)
            ax.plot(iterations, [statistics.fmean(by_iter[i]) for i in iterations], label=term, linewidth=1)
        ax.set(title=name, xlabel="iteration", yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def detections_figure(result: ComparisonResult, images: int = 4, min_score: float = 0.3) -> np.ndarray:
    """One row per model (the teacher, then each arm's run of the first seed), its detections above
    ``min_score`` on the same first ``images`` test images of the baseline's config: uint8 RGB."""
    import cv2
    import torch

    from odkd.checkpoint import load_model
    from odkd.data.dataset import read_image
    from odkd.engine.build import build_datasets
    from odkd.engine.distributed import DistInfo
    from odkd.inference import Predictor
    from odkd.visualize import draw_detections, image_grid

    experiment = result.experiment
    seed = experiment.seeds[0]
    rows = ([("teacher", result.teacher)] if result.teacher else []) + [
        (name, runs[seed]) for name, runs in result.runs.items() if seed in runs
    ]
    cfg = load_config(Path(rows[-1][1].output_dir) / "config.yaml")
    device = torch.device("cpu")
    models = {name: load_model(Path(run.output_dir) / "model_final.pt") for name, run in rows}
    _, test_set = build_datasets(cfg, next(iter(models.values())), DistInfo(0, 1, 0, device))
    shown = [read_image(test_set.image_path(i)) for i in range(min(images, len(test_set)))]
    pictures = []
    for name, run in rows:
        model = models[name]
        predict = Predictor(model, device)
        for image in shown:
            det = predict(image)
            names = model.label_names
            drawn = draw_detections(
                image, det.boxes.numpy(), det.labels.tolist(), det.scores.tolist(), names, min_score
            )
            label = f"{name}  mAP {100 * run.mAP:.1f}"
            cv2.putText(drawn, label, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 3, cv2.LINE_AA)
            cv2.putText(drawn, label, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
            pictures.append(drawn)
    return image_grid(pictures, columns=min(images, len(pictures)))


def write_report(result: ComparisonResult, picture: bool = True) -> dict[str, Path]:
    """``compare.md``, ``compare.json``, ``compare.png`` and (``picture``) ``detections.jpg`` in the
    experiment's output folder."""
    from odkd.visualize import write_image

    out = Path(result.experiment.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", "plot": out / "compare.png"}
    paths["markdown"].write_text(markdown(data))
    paths["json"].write_text(json.dumps(data, indent=1))
    plot(result, data, paths["plot"])
    if picture:
        paths["detections"] = out / "detections.jpg"
        write_image(paths["detections"], detections_figure(result))
    return paths
