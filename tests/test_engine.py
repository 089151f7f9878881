"""The training loop: schedules, a short run, exact resume, NaN handling, signals, DDP (on CPU; their CUDA
cases, marked ``cuda``, run only where a GPU is)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import pytest
import torch

from odkd.checkpoint import load_model
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.config import load_config
from odkd.data import VOCDataset, build_loader
from odkd.data.dataset import ImageFiles
from odkd.data.image_cache import ImageCache
from odkd.data.synthetic import make_synthetic_voc
from odkd.engine import DetectionTask, Trainer, TrainingError, lr_factor, setup_distributed
from odkd.engine.build import build_datasets, build_detector, build_trainer, train_gt_slots
from odkd.engine.distributed import backend_for
from odkd.engine.ema import ModelEMA
from odkd.engine.hooks import CheckpointHook, EMAHook, MetricsHook
from odkd.engine.schedule import build_optimizer, build_scheduler
from odkd.engine.trainer import latest_checkpoint, match_state_layout, read_metrics
from odkd.eval import evaluate_dataset
from odkd.inference import detect_dataset

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_lr_factor_by_hand():
    cfg = load_config(None, ["optim.warmup_iters=10", "optim.warmup_factor=0.25", "optim.milestones=[20, 30]"]).optim
    assert lr_factor(0, cfg) == pytest.approx(0.25)
    assert lr_factor(5, cfg) == pytest.approx(0.25 * 0.5 + 0.5)  # halfway through warm-up: 0.625
    assert lr_factor(10, cfg) == 1.0 and lr_factor(19, cfg) == 1.0
    assert lr_factor(20, cfg) == pytest.approx(0.1) and lr_factor(30, cfg) == pytest.approx(0.01)
    cosine = load_config(None, ["optim.schedule=cosine", "optim.max_iters=100", "optim.warmup_iters=0"]).optim
    assert lr_factor(0, cosine) == 1.0
    assert lr_factor(50, cosine) == pytest.approx(0.5)
    assert lr_factor(25, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, cosine) == pytest.approx(0.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_optimizer_update_by_hand_and_fused_on_cuda(device):
    cfg = load_config(None, ["optim.momentum=0.5", "optim.weight_decay=0.1"]).optim
    weight = torch.nn.Parameter(torch.tensor([2.0], device=device))
    optimizer = build_optimizer([weight], cfg, lr=0.1)
    assert optimizer.defaults["fused"] == (device == "cuda")
    # step 1: d = g + wd * w = 1 + 0.2 = 1.2, buffer = 1.2, w = 2 - 0.12 = 1.88
    # step 2: d = 1 + 0.188 = 1.188, buffer = 0.5 * 1.2 + 1.188 = 1.788, w = 1.88 - 0.1788 = 1.7012
    for _ in range(2):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert weight.item() == pytest.approx(1.7012, abs=1e-6)


def test_loaded_optimizer_state_takes_the_parameters_layout():
    """A checkpoint from a CPU run (contiguous momenta) resumed on CUDA, where the weights are
    channels_last: the fused SGD kernel needs equal strides, so the loaded momenta are re-laid."""
    cfg = load_config(None, ["optim.momentum=0.9"]).optim
    saved = torch.nn.Conv2d(4, 8, 3)
    optimizer = build_optimizer(list(saved.parameters()), cfg, lr=0.1)
    saved(torch.randn(2, 4, 6, 6)).sum().backward()
    optimizer.step()
    resumed = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    resumed.load_state_dict(saved.state_dict())
    loaded = build_optimizer(list(resumed.parameters()), cfg, lr=0.1)
    loaded.load_state_dict(optimizer.state_dict())
    momentum = loaded.state[resumed.weight]["momentum_buffer"]
    assert momentum.stride() != resumed.weight.stride()  # what torch's load_state_dict leaves
    match_state_layout(loaded)
    relaid = loaded.state[resumed.weight]["momentum_buffer"]
    assert relaid.stride() == resumed.weight.stride() and torch.equal(relaid, momentum)
    assert torch.equal(loaded.state[resumed.bias]["momentum_buffer"], optimizer.state[saved.bias]["momentum_buffer"])


def test_model_ema_by_hand():
    model = torch.nn.BatchNorm1d(1)  # float parameters and buffers, and an integer batch counter
    ema = ModelEMA(model, decay=0.75)
    assert not ema.module.training and not ema.module.weight.requires_grad

    def state(module):
        return module.weight.item(), module.running_mean.item(), module.num_batches_tracked.item()

    def set_model(weight, mean, count):
        with torch.no_grad():
            model.weight.fill_(weight), model.running_mean.fill_(mean), model.num_batches_tracked.fill_(count)

    set_model(2.0, 4.0, 3)
    ema.update(model)  # the first update copies
    assert (ema.module.weight.item(), ema.module.running_mean.item(), ema.module.num_batches_tracked.item()) == (
        2,
        4,
        3,
    )
    set_model(6.0, 0.0, 5)
    ema.update(model)  # 0.75 * 2 + 0.25 * 6 = 3; 0.75 * 4 + 0.25 * 0 = 3; the counter is copied
    assert (ema.module.weight.item(), ema.module.running_mean.item(), ema.module.num_batches_tracked.item()) == (
        3,
        3,
        5,
    )
    # A buffer replaced after the first update (what .to() does) is the one averaged next.
    model.running_mean = torch.tensor([7.0])
    ema.update(model)  # 0.75 * 3 + 0.25 * 7 = 4; weight 0.75 * 3 + 0.25 * 6 = 3.75
    assert ema.module.running_mean.item() == 4.0 and ema.module.weight.item() == 3.75
    restored = ModelEMA(torch.nn.BatchNorm1d(1), decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3 and restored.module.weight.item() == 3.75
    # Training checkpoints from before ModelEMA hold torch's AveragedModel state: they resume the same.
    averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    averaged.update_parameters(model)
    old = ModelEMA(torch.nn.BatchNorm1d(1), decay=0.75)
    old.load_state_dict(averaged.state_dict())
    assert old.updates == 1 and state(old.module) == (6, 7, 5)
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(model, decay=1.5)


def tiny_config(tmp_path, *extra):
    """mbv2 x0.5 on 8 synthetic images, batch 2: a few seconds per iteration on CPU."""
    make_synthetic_voc(tmp_path / "voc", {"trainval": 8, "test": 3}, seed=1, min_size=100, max_size=160)
    return load_config(
        None,
        [
            "model.width_mult=0.5", f"data.voc_root={tmp_path / 'voc'}", "data.batch_size=2", "data.num_workers=0",
            "optim.max_iters=4", "optim.lr=0.01", "optim.warmup_iters=2", "optim.milestones=[3]",
            f"train.output_dir={tmp_path / 'run'}", "train.log_every=1", "train.eval_every=4",
            "train.checkpoint_every=2", "train.keep_last=5", "eval.batch_size=3", *extra,
        ],
    )  # fmt: skip


def test_skip_invalid_leaves_out_unreadable_images(tmp_path):
    cfg = tiny_config(tmp_path, "data.skip_invalid=true", f"data.cache_dir={tmp_path / 'cache'}")
    jpegs = tmp_path / "voc" / "VOCSYN" / "JPEGImages"
    broken = sorted(jpegs.glob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning) as warned:
        train_set, test_set = build_datasets(cfg, build_detector(cfg), setup_distributed("cpu"))
    messages = [str(w.message) for w in warned]  # the file and its problem, then the count
    assert len(messages) == 2 and re.search(rf"skipping {broken.stem}: .*truncated JPEG", messages[0])
    assert "skipped 1 of 8 images with bad data" in messages[1]
    assert len(train_set) + len(test_set) == 8 + 3 - 1 and broken not in train_set.image_paths
    assert isinstance(train_set.images, ImageCache) and isinstance(test_set.images, ImageFiles)
    train_set[0]  # the decoded-image cache holds the readable ones


def test_data_augment_settings_reach_the_train_pipeline(tmp_path):
    cfg = tiny_config(tmp_path, "data.augment.channel_swap_p=0", "data.augment.crop=false", "data.augment.hue=9")
    train_set, test_set = build_datasets(cfg, build_detector(cfg), setup_distributed("cpu"))
    distort, geometry = train_set.transform.compose.transforms
    assert (distort.channel_swap_p, distort.hue, distort.p_each) == (0, 9, 0.5)
    assert (geometry.crop, geometry.flip_p) == (False, 0.5)
    assert test_set.transform is None  # evaluation resizes only


def make_trainer(cfg, device="cpu"):
    return build_trainer(cfg, device, progress=False)


def ema_of(trainer) -> ModelEMA:
    return next(hook.ema for hook in trainer.hooks if isinstance(hook, EMAHook))


def test_short_run_writes_everything(tmp_path):
    cfg = tiny_config(tmp_path, "optim.grad_clip=1.0")
    result = make_trainer(cfg).fit()
    run = tmp_path / "run"
    assert result.iteration == 4 and not result.interrupted
    assert result.last_map is not None and 0.0 <= result.last_map <= 1.0 and result.best_map == result.last_map
    assert load_config(run / "config.yaml") == cfg
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_records] == [1, 2, 3, 4]
    assert all({"loc", "conf", "lr", "images_per_s"} <= set(r) for r in train_records)
    assert any("mAP" in r for r in records)
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_0000002.pt", "checkpoint_0000004.pt"]
    assert latest_checkpoint(run) == run / "checkpoint_0000004.pt"
    for name in ("best.pt", "model_final.pt", "checkpoint_0000004.pt"):
        model = load_model(run / name)
        assert model.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.5, "num_classes": 6}
    # The run's 8 training items (4 iterations x 2) as augmented, 4 tiles per row of 320 px.
    examples = cv2.imread(str(run / "train_examples.jpg"))
    assert examples.shape == (2 * 320, 4 * 320, 3) and examples.std() > 10
    # A fresh run in the same folder starts the log anew.
    make_trainer(tiny_config(tmp_path, "optim.max_iters=2", "train.eval_every=100")).fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], "mAP" in r) for r in records] == [(1, False), (2, False), (2, True)]


def test_gt_padding_modes_and_fixed_slots_train_the_same(tmp_path):
    records = {}
    for padding in ("batch", "dataset"):
        cfg = tiny_config(tmp_path / padding, f"data.gt_padding={padding}", "optim.max_iters=2")
        trainer = make_trainer(cfg)
        trainer.fit()
        lines = (tmp_path / padding / "run" / "metrics.jsonl").read_text().splitlines()
        train = [json.loads(line) for line in lines if '"loss"' in line]
        records[padding] = [{k: v for k, v in r.items() if k != "images_per_s"} for r in train]
    train_set, _ = build_datasets(cfg, trainer.model, trainer.info)
    counts = sorted(int((~a.difficult).sum()) for a in train_set.annotations)  # difficult ones dropped
    assert trainer.fixed_gt_slots and train_gt_slots(cfg, train_set, trainer.device) == counts[-1] > counts[0]
    # Padded GT slots match nothing: the same losses and updates, to float rounding.
    assert len(records["batch"]) == 2
    for plain, padded in zip(records["batch"], records["dataset"], strict=True):
        assert plain == pytest.approx(padded, rel=1e-5)
    # "auto" pads only where CUDA graphs replay the step, which needs one shape.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphs = tiny_config(tmp_path / "auto", "train.compile=true", "train.compile_mode=reduce-overhead")
    assert train_gt_slots(graphs, train_set, cuda) == train_set.max_objects
    assert train_gt_slots(graphs, train_set, cpu) == 0
    assert train_gt_slots(replace(graphs, train=replace(graphs.train, compile_mode="default")), train_set, cuda) == 0
    assert train_gt_slots(replace(graphs, data=replace(graphs.data, gt_padding="batch")), train_set, cuda) == 0


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(tmp_path, "train.ema_decay=0.9", "train.eval_every=100")
    straight = make_trainer(cfg)
    straight.fit()
    resumed = make_trainer(cfg)
    resumed.fit(resume=tmp_path / "run" / "checkpoint_0000002.pt")
    assert resumed.iteration == 4
    # The log is the run's: iterations 3 and 4 were written again, not twice.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], "mAP" in r) for r in records] == [(1, False), (2, False), (3, False), (4, False), (4, True)]
    a, b = straight.task.state_dict(), resumed.task.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    ema_a, ema_b = ema_of(straight).module.state_dict(), ema_of(resumed).module.state_dict()
    assert (
        all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a) and ema_of(straight).updates == ema_of(resumed).updates == 4
    )
    # A training checkpoint read as a model gives its EMA weights (evaluate.py --checkpoint, a teacher).
    model = load_model(tmp_path / "run" / "checkpoint_0000004.pt")
    assert all(torch.equal(v, ema_a[k]) for k, v in model.state_dict().items())
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    # A checkpoint written on a GPU (fused SGD) resumes here with this machine's kernels.
    state = straight.state_dict()
    state["optimizer"]["param_groups"][0].update(fused=True, foreach=False)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["fused"] is False and resumed.optimizer.param_groups[0]["foreach"]


def _weights(model: torch.nn.Module) -> torch.Tensor:
    """Every float tensor of a model's state (weights, BatchNorm statistics) as one vector on the CPU."""
    return torch.cat([v.detach().float().cpu().flatten() for v in model.state_dict().values() if v.is_floating_point()])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_stays_on_the_run_and_takes_a_cpu_checkpoint(tmp_path):
    """On CUDA a resumed run is not bit-exact (cuDNN may choose other algorithms after a restart, bf16
    rounds them differently) but continues the same run: its weights differ from the uninterrupted run's by
    far less than iterations 3-4 moved them. Rounding changes the last two updates by ~1% (bf16 keeps 8
    bits); a lost momentum or a wrong lr changes them by their own size, so a tenth of the movement
    separates the two. A CPU run's checkpoint resumes here too (fused SGD on channels_last weights: the
    loaded momenta are re-laid), staying within half the movement of the fp32 CPU run (bf16 vs fp32)."""
    cfg = tiny_config(tmp_path, "train.eval_every=100")
    straight = make_trainer(cfg, "cuda")
    straight.fit()
    at_2 = _weights(load_model(tmp_path / "run" / "checkpoint_0000002.pt"))
    resumed = make_trainer(cfg, "cuda")
    resumed.fit(resume=tmp_path / "run" / "checkpoint_0000002.pt")
    assert resumed.iteration == 4 and resumed.optimizer.param_groups[0]["fused"]
    end, again = _weights(straight.model), _weights(resumed.model)
    assert torch.isfinite(again).all()
    assert (again - end).norm() < 0.1 * (end - at_2).norm()

    on_cpu = tiny_config(tmp_path / "cpu", "train.eval_every=100")
    cpu_run = make_trainer(on_cpu)
    cpu_run.fit()
    cpu_at_2 = tmp_path / "cpu" / "run" / "checkpoint_0000002.pt"
    on_gpu = make_trainer(on_cpu, "cuda")
    on_gpu.fit(resume=cpu_at_2)
    assert on_gpu.iteration == 4
    for param in on_gpu.params:
        assert on_gpu.optimizer.state[param]["momentum_buffer"].stride() == param.stride()
    cpu_end, gpu_end = _weights(cpu_run.model), _weights(on_gpu.model)
    assert (gpu_end - cpu_end).norm() < 0.5 * (cpu_end - _weights(load_model(cpu_at_2))).norm()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_runs_in_bf16_channels_last_with_fused_sgd(tmp_path):
    """train.amp on CUDA: bf16 autocast without a GradScaler (the H100/H200 have bf16), channels_last
    weights, the fused SGD step; the model computes in bf16, the losses come out in float32, and a short
    run trains and evaluates without a skipped step."""
    from odkd.data import prefetch_to_device

    cfg = tiny_config(tmp_path, "optim.max_iters=6", "train.eval_every=6")
    trainer = make_trainer(cfg, "cuda")
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert trainer.optimizer.param_groups[0]["fused"]
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    loader = build_loader(
        build_datasets(cfg, trainer.model, trainer.info)[0], 2, train=True, num_workers=0, max_iters=1
    )
    images, boxes, labels = next(prefetch_to_device(loader, trainer.device))
    with trainer.autocast():
        outputs = trainer.task.predict(images)
        losses = trainer.task.losses(outputs, boxes, labels)
    assert outputs.conf.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    result = trainer.fit()
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert result.iteration == 6 and [r["iter"] for r in train] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in train) and 0.0 <= result.last_map <= 1.0


