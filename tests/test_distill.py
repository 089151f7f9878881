"""The distillation task: pairing teacher and student, freezing the teacher, and distill.py end to end."""

import pytest
import torch
import torch.nn.functional as F

from odkd.boxes import decode, encode
from odkd.checkpoint import load_model, save_model
from odkd.config import load_config
from odkd.data.synthetic import make_synthetic_voc
from odkd.distill import FEATURES, Distiller, register_distiller
from odkd.engine import DetectionTask
from odkd.engine.build import run_training
from odkd.engine.distill_task import build_distillation_task
from odkd.engine.ema import ModelEMA
from odkd.engine.schedule import build_optimizer
from odkd.engine.trainer import begin_compiled_step, read_metrics
from odkd.matching import map_priors
from odkd.models import build_model
from odkd.priors import build_priors


def test_map_priors_by_hand():
    student = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.4, 0.4]])
    teacher = torch.tensor([[0.7, 0.7, 0.5, 0.5], [0.3, 0.2, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    # student 0 overlaps teacher 1 most (offset 0.05/0.05), student 1 overlaps teacher 0 most.
    assert map_priors(student, teacher).tolist() == [1, 0]
    ssd300 = build_priors("ssd300")
    assert torch.equal(map_priors(ssd300, ssd300), torch.arange(len(ssd300)))


def test_remapped_teacher_boxes_are_the_same_boxes():
    student_priors, teacher_priors = build_priors("lite300"), build_priors("ssd300")
    index = map_priors(student_priors, teacher_priors)
    teacher_loc = torch.randn(2, len(teacher_priors), 4) * 0.5
    boxes = decode(teacher_loc[:, index], teacher_priors[index])
    remapped = encode(boxes, student_priors)
    torch.testing.assert_close(decode(remapped, student_priors), boxes, atol=1e-5, rtol=0)


def tiny_cfg(*extra):
    """A distillation config (Chen 2017 unless ``extra`` names other methods) for 2-class tiny models."""
    return load_config(None, ["model.width_mult=0.5", "data.classes=[a, b]", "distill.methods=[chen2017]", *extra])


def tiny_batch():
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.7], [0.0, 0.0, 0.0, 0.0]], [[0.3, 0.2, 0.9, 0.5], [0.05, 0.5, 0.3, 0.95]]])
    labels = torch.tensor([[1, -1], [2, 1]])
    return images, boxes, labels


def models(teacher="mobilenetv2_ssdlite300", dfl_bins=0):
    torch.manual_seed(0)
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5, dfl_bins=dfl_bins)
    width = {"width_mult": 0.75} if teacher.startswith("mobilenet") else {}
    return student, build_model(teacher, num_classes=3, dfl_bins=dfl_bins, **width)


def test_methods_combine_and_scale_the_detection_loss():
    student, teacher = models()
    images, boxes, labels = tiny_batch()
    detection = DetectionTask(student).train()(images, boxes, labels)
    cfg = tiny_cfg("distill.methods=[chen2017, fgd, hinton]", "distill.chen2017.mu=0.8", "distill.hinton.alpha=0.25")
    task = build_distillation_task(cfg, student, teacher).train()
    assert task.teacher_index is None and not task.teacher.training
    losses = task(images, boxes, labels)
    chen, fgd, hinton = (
        ("chen2017/soft_cls", "chen2017/bound", "chen2017/hint"),
        ("fgd/focal", "fgd/attention", "fgd/global"),
        ("hinton/kd",),
    )
    assert list(losses) == ["loc", "conf", *chen, *fgd, *hinton]
    # Same student, same batch: the detection terms are the plain task's, times every method's factor.
    torch.testing.assert_close(losses["conf"], detection["conf"] * 0.8 * 0.75)
    torch.testing.assert_close(losses["loc"], detection["loc"] * 1.0)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.distillers["chen2017"].adapters[0].weight.grad is not None
    assert task.distillers["fgd"].adapters[0].weight.grad is not None
    assert student.conf_heads[0].predictor.weight.grad.abs().sum() > 0


