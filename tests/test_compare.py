"""The paired comparison harness: statistics by hand, the report, and a tiny experiment end to end."""

import json
import logging
import math

import pytest
import torch
import yaml

from odkd.checkpoint import load_model, save_model
from odkd.compare import (
    Arm,
    ComparisonResult,
    Experiment,
    RunRecord,
    _record,
    load_experiment,
    markdown,
    paired_difference,
    run_experiment,
    summary,
    write_report,
)
from odkd.config import ConfigError, load_config
from odkd.data.synthetic import make_synthetic_voc
from odkd.engine.build import build_trainer
from odkd.engine.trainer import TrainingError
from odkd.models import build_model


def test_paired_difference_by_hand():
    # differences 2, 1, 2, 1, 3: mean 1.8, sample sd sqrt(2.8 / 4); t(0.975, 4) = 2.776445 (tables)
    diff = paired_difference([40, 41, 39, 42, 40], [42, 42, 41, 43, 43])
    half = 2.776445 * math.sqrt(0.7) / math.sqrt(5)
    assert diff.n == 5 and diff.mean == pytest.approx(1.8) and diff.better == 5
    assert (diff.low, diff.high) == (pytest.approx(1.8 - half, abs=1e-5), pytest.approx(1.8 + half, abs=1e-5))
    assert diff.significant
    # differences -1, +1, 0: mean 0, sd 1, t(0.975, 2) = 4.302653: [-2.484, 2.484], not significant
    diff = paired_difference([10, 10, 10], [9, 11, 10])
    assert diff.mean == 0 and diff.high == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5) and not diff.significant
    assert diff.better == 1
    one = paired_difference([10], [12])  # one seed: a difference, no interval
    assert one.mean == 2 and math.isnan(one.low) and math.isnan(one.high) and not one.significant


def record(arm, seed, mAP, ap):
    return RunRecord(arm, seed, f"runs/{arm}/{seed}", mAP, ap, {"loss": [(1, 2.0), (2, 1.0)]}, "trained")


def test_report_shows_the_paired_differences_per_arm_and_class():
    experiment = Experiment([Arm("alone", None), Arm("kd", None)], "alone", [1, 2], "unused")
    runs = {
        "alone": {
            1: record("alone", 1, 0.40, {"a": 0.3, "b": 0.5}),
            2: record("alone", 2, 0.42, {"a": 0.34, "b": 0.5}),
        },
        "kd": {1: record("kd", 1, 0.45, {"a": 0.4, "b": 0.5}), 2: record("kd", 2, 0.44, {"a": 0.38, "b": 0.5})},
    }
    teacher = record("teacher", None, 0.7, {"a": 0.6, "b": 0.8})
    data = summary(ComparisonResult(experiment, runs, teacher, {"device": "CPU"}))
    kd = data["arms"]["kd"]
    assert kd["mean"] == pytest.approx(44.5) and kd["vs_baseline"]["mean"] == pytest.approx(3.5)
    assert kd["vs_baseline"]["better"] == 2 and kd["per_class"] == {"a": pytest.approx(39.0), "b": pytest.approx(50)}
    assert kd["vs_baseline"]["per_class"] == {"a": pytest.approx(7.0), "b": pytest.approx(0.0)}
    # differences 5 and 2: mean 3.5, sd 2.1213, t(0.975, 1) = 12.7062: 3.5 +- 19.06
    low, high = kd["vs_baseline"]["ci95"]
    assert (low, high) == pytest.approx((3.5 - 19.0593, 3.5 + 19.0593), abs=1e-3)
    # The teacher-student gap: 41 - 70 alone, 44.5 - 70 distilled, which closes 3.5 / 29 = 12% of it.
    assert data["arms"]["alone"]["vs_teacher"]["mean"] == pytest.approx(-29.0)
    assert kd["vs_teacher"] == {"mean": pytest.approx(-25.5), "per_class": {"a": pytest.approx(-21.0), "b": -30.0}}
    text = markdown(data)
    assert "| teacher (trained once) | 70.00 | | | | |" in text
    assert "| alone (baseline) | 41.00 +- 1.41 |  |  |  | -29.00 |" in text
    assert "| kd | 44.50 +- 0.71 | +3.50 | [-15.56, +22.56] | 2/2 | -25.50 |" in text
    assert "the baseline is 29.00 mAP below the teacher; `kd` closes 12% of it." in text
    assert "| a | 60.00 | 32.00 | 39.00 (+7.0) |" in text
    assert "- `alone`: None \n- `kd`: None" in text