def test_a_checkpoint_follows_its_evaluation_so_a_run_killed_while_evaluating_redoes_it(tmp_path):
    """The checkpoint of an evaluation iteration is written after the evaluation: it holds that score as the
    best so far, and a run killed during an evaluation (no checkpoint of that iteration yet) resumes from the
    one before and evaluates again: its log, best model and scores are those of the uninterrupted run."""
    cfg = tiny_config(tmp_path, "train.eval_every=2")
    run = tmp_path / "run"

    def log_without_timing() -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]

    straight = make_trainer(cfg).fit()
    records = log_without_timing()
    assert [(r["iter"], "mAP" in r) for r in records][2:] == [(2, True), (3, False), (4, False), (4, True)]
    at_2 = torch.load(run / "checkpoint_0000002.pt", weights_only=True)
    assert at_2["best_map"] == next(r["mAP"] for r in records if r["iter"] == 2 and "mAP" in r)
    # Killed while evaluating iteration 4: its checkpoint and final model not written, nor its records.
    (run / "checkpoint_0000004.pt").unlink()
    (run / "model_final.pt").unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(run) if r["iter"] <= 3))
    resumed = make_trainer(cfg).fit(resume=latest_checkpoint(run))
    assert log_without_timing() == records
    assert (resumed.best_map, resumed.last_map) == (straight.best_map, straight.last_map)
    assert (run / "model_final.pt").is_file() and (run / "best.pt").is_file()
    # Resumed at the end, nothing is left to run: the result still carries the run's last mAP.
    assert make_trainer(cfg).fit(resume=run / "checkpoint_0000004.pt").last_map == straight.last_map
    assert log_without_timing() == records