def test_task_counts_iterations_for_schedules_and_saves_them():
    student, teacher = models()
    cfg = tiny_cfg("distill.chen2017.mu_end=0.5", "distill.chen2017.mu_ramp_iters=4")
    task = build_distillation_task(cfg, student, teacher).train()
    images, boxes, labels = tiny_batch()
    for _ in range(2):
        task(images, boxes, labels)
    assert task.iteration == 2
    task.eval()(images, boxes, labels)  # evaluation does not advance the schedule
    assert task.iteration == 2
    restored = build_distillation_task(cfg, *models())
    restored.load_state_dict(task.state_dict())
    assert restored.iteration == 2
    detection = DetectionTask(restored.model).train()(images, boxes, labels)
    torch.testing.assert_close(restored.train()(images, boxes, labels)["conf"], detection["conf"] * 0.65)


def independent_gradient_norm(task, batch, select) -> float:
    """||d select(losses) / d student weights|| from a plain backward pass on a fresh forward, in float64 sums
    (the task's state is put back afterwards)."""
    state = {k: v.clone() for k, v in task.state_dict().items() if torch.is_tensor(v)}
    task.zero_grad(set_to_none=True)
    select(task(*batch)).backward()
    squares = sum(p.grad.double().pow(2).sum() for p in task.model.parameters() if p.grad is not None)
    task.zero_grad(set_to_none=True)
    task.load_state_dict(state, strict=False)
    task.iterations.zero_()
    return float(squares) ** 0.5


def test_step_zero_calibration_measures_every_terms_gradient_and_changes_nothing():
    student, teacher = models()
    cfg = tiny_cfg("distill.methods=[chen2017, hinton]", "distill.chen2017.gamma=1e4")
    task = build_distillation_task(cfg, student, teacher).train()
    batch = tiny_batch()
    before = {k: v.clone() for k, v in task.state_dict().items() if torch.is_tensor(v)}
    calibration = task.calibrate(*batch)
    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics, weights: as they were
    assert task.iteration == 0 and task.term_scales.tolist() == [1.0, 1.0]
    assert list(calibration.terms) == ["chen2017/soft_cls", "chen2017/bound", "chen2017/hint", "hinton/kd"]
    # float32 norms of up to 2^21 gradient elements (pairwise sums): relative error below 21 * 2^-24 ~ 1.3e-6
    tolerance = 1e-5
    detection = independent_gradient_norm(task, batch, lambda losses: losses["loc"] + losses["conf"])
    assert calibration.detection[1] == pytest.approx(detection, rel=tolerance)
    for term, (value, norm) in calibration.terms.items():
        assert norm == pytest.approx(
            independent_gradient_norm(task, batch, lambda losses, t=term: losses[t]), rel=tolerance
        )
        assert value == pytest.approx(task(*batch)[term].item(), rel=1e-6)
        task.iterations.zero_()
    # gamma 1e4 makes the hint's gradient far larger than the detection loss's: a warning naming its weight
    warnings = calibration.warnings()
    assert len(warnings) == 1 and "chen2017/hint" in warnings[0] and "distill.chen2017.gamma" in warnings[0]
    assert calibration.ratio("chen2017/hint") > 10
    assert "detection loss" in calibration.table() and "chen2017/hint" in calibration.table()


def test_auto_balance_brings_each_method_to_the_configured_fraction():
    student, teacher = models()
    cfg = tiny_cfg("distill.methods=[chen2017, fgd]", "distill.auto_balance=true", "distill.balance_fraction=0.5")
    task = build_distillation_task(cfg, student, teacher).train()
    batch = tiny_batch()
    calibration = task.calibrate(*batch)
    scales = task.term_scales.tolist()
    assert calibration.scales == {"chen2017": scales[0], "fgd": scales[1]} and scales != [1.0, 1.0]
    detection = independent_gradient_norm(task, batch, lambda losses: losses["loc"] + losses["conf"])
    for method in ("chen2017", "fgd"):
        norm = independent_gradient_norm(
            task, batch, lambda losses, m=method: sum(v for k, v in losses.items() if k.startswith(m + "/"))
        )
        assert norm == pytest.approx(0.5 * detection, rel=1e-5)
    assert calibration.warnings() == []
    # The ratios before scaling are those of the same run without auto_balance (measured there, not divided).
    plain = build_distillation_task(tiny_cfg("distill.methods=[chen2017, fgd]"), *models()).train()
    plain.load_state_dict(task.state_dict(), strict=False)
    plain.term_scales.fill_(1.0)
    unbalanced = plain.calibrate(*batch)
    for term in calibration.terms:
        assert calibration.unscaled_ratio(term) == pytest.approx(unbalanced.ratio(term), rel=1e-5), term
    assert "unscaled" in calibration.table() and "ratio_unscaled" in calibration.to_json()["terms"]["fgd/focal"]
    restored = build_distillation_task(cfg, *models())  # the scales travel with the task's state
    restored.load_state_dict(task.state_dict())
    assert restored.term_scales.tolist() == scales