def test_report_lists_only_the_arms_that_ran():
    """``--only`` leaves arms of the experiment out: their configs are not listed as if compared."""
    experiment = Experiment([Arm("alone", "a.yaml"), Arm("kd", "b.yaml", ("x.y=1",))], "alone", [1], "unused")
    runs = {"alone": {1: record("alone", 1, 0.40, {"a": 0.3})}}
    data = summary(ComparisonResult(experiment, runs, None, {}))
    assert data["configs"] == {"alone": {"config": "a.yaml", "overrides": [], "init": None}}
    assert "b.yaml" not in markdown(data)


def test_report_names_the_overrides_of_every_run_once():
    experiment = Experiment([Arm("alone", "a.yaml")], "alone", [1], "unused", overrides=("data.voc_root=d", "x.y=2"))
    data = summary(ComparisonResult(experiment, {"alone": {1: record("alone", 1, 0.40, {"a": 0.3})}}, None, {}))
    assert data["overrides"] == ["data.voc_root=d", "x.y=2"]
    assert "- every run: data.voc_root=d x.y=2, then its own:\n- `alone`: a.yaml" in markdown(data)


def test_only_names_arms_and_leaves_overrides_to_every_run(tmp_path, run_scripts):
    """``--only`` takes every word after it: an arm name that is not in the experiment is refused before
    anything runs (it was once ignored, so a run went ahead without the overrides typed after it), and a
    ``section.key=value`` there is an override of every run, checked like one."""
    experiment = Experiment([Arm("alone", None), Arm("kd", None)], "alone", [1], str(tmp_path / "cmp"))
    with pytest.raises(ConfigError, match=r"no arm named ghost in the experiment \(its arms: \['alone', 'kd'\]\)"):
        run_experiment(experiment, device="cpu", arms=["kd", "ghost"])
    demo = "configs/demo_student_synthetic.yaml"
    ghost, typo = run_scripts(
        ("compare.py", "--arm", "alone", demo, "--output-dir", tmp_path / "a", "--only", "ghost"),
        ("compare.py", "--arm", "alone", demo, "--output-dir", tmp_path / "b", "--only", "alone", "optim.lr=-1"),
    )
    assert ghost.returncode == 1 and "error: no arm named ghost" in ghost.stderr
    assert typo.returncode == 1 and "optim.lr must be positive" in typo.stderr, typo.stderr[-500:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_experiment_files_are_checked(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"arms": {"a": {"config": "c.yaml"}, "b": {"overrides": ["optim.lr=0.1"]}}}))
    experiment = load_experiment(path)
    assert experiment.baseline == "a" and experiment.arms[0].config == str(tmp_path / "c.yaml")
    assert experiment.arms[1] == Arm("b", None, ("optim.lr=0.1",)) and experiment.seeds == [1, 2, 3, 4, 5]
    path.write_text(yaml.safe_dump({"arms": {"a": {"config": "c.yaml"}}, "baseline": "b"}))
    with pytest.raises(ConfigError, match="baseline 'b' is not one of the arms"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"arms": {"a": {"confg": "c.yaml"}}}))
    with pytest.raises(ConfigError, match="arm a: expected"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nowhere.yaml")


def test_pretrain_runs_are_checked(tmp_path):
    """Pretrain runs are named like arms; an ``init`` must name one, and a pretrain run takes none."""
    path = tmp_path / "x.yaml"
    tree = {
        "pretrain": {"base": {"config": "p.yaml"}},
        "teacher": {"init": "base"},
        "arms": {"a": {"config": "c.yaml", "init": "base"}, "b": {}},
    }
    path.write_text(yaml.safe_dump(tree))
    experiment = load_experiment(path)
    assert experiment.pretrain == [Arm("base", str(tmp_path / "p.yaml"))]
    assert experiment.arms[0].init == "base" and experiment.arms[1].init is None and experiment.teacher.init == "base"
    for broken, message in [
        (
            {**tree, "arms": {"a": {"init": "nothing"}}},
            r"a: init 'nothing' is not a pretrain run \(those: \['base'\]\)",
        ),
        ({**tree, "arms": {"base": {}}}, "need distinct names"),
        ({**tree, "pretrain": {"base": {"init": "base"}}}, "a pretrain run .* takes no init"),
        ({**tree, "pretrain": ["base"]}, "pretrain: a mapping"),
    ]:
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=message):
            load_experiment(path)