def test_nan_losses_are_skipped_then_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e30", "optim.warmup_iters=0", "train.max_bad_steps=2",
                      "optim.max_iters=8")  # fmt: skip
    trainer = make_trainer(cfg)
    with pytest.raises(TrainingError, match="NaN/inf for 2 iterations in a row"):
        trainer.fit()
    assert trainer.iteration >= 2


class NaNOnCalls(DetectionTask):
    """The real detection task, with NaN on the given (1-based) calls: in the loss (``where="loss"``) or in
    the input images, so that the forward pass itself (BatchNorm's running statistics) meets it."""

    def __init__(self, model, bad_calls, where="loss"):
        super().__init__(model)
        self.calls, self.bad_calls, self.where = 0, bad_calls, where

    def forward(self, images, boxes, labels):
        self.calls += 1
        bad = self.calls in self.bad_calls
        if bad and self.where == "images":
            images = torch.full(images.shape, float("nan"))
        losses = super().forward(images, boxes, labels)
        if bad and self.where == "loss":
            losses["loc"] = losses["loc"] * float("nan")  # NaN gradients for every weight behind loc
        return losses


def trainer_from_parts(cfg, make_task, hooks, max_iters=3):
    """A trainer built from parts: a task of the test's own, and only the hooks the test needs."""
    info = setup_distributed("cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_detector(cfg)
    train_set, _ = build_datasets(cfg, model, info)
    task = make_task(model)
    optimizer = build_optimizer(list(task.parameters()), cfg.optim, cfg.optim.lr)

    def batches(start):
        return build_loader(train_set, 2, train=True, num_workers=0, max_iters=max_iters, start_iter=start)

    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    return Trainer(
        task, optimizer, build_scheduler(optimizer, cfg.optim), batches, info, max_iters,
        hooks(model, run), grad_clip=cfg.optim.grad_clip, max_bad_steps=cfg.train.max_bad_steps,
    )  # fmt: skip


@pytest.mark.parametrize("error", [RuntimeError, ConnectionResetError, EOFError])
def test_loader_workers_ended_by_a_stop_signal_stop_the_run(tmp_path, error):
    """A stop signal to the process group also ends the loader workers: torch reports the lost worker as a
    RuntimeError, or, when it dies mid-transfer, as the pipe's ConnectionResetError or EOFError (seen under
    load). After a stop request each ends the run like a stop after a step; without one it is an error."""
    cfg = tiny_config(tmp_path, "optim.max_iters=3")
    for stop in (True, False):
        trainer = trainer_from_parts(cfg, DetectionTask, lambda model, run: [])
        real = trainer.batches

        def batches(start, trainer=trainer, real=real, stop=stop):
            loader = iter(real(start))
            yield next(loader)
            trainer.stop_requested = stop  # the signal arrives while the next batch is being made
            raise error("the loader's workers are gone")

        trainer.batches = batches
        if stop:
            result = trainer.fit()
            assert result.interrupted and result.iteration == 1
        else:
            with pytest.raises(error):
                trainer.fit()


@pytest.mark.parametrize("where", ["loss", "images"])
def test_a_skipped_step_changes_no_weight_statistic_momentum_or_ema(tmp_path, caplog, where):
    """NaN in the loss, or already in the forward pass (which moves BatchNorm's running statistics before
    the loss is known): the skipped step leaves the model, the optimizer and the EMA as they were."""
    cfg = tiny_config(tmp_path, "optim.max_iters=3", "optim.grad_clip=1.0")
    trainer = trainer_from_parts(
        cfg,
        lambda model: NaNOnCalls(model, {2}, where),
        lambda model, run: [EMAHook(model, 0.9), MetricsHook(run, 1), CheckpointHook(run, 1, 5, cfg, lambda: model)],
    )
    trainer.fit()
    assert "iteration 1: loss is nan, step skipped (1 in a row)" in caplog.text
    before, skipped, after = (torch.load(tmp_path / "run" / f"checkpoint_000000{i}.pt") for i in (1, 2, 3))
    for name, value in before["task"].items():  # weights and BatchNorm statistics (its step count moves on)
        assert name.endswith("num_batches_tracked") or torch.equal(value, skipped["task"][name]), name
    trainable = [name for name, p in trainer.task.named_parameters() if p.requires_grad]
    assert not all(torch.equal(skipped["task"][k], after["task"][k]) for k in trainable)  # the next step trains
    assert all(torch.isfinite(v).all() for v in after["task"].values())
    momentum = [
        (s["momentum_buffer"], t["momentum_buffer"])
        for s, t in zip(before["optimizer"]["state"].values(), skipped["optimizer"]["state"].values(), strict=True)
    ]
    assert momentum and all(torch.equal(a, b) for a, b in momentum)
    ema_before, ema_skipped = before["ema"]["module"], skipped["ema"]["module"]
    assert all(torch.equal(ema_before[k], ema_skipped[k]) for k in ema_before)
    assert before["ema"]["updates"] == skipped["ema"]["updates"] == 1


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path):
    """A checkpoint is what a run resumes from: one holding NaN weights would only fail again."""
    cfg = tiny_config(tmp_path, "optim.max_iters=3", "train.max_bad_steps=10")
    trainer = trainer_from_parts(
        cfg, lambda model: DetectionTask(model), lambda model, run: [CheckpointHook(run, 1, 5, cfg, lambda: model)]
    )
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # as an overflowing update would leave it
    with pytest.raises(TrainingError, match="the weights hold NaN/inf at iteration 1, so no checkpoint is written"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run") is None


def test_metrics_log_is_strict_json_with_null_for_nan(tmp_path):
    """A NaN loss was written as the bare token NaN, which strict JSON readers (jq, JavaScript) reject."""
    cfg = tiny_config(tmp_path, "optim.max_iters=3")
    trainer_from_parts(cfg, lambda model: NaNOnCalls(model, {2}), lambda model, run: [MetricsHook(run, 1)]).fit()

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not strict JSON")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] is None and records[1]["loc"] is None and math.isfinite(records[1]["conf"])
    assert all(math.isfinite(records[i]["loss"]) for i in (0, 2))


def test_resume_refuses_another_model(tmp_path):
    cfg = tiny_config(tmp_path, "optim.max_iters=2")
    make_trainer(cfg).fit()
    other = make_trainer(tiny_config(tmp_path, "model.width_mult=0.75"))
    with pytest.raises(ValueError, match="this run trains"):
        other.fit(resume=tmp_path / "run" / "checkpoint_0000002.pt")
    with pytest.raises(ValueError, match="not an odkd training checkpoint"):
        other.fit(resume=tmp_path / "run" / "best.pt")


def test_loader_workers_still_alive_at_exit_do_not_hold_it_up():
    """Python's exit terminates the loader workers still alive (SIGTERM) and waits for them: workers that
    ignored SIGTERM kept the process, and a test run with them, waiting for ever."""
    code = (
        "import torch; from odkd.data.loader import worker_signals; "
        "loader = torch.utils.data.DataLoader(list(range(64)), batch_size=4, num_workers=2, "
        "persistent_workers=True, worker_init_fn=worker_signals); "
        "batches = iter(loader); next(batches); print('exiting')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr[-2000:]


def test_sigterm_to_the_process_group_checkpoints_and_resume_finishes(tmp_path):
    """Schedulers (Slurm, Kubernetes) signal the whole process group, loader workers included: a worker
    that died of it made the run fail with no checkpoint."""
    cfg_path = tmp_path / "cfg.yaml"
    make_synthetic_voc(tmp_path / "voc", {"trainval": 8, "test": 3}, seed=1, min_size=100, max_size=160)
    cfg_path.write_text(
        f"model: {{width_mult: 0.5}}\ndata: {{voc_root: {tmp_path / 'voc'}, batch_size: 2, num_workers: 2}}\n"
        f"optim: {{max_iters: 400, warmup_iters: 0, milestones: [300]}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, log_every: 1, eval_every: 1000, checkpoint_every: 1000}}\n"
    )
    command = [sys.executable, "scripts/train_teacher.py", "--config", str(cfg_path), "--device", "cpu"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)  # the script, its loader workers and any other child
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "stopped by signal" in output
    checkpoint = latest_checkpoint(tmp_path / "run")
    stopped_at = int(checkpoint.stem.split("_")[1])
    assert 2 <= stopped_at < 400
    done = subprocess.run(
        [*command, "--resume", "auto", "optim.max_iters=" + str(stopped_at + 2)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {checkpoint}" in done.stdout
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint_{stopped_at + 2:07d}.pt"


def test_process_group_backend():
    assert backend_for(use_cuda=False, local_processes=2, gpus=0) == "gloo"
    assert backend_for(use_cuda=True, local_processes=8, gpus=8) == "nccl"  # one GPU per process
    assert backend_for(use_cuda=True, local_processes=2, gpus=1) == "gloo"  # NCCL refuses two ranks on one GPU


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",  # two processes sharing one GPU (gloo): what a one-GPU machine can check of DDP
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_ddp_under_torchrun(tmp_path, device):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 8, "test": 3}, seed=1, min_size=100, max_size=160)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"model: {{width_mult: 0.5}}\ndata: {{voc_root: {tmp_path / 'voc'}, batch_size: 2, num_workers: 0, "
        f"cache_dir: {tmp_path / 'cache'}}}\n"
        f"optim: {{max_iters: 3, warmup_iters: 0, milestones: [2]}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, log_every: 1, eval_every: 3, checkpoint_every: 3}}\n"
        "eval: {batch_size: 1}\n"  # each image alone through the network, in two processes as in one
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "scripts/train_teacher.py", "--config", str(cfg_path), "--device", device]  # fmt: skip
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint_0000003.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Two processes of batch 2: the logged throughput counts 4 images per iteration; rank 0 alone writes logs.
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]
    assert len(list((tmp_path / "cache").glob("*.rgb"))) == 1  # rank 0 decoded, rank 1 waited and read it
    # Each process detected on its share of the test images (rank 0 on images 0 and 2, rank 1 on image 1)
    # and rank 0 scored them all: the result of one process evaluating the same weights.
    [scored] = [{k: r[k] for k in ("metric", "mAP", "ap")} for r in records if "mAP" in r]
    if device == "cpu":  # on CUDA, cuDNN may choose other kernels in another process
        model = load_model(tmp_path / "run" / "best.pt").to(memory_format=torch.channels_last)  # as trained
        test_set = VOCDataset(tmp_path / "voc", "SYN_test", SYNTHETIC_CLASSES)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what torchrun gives each process
        try:
            alone = evaluate_dataset(
                detect_dataset(model, test_set, batch_size=1, num_workers=0, progress=False), test_set
            )
        finally:
            torch.set_num_threads(threads)
        assert scored == alone.to_json() and scored["mAP"] > 0


def test_background_prior_changes_the_class_biases_and_nothing_else():
    """model.background_prior sets the class heads' last biases (background log(p (C - 1) / (1 - p)),
    classes 0) and draws no random numbers: under one seed every other weight is the one the model has
    without it, so the two arms of a paired comparison differ by the prior alone."""
    overrides = ["model.width_mult=0.25", "data.classes=[cat, dog, bird]"]
    torch.manual_seed(0)
    plain = build_detector(load_config(None, overrides)).state_dict()
    torch.manual_seed(0)
    prior = build_detector(load_config(None, [*overrides, "model.background_prior=0.99"]))
    background = math.log(0.99 * 3 / 0.01)
    for name, value in prior.state_dict().items():
        if re.fullmatch(r"conf_heads\.\d+\.predictor\.bias", name):
            assert torch.equal(plain[name], torch.zeros_like(value))
            expected = torch.zeros(value.numel() // 4, 4)
            expected[:, 0] = background
            assert torch.equal(value, expected.flatten()), name
        else:
            assert torch.equal(value, plain[name]), name