def test_other_layouts_need_prior_mapping():
    student, teacher = models("vgg16_ssd300")
    with pytest.raises(ValueError) as err:
        build_distillation_task(tiny_cfg(), student, teacher)
    message = str(err.value)
    assert "8732 priors" in message and "vgg16_lite300" in message and "prior_mapping=iou" in message
    task = build_distillation_task(tiny_cfg("distill.prior_mapping=iou"), student, teacher)
    assert task.teacher_index.shape == (3000,)
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8)  # BN needs 2 images at the 1x1 level
    with torch.no_grad():
        teacher_out = task.teacher(task.teacher.normalize(images))
    loc, conf = task.paired_teacher_outputs(teacher_out.loc, teacher_out.conf)
    assert (
        loc.shape == (2, 3000, 4) and conf.shape == (2, 3000, 3) and teacher_out.conf_maps[0].shape == (2, 12, 38, 38)
    )
    losses = task(images, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_teacher_of_another_input_size_sees_the_batch_at_its_own():
    torch.manual_seed(0)
    student = build_model("mobilenetv2_ssdlite320", num_classes=3, width_mult=0.5)
    teacher = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.75)
    cfg = tiny_cfg("distill.methods=[hinton, fgd]", "distill.prior_mapping=iou")
    task = build_distillation_task(cfg, student, teacher).train()
    images, boxes, labels = tiny_batch()
    images = F.interpolate(images.float(), size=(320, 320), mode="bilinear").round().to(torch.uint8)
    student_out, teacher_out = task.predict(images)
    assert student_out.loc.shape == (2, 3234, 4) and teacher_out.loc.shape == (2, 3000, 4)
    losses = task.losses((student_out, teacher_out), boxes, labels)
    assert {"hinton/kd", "fgd/focal"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_teacher_classes_must_be_the_students_in_order():
    student, teacher = models()
    student.class_names, teacher.class_names = ("cat", "dog"), ("dog", "cat")
    with pytest.raises(ValueError, match=r"teacher's classes \['dog', 'cat'\] are not the student's"):
        build_distillation_task(tiny_cfg(), student, teacher)
    teacher.class_names = None  # an imported checkpoint without names: only the count can be checked
    build_distillation_task(tiny_cfg(), student, teacher)


def test_feature_methods_pair_any_layout_and_prior_relative_ones_none():
    student, teacher = models("vgg16_ssd300")
    task = build_distillation_task(tiny_cfg("distill.methods=[fgd]"), student, teacher)  # no mapping needed
    losses = task(*tiny_batch())  # the 38x38 first teacher map is resized to the student's 19x19
    assert {"fgd/focal", "fgd/attention", "fgd/global"} <= set(losses)
    with pytest.raises(ValueError, match="crosskd needs the same priors"):
        build_distillation_task(tiny_cfg("distill.methods=[crosskd]", "distill.prior_mapping=iou"), student, teacher)
    student, teacher = models("vgg16_ssd300", dfl_bins=4)
    with pytest.raises(ValueError, match="ld needs the same priors"):
        build_distillation_task(tiny_cfg("distill.methods=[ld]", "distill.prior_mapping=iou"), student, teacher)


@pytest.mark.parametrize("methods", ["[ld]", "[crosskd]", "[ld, chen2017]"])
def test_distribution_heads_train_with_ld_and_crosskd(methods):
    student, teacher = models("vgg16_lite300", dfl_bins=4)
    task = build_distillation_task(tiny_cfg(f"distill.methods={methods}"), student, teacher).train()
    losses = task(*tiny_batch())
    assert "dfl" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in task.teacher.parameters())