def tiny_overrides(tmp_path):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 6, "test": 3}, seed=3, min_size=100, max_size=160)
    return (
        f"data.voc_root={tmp_path / 'voc'}", "data.batch_size=2", "data.num_workers=0", "eval.batch_size=3",
        "optim.max_iters=2", "optim.warmup_iters=1", "train.checkpoint_every=1", "model.width_mult=0.5",
    )  # fmt: skip


def test_same_seed_same_initial_student_and_batches_in_every_arm(tmp_path):
    """What makes the comparison paired: the student alone and the distilled student of one seed start from
    the same weights and see the same augmented batches (another seed: other weights)."""
    common = tiny_overrides(tmp_path)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.75), tmp_path / "teacher.pt")

    def trainer(seed, distil):
        extra = [f"distill.teacher={tmp_path / 'teacher.pt'}", "distill.methods=[fgd]"] if distil else []
        cfg = load_config(None, [*common, f"train.seed={seed}", f"train.output_dir={tmp_path / 'x'}", *extra])
        return build_trainer(cfg, "cpu", progress=False)

    alone, distilled, other_seed = trainer(1, False), trainer(1, True), trainer(2, False)
    weights = alone.model.state_dict()
    assert all(torch.equal(v, distilled.model.state_dict()[k]) for k, v in weights.items())
    assert not all(torch.equal(v, other_seed.model.state_dict()[k]) for k, v in weights.items())
    alone_set, distilled_set = alone.batches(0).dataset, distilled.batches(0).dataset
    for key in [(i, 7 + i) for i in range(4)]:  # (index, seed) as the sampler yields them
        a, b = alone_set[key], distilled_set[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])


def test_experiment_end_to_end_reuses_and_resumes(tmp_path, caplog):
    """A teacher, the student alone and a distilled arm on two seeds: the report, then a rerun that reuses
    every run, resumes a cut one with the same number, and retrains only what changed."""
    common = tiny_overrides(tmp_path)
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump({"distill": {"teacher": "set-by-the-experiment"}}))
    experiment = Experiment(
        arms=[Arm("alone", None), Arm("hinton", str(tmp_path / "distill.yaml"), ("distill.methods=[hinton]",))],
        baseline="alone",
        seeds=[1, 2],
        output_dir=str(tmp_path / "cmp"),
        teacher=Arm("teacher", None, ("model.width_mult=0.75",)),
        overrides=common,
    )
    result = run_experiment(experiment, device="cpu")
    assert result.teacher.how == "trained" and {r.how for runs in result.runs.values() for r in runs.values()} == {
        "trained"
    }
    paths = write_report(result)
    data = json.loads(paths["json"].read_text())
    assert data["arms"]["hinton"]["vs_baseline"]["n"] == 2 and set(data["arms"]["alone"]["mAP"]) == {"1", "2"}
    assert "hinton/kd" in result.runs["hinton"][1].losses and paths["plot"].stat().st_size > 0
    assert paths["detections"].is_file() and "| hinton |" in paths["markdown"].read_text()
    hinton_cfg = load_config(tmp_path / "cmp" / "hinton" / "seed1" / "config.yaml")
    assert hinton_cfg.distill.teacher == str(tmp_path / "cmp" / "teacher" / "model_final.pt")

    # Seed 2 of hinton was killed while evaluating its last iteration (checkpoints follow their evaluation, so
    # that iteration's checkpoint was never written): resumed from the one before, the same mAP.
    cut = tmp_path / "cmp" / "hinton" / "seed2"
    for last in (cut / "checkpoint_0000002.pt", cut / "model_final.pt", cut / "best.pt"):
        last.unlink()
    metrics = cut / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if '"mAP"' not in line))
    with pytest.raises(TrainingError, match=r"hinton/seed2: stopped before its final evaluation \(iteration 2\)"):
        _record("hinton", 2, load_config(cut / "config.yaml"), "trained")  # what a run stopped by SIGTERM leaves
    again = run_experiment(experiment, device="cpu")
    assert again.teacher.how == "reused" and again.runs["alone"][1].how == "reused"
    assert again.runs["hinton"][2].how == "resumed" and again.runs["hinton"][2].mAP == result.runs["hinton"][2].mAP
    # Another setting of one arm retrains that arm alone.
    changed = Experiment(
        [experiment.arms[0], Arm("hinton", experiment.arms[1].config, ("distill.methods=[hinton]", "optim.lr=0.01"))],
        "alone", [1], experiment.output_dir, experiment.teacher, common,
    )  # fmt: skip
    third = run_experiment(changed, device="cpu")
    assert third.runs["alone"][1].how == "reused" and third.runs["hinton"][1].how == "trained"


