"""The distillation task: pairing teacher and student, freezing the teacher, and distill.py end to end."""

import pytest
import torch

from odkd.boxes import decode, encode
from odkd.checkpoint import load_model, save_model
from odkd.config import load_config
from odkd.data.synthetic import make_synthetic_voc
from odkd.engine.distill_task import build_distillation_task
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
    return load_config(None, ["model.width_mult=0.5", "data.classes=[a, b]", *extra])


def test_same_layout_task_trains_the_student_and_adapters_only():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5)
    teacher = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.75)
    task = build_distillation_task(cfg, student, teacher).train()
    assert task.teacher_index is None and not task.teacher.training
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.7]], [[0.3, 0.2, 0.9, 0.5]]])
    labels = torch.tensor([[1], [2]])
    losses = task(images, boxes, labels)
    assert set(losses) == {"hard_cls", "soft_cls", "loc", "bound", "hint"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.criterion.adapters[0].weight.grad is not None
    assert student.conf_heads[0].predictor.weight.grad.abs().sum() > 0


def test_other_layouts_need_prior_mapping():
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5)
    teacher = build_model("vgg16_ssd300", num_classes=3)
    with pytest.raises(ValueError) as err:
        build_distillation_task(tiny_cfg(), student, teacher)
    message = str(err.value)
    assert "8732 priors" in message and "vgg16_lite300" in message and "prior_mapping=iou" in message
    task = build_distillation_task(tiny_cfg("distill.prior_mapping=iou"), student, teacher)
    assert task.teacher_index.shape == (3000,)
    loc, conf, maps = task.teacher_outputs(torch.randint(0, 255, (1, 3, 300, 300), dtype=torch.uint8))
    assert loc.shape == (1, 3000, 4) and conf.shape == (1, 3000, 3) and maps[0].shape == (1, 4 * 3, 38, 38)
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8)  # BN needs 2 images at the 1x1 level
    losses = task(images, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert all(torch.isfinite(v) for v in losses.values())


def test_distill_script_exports_the_student_only(tmp_path, run_script):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 6, "test": 3}, seed=2, min_size=100, max_size=160)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.75), tmp_path / "teacher.pt")
    done = run_script(
        "distill.py", "--teacher", tmp_path / "teacher.pt", "--device", "cpu", f"data.voc_root={tmp_path / 'voc'}",
        "data.batch_size=2", "data.num_workers=0", "optim.max_iters=2", "optim.warmup_iters=1",
        f"train.output_dir={tmp_path / 'run'}", "train.eval_every=2", "train.checkpoint_every=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "voc07 mAP on SYN_test" in done.stdout
    student = load_model(tmp_path / "run" / "best.pt")
    assert student.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.5, "num_classes": 6}
    exported = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert not any("adapters" in k or k.startswith("teacher") for k in exported)
    training = torch.load(tmp_path / "run" / "checkpoint_0000002.pt", weights_only=True)["task"]
    assert "criterion.adapters.0.weight" in training and any(k.startswith("teacher.") for k in training)
    assert load_model(tmp_path / "run" / "checkpoint_0000002.pt").spec == student.spec

    missing = run_script("distill.py", "--teacher", tmp_path / "nowhere.pt", f"data.voc_root={tmp_path / 'voc'}")
    assert missing.returncode == 1 and "teacher" in missing.stderr and "does not exist" in missing.stderr