def test_distill_script_exports_the_student_only(tmp_path, run_script):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 6, "test": 3}, seed=2, min_size=100, max_size=160)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.75), tmp_path / "teacher.pt")
    done = run_script(
        "distill.py", "--teacher", tmp_path / "teacher.pt", "--device", "cpu", f"data.voc_root={tmp_path / 'voc'}",
        "data.batch_size=2", "data.num_workers=0", "optim.max_iters=2", "optim.warmup_iters=1",
        f"train.output_dir={tmp_path / 'run'}", "train.eval_every=2", "train.checkpoint_every=2",
        "model.width_mult=0.5", "distill.methods=[chen2017]", "data.synthetic_sizes={trainval: 6, test: 3}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "voc07 mAP on SYN_test" in done.stdout
    student = load_model(tmp_path / "run" / "best.pt")
    assert student.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.5, "num_classes": 6}
    exported = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert not any("adapters" in k or k.startswith("teacher") for k in exported)
    training = torch.load(tmp_path / "run" / "checkpoint_0000002.pt", weights_only=True)["task"]
    assert "distillers.chen2017.adapters.0.weight" in training and any(k.startswith("teacher.") for k in training)
    assert load_model(tmp_path / "run" / "checkpoint_0000002.pt").spec == student.spec

    missing = run_script("distill.py", "--teacher", tmp_path / "nowhere.pt", f"data.voc_root={tmp_path / 'voc'}")
    assert missing.returncode == 1 and "teacher" in missing.stderr and "does not exist" in missing.stderr


def test_a_teacher_file_that_is_not_a_model_is_named_in_one_line(tmp_path, run_scripts):
    """A text file, or a model file cut short, as the teacher: torch.load's traceback before."""
    make_synthetic_voc(tmp_path / "voc", {"trainval": 4, "test": 2}, min_size=60, max_size=80)
    (tmp_path / "teacher.txt").write_text("not a model\n")
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100_000])
    teachers = [(tmp_path / "teacher.txt", "odkd"), (tmp_path / "cut.pt", "odkd"), (tmp_path / "cut.pt", "qfgaohao")]
    refused = run_scripts(*(  # side by side: each in its own run folder
        ("distill.py", "--teacher", teacher, "--device", "cpu", f"distill.teacher_source={source}",
         f"data.voc_root={tmp_path / 'voc'}", "data.synthetic=false", f"train.output_dir={tmp_path / f'run{i}'}")
        for i, (teacher, source) in enumerate(teachers)
    ))  # fmt: skip
    for (teacher, _), done in zip(teachers, refused, strict=True):
        line = done.stderr.strip()
        expected = f"error: {teacher}: not a PyTorch file that loads: truncated, damaged or another kind of file"
        assert done.returncode == 1 and line.startswith(f"{expected} (torch.load: ") and "\n" not in line, line


class ToyFeatureMatch(Distiller):
    """A method defined outside odkd: the mean squared gap of the last feature maps, times ``weight``."""

    needs = frozenset({FEATURES})

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, batch):
        student, teacher = batch.student.features[-1], batch.teacher.features[-1].detach()
        return {"gap": self.weight * (student.float() - teacher.float()).pow(2).mean()}


def test_a_method_of_ones_own_trains_through_a_config(tmp_path):
    """One class, registered from this test file: a config names it and sets its weight, and a run trains
    with it (its term logged, its setting checked) without any change to odkd."""
    register_distiller("toy_feature_match")(ToyFeatureMatch)
    make_synthetic_voc(tmp_path / "voc", {"trainval": 4, "test": 2}, seed=2, min_size=100, max_size=160)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5), tmp_path / "teacher.pt")
    overrides = [
        "model.width_mult=0.5", f"data.voc_root={tmp_path / 'voc'}", "data.batch_size=2", "data.num_workers=0",
        "data.test_sets=''", "optim.max_iters=2", "optim.warmup_iters=1", f"train.output_dir={tmp_path / 'run'}",
        f"distill.teacher={tmp_path / 'teacher.pt'}", "distill.methods=[toy_feature_match]",
        "distill.toy_feature_match.weight=3",
    ]  # fmt: skip
    result, _ = run_training(load_config(None, overrides), device="cpu", progress=False)
    assert result.iteration == 2
    logged = [r for r in read_metrics(tmp_path / "run") if "toy_feature_match/gap" in r]
    assert [r["iter"] for r in logged] == [2] and logged[0]["toy_feature_match/gap"] > 0
    with pytest.raises(ValueError, match=r"unknown setting distill\.toy_feature_match\.wieght"):
        run_training(load_config(None, [*overrides, "distill.toy_feature_match.wieght=3"]), device="cpu")