def test_runs_side_by_side_are_the_runs_one_after_the_other(tmp_path, caplog):
    """jobs=2: the teacher beside the student alone, then the distilled arm, each run in a process of its own
    on one thread: the same weights as the runs one after the other on one thread. A run that fails stops
    the experiment with its folder and log named; finished runs are reused."""
    common = tiny_overrides(tmp_path)
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump({"distill": {"teacher": "set-by-the-experiment"}}))
    alone, hinton = Arm("alone", None), Arm("hinton", str(tmp_path / "distill.yaml"), ("distill.methods=[hinton]",))
    teacher = Arm("teacher", None, ("model.width_mult=0.75",))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_experiment(Experiment([alone, hinton], "alone", [1], str(tmp_path / "one"), teacher, common), "cpu")
        torch.set_num_threads(2)  # one thread for each of the two jobs
        two = run_experiment(
            Experiment([alone, hinton], "alone", [1], str(tmp_path / "two"), teacher, common), "cpu", jobs=2
        )
    finally:
        torch.set_num_threads(threads)
    for run in ("teacher", "alone/seed1", "hinton/seed1"):
        first = load_model(tmp_path / "one" / run / "model_final.pt").state_dict()
        second = load_model(tmp_path / "two" / run / "model_final.pt").state_dict()
        assert all(torch.equal(v, second[k]) for k, v in first.items()), run
        assert "INFO" in (tmp_path / "two" / run / "compare.log").read_text()  # each run's log in its folder
    assert two.teacher.mAP == one.teacher.mAP and two.runs["hinton"][1].mAP == one.runs["hinton"][1].mAP
    assert "1 threads per run, 2 runs at once" in write_report(two, picture=False)["markdown"].read_text()
    # Again: the teacher and every run reused, none started (a reused teacher once kept the distilled runs waiting).
    again = run_experiment(
        Experiment([alone, hinton], "alone", [1], str(tmp_path / "two"), teacher, common), "cpu", jobs=2
    )
    assert again.teacher.how == "reused" and again.runs["hinton"][1].how == "reused"
    # A second seed: the reused runs free their slots at once, so both new runs start before either ends (the
    # slots of reused runs were once left empty until a running run ended).
    with caplog.at_level(logging.INFO, logger="odkd"):
        run_experiment(
            Experiment([alone, hinton], "alone", [1, 2], str(tmp_path / "two"), teacher, common), "cpu", jobs=2
        )
    lines = [record.getMessage() for record in caplog.records]
    started = [i for i, line in enumerate(lines) if line.startswith("seed 2") and "started" in line]
    ended = [i for i, line in enumerate(lines) if line.startswith("seed 2") and "(trained)" in line]
    assert len(started) == 2 and len(ended) == 2 and max(started) < min(ended), lines
    assert load_config(tmp_path / "two/hinton/seed1/config.yaml").distill.teacher == str(
        tmp_path / "two/teacher/model_final.pt"
    )

    broken = Arm(
        "broken", str(tmp_path / "distill.yaml"), ("distill.methods=[hinton]", f"distill.teacher={tmp_path / 'no.pt'}")
    )
    message = r"broken/seed1: the run failed \(exit 1\): FileNotFoundError: model file .*no.pt does not exist \(log: "
    with pytest.raises(TrainingError, match=message):
        run_experiment(Experiment([alone, broken], "alone", [1], str(tmp_path / "two"), None, common), "cpu", jobs=2)
    assert "no.pt" in (tmp_path / "two/broken/seed1/compare.log").read_text()
    with pytest.raises(ConfigError, match="jobs must be at least 1"):
        run_experiment(Experiment([alone], "alone", [1], str(tmp_path / "two"), None, common), "cpu", jobs=0)