def test_distillation_resumes_exactly(tmp_path):
    """chen2017 (mu ramp) + fgd: adapters, context blocks and the iteration count come back exactly."""
    from odkd.engine.build import build_trainer

    make_synthetic_voc(tmp_path / "voc", {"trainval": 8, "test": 2}, seed=1, min_size=100, max_size=160)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.75), tmp_path / "teacher.pt")
    cfg = load_config(
        None,
        [
            "model.width_mult=0.5", f"data.voc_root={tmp_path / 'voc'}", "data.batch_size=2", "data.num_workers=0",
            "data.test_sets=''", "optim.max_iters=4", "optim.warmup_iters=1", f"train.output_dir={tmp_path / 'run'}",
            "train.checkpoint_every=2", "train.keep_last=5", f"distill.teacher={tmp_path / 'teacher.pt'}",
            "distill.methods=[chen2017, fgd]", "distill.chen2017.mu_end=0.5", "distill.chen2017.mu_ramp_iters=4",
            "distill.auto_balance=true",
        ],
    )  # fmt: skip

    def trainer():
        return build_trainer(cfg, "cpu", progress=False)

    straight = trainer()
    straight.fit()
    resumed = trainer()
    resumed.fit(resume=tmp_path / "run" / "checkpoint_0000002.pt")
    assert resumed.iteration == 4 and resumed.task.iteration == straight.task.iteration == 4
    # step-0 calibration ran once, in the fresh run; the resumed run took its scales from the checkpoint
    calibrations = [r for r in read_metrics(tmp_path / "run") if "calibration" in r]
    assert len(calibrations) == 1 and calibrations[0]["iter"] == 0
    assert list(calibrations[0]["calibration"]["scales"].values()) == straight.task.term_scales.tolist()
    assert resumed.task.term_scales.tolist() == straight.task.term_scales.tolist() != [1.0, 1.0]
    a, b = straight.task.state_dict(), resumed.task.state_dict()
    assert any(k.startswith("distillers.fgd.student_context") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), [
        k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])
    ][:5]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("methods, dfl_bins", [(None, 0), ("[chen2017, hinton, fgd, crosskd]", 0), ("[ld]", 4)])
def test_cuda_training_step_never_waits_for_the_gpu(methods, dfl_bins):
    """Matching, losses, distillers, backward, clipping, the fused SGD step and the EMA update queue GPU
    work without one host synchronisation (which would idle the GPU until the host launches the next kernel)."""
    student, teacher = models("vgg16_lite300", dfl_bins)
    cfg = tiny_cfg(f"distill.methods={methods or '[hinton]'}")
    task = DetectionTask(student) if methods is None else build_distillation_task(cfg, student, teacher)
    task = task.cuda().train().to(memory_format=torch.channels_last)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, lr=0.01)
    ema = ModelEMA(task.model, decay=0.99)
    batch = [t.cuda() for t in tiny_batch()]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(task(*batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        ema.update(task.model)

    step()  # lazy set-up: cuDNN autotuning, optimizer state
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("methods, dfl_bins", [(None, 0), ("[chen2017, hinton, fgd, crosskd]", 0), ("[ld]", 4)])
def test_training_step_is_one_graph_for_torch_compile(methods, dfl_bins):
    """train.compile: TorchDynamo captures the whole step (student, teacher, matching, losses, distillers) in
    one graph with no break, and neither the step counter of schedules such as mu's nor the GT count of a
    batch recompiles it."""
    from torch._dynamo.utils import counters

    student, teacher = models("mobilenetv2_ssdlite300", dfl_bins)
    cfg = tiny_cfg(f"distill.methods={methods or '[hinton]'}", "distill.chen2017.mu_end=0.5",
                   "distill.chen2017.mu_ramp_iters=4")  # fmt: skip
    task = DetectionTask(student) if methods is None else build_distillation_task(cfg, student, teacher)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(task.train(), backend="eager")  # capture only: no code generation needed here
    images, boxes, labels = tiny_batch()
    for extra in range(3):  # padded to 2, 3 and 4 GT per image, as the largest GT count changes in training
        padded = (torch.cat((boxes, torch.zeros(2, extra, 4)), 1), torch.cat((labels, torch.full((2, extra), -1)), 1))
        begin_compiled_step(*padded)
        sum(compiled(images, *padded).values()).backward()
    assert dict(counters["frames"]) == {"total": 1, "ok": 1} and not counters["graph_break"]
    assert methods is None or task.iteration == 3