def test_pretrain_runs_train_once_and_start_the_arms_and_the_teacher(tmp_path, caplog):
    """A pretrain run is trained once, first; the teacher and the arms that name it start from its final
    weights; side by side (jobs=2) they wait for it. Retraining it retrains what starts from it."""
    common = tiny_overrides(tmp_path)
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump({"distill": {"teacher": "set-by-the-experiment"}}))
    base = Arm("base", None, ("model.width_mult=0.75",))
    arms = [
        Arm("alone", None, ("model.width_mult=0.75",), init="base"),
        Arm("hinton", str(tmp_path / "distill.yaml"), ("distill.methods=[hinton]", "model.width_mult=0.75"), "base"),
    ]
    teacher = Arm("teacher", None, ("model.width_mult=0.75",), init="base")

    def experiment(pretrain=base):
        return Experiment(arms, "alone", [1], str(tmp_path / "cmp"), teacher, common, [pretrain])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # one thread for each of the two jobs
        with caplog.at_level(logging.INFO, logger="odkd"):
            result = run_experiment(experiment(), "cpu", jobs=2)
    finally:
        torch.set_num_threads(threads)
    pretrained = str(tmp_path / "cmp" / "base" / "model_final.pt")
    assert result.pretrain["base"].how == "trained" and result.teacher.how == "trained"
    tensors = len(load_model(pretrained).state_dict())  # every one of them copied, none left
    for run in ("teacher", "alone/seed1", "hinton/seed1"):
        assert load_config(tmp_path / "cmp" / run / "config.yaml").model.init_checkpoint == pretrained
        assert (
            f"initialised {tensors} tensors from {pretrained} (0 left as they were)"
            in (tmp_path / "cmp" / run / "compare.log").read_text()
        ), run
    lines = [record.getMessage() for record in caplog.records]
    base_done = next(i for i, line in enumerate(lines) if line.startswith("base ") and "(trained)" in line)
    assert all(i > base_done for i, line in enumerate(lines) if "started" in line and not line.startswith("base "))
    data = summary(result)
    assert data["pretrain"] == {"base": 100 * result.pretrain["base"].mAP}
    assert data["configs"]["alone"]["init"] == "base" and "(starts from `base`)" in markdown(data)
    assert "Pretrain runs (trained once; mAP on their own test data): `base` " in markdown(data)

    again = run_experiment(experiment(), "cpu")
    assert again.pretrain["base"].how == "reused" and again.runs["hinton"][1].how == "reused"
    # Other pretraining: other initial weights, so the teacher and every arm train again.
    third = run_experiment(experiment(Arm("base", None, ("model.width_mult=0.75", "optim.lr=0.01"))), "cpu")
    assert third.pretrain["base"].how == "trained" and third.teacher.how == "trained"
    assert {r.how for runs in third.runs.values() for r in runs.values()} == {"trained"}
