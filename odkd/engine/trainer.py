"""The iteration-based training loop, built from parts: a task, an optimizer, a schedule, batches, and hooks.

:class:`Trainer` owns the step and nothing else (detectron2's ``SimpleTrainer`` is the model). One step
(:meth:`Trainer.run_step`): uint8 batch -> device (copied one batch ahead on a side stream) -> task forward
under autocast (bf16, or fp16 + GradScaler) -> losses -> backward -> clip -> optimizer step -> lr schedule,
with no host synchronisation but one read of the NaN/stop flags after the backward pass is queued. A
NaN/inf loss skips the step; ``max_bad_steps`` in a row stop the run. The step records its phase times
(data wait, and with ``time_phases`` forward, loss, backward and optimizer, the device synchronised after
each): what ``scripts/benchmark.py`` reports, from the trainer's own step.

Everything around the step is a :class:`HookBase` (:mod:`odkd.engine.hooks`): the run folder, step-0
calibration, EMA, metrics and TensorBoard, progress, evaluation, checkpoints and signals. Hooks run in
the order given; a hook's ``state_dict`` goes into training checkpoints, so a resumed run continues
exactly. Runs on the CPU, one GPU, or many under torchrun.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from odkd.checkpoint import read_torch_file
from odkd.data import prefetch_to_device
from odkd.engine.distributed import DistInfo, all_reduce_sum

__all__ = [
    "CUDA_GRAPH_MODES",
    "PHASES",
    "TRAIN_FORMAT",
    "HookBase",
    "StepOutput",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "begin_compiled_step",
    "latest_checkpoint",
    "read_metrics",
]

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
PHASES = ("data wait", "forward", "matching + loss", "backward", "optimizer")
TRAIN_FORMAT = "odkd-train"

log = logging.getLogger("odkd")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/inf); the message says why and what to do."""


@dataclass
class TrainResult:
    iteration: int  # iterations completed
    interrupted: bool  # stopped by SIGINT/SIGTERM
    best_map: float | None = None
    last_map: float | None = None
    checkpoint: Path | None = None  # the last training checkpoint (resume from it)
    best_model: Path | None = None  # model file of the best evaluation
    final_model: Path | None = None  # model file at the end of training


@dataclass
class StepOutput:
    """What one step did, for the hooks that run after it."""

    losses: dict[str, torch.Tensor]  # the named terms (on the device)
    loss: torch.Tensor  # their sum
    images: int  # images in the step, all processes together
    skipped: bool  # the loss was NaN/inf somewhere: no update


class HookBase:
    """A part of a run around the step. Every method is optional; ``self.trainer`` is set on registration.

    ``state_dict()`` entries go into training checkpoints (top-level keys) and ``load_state_dict`` gets the
    whole checkpoint back on resume; ``log(record)`` receives every record of the run (training windows,
    evaluations) that some hook or the trainer writes with :meth:`Trainer.log`."""

    trainer: Trainer

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_train(self) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def log(self, record: dict) -> None: ...

    def result(self) -> dict:
        """What this hook adds to the run's :class:`TrainResult` (its field names)."""
        return {}


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in ``output_dir`` (training windows and evaluations, one dict per
    line, keyed by ``"iter"``); an empty list if there is none."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The training checkpoint of the highest iteration in ``output_dir`` (None if there is none)."""
    found = sorted(Path(output_dir).glob("checkpoint_*.pt"))
    return found[-1] if found else None


class Trainer:
    """Trains ``task`` (a module mapping (images, boxes, labels) to named losses; ``task.model`` is the SSD).

    Args:
        task: on ``info.device`` already (and in its memory format).
        optimizer, scheduler: over the task's trainable parameters; the scheduler steps once per iteration.
        batches: ``batches(start_iteration)`` -> the collated training batches from that iteration on.
        info: this process's place in the run (rank, world size, device).
        max_iters: iterations of the whole run.
        hooks: run in this order before and after each step (see :class:`HookBase`).
        amp_dtype: autocast dtype (None: float32); fp16 adds a GradScaler.
        grad_clip: max gradient norm (None: no clipping).
        max_bad_steps: NaN/inf steps in a row before the run stops.
        compile, compile_mode: ``torch.compile`` the step (the task forward, DDP included) and its mode.
        fixed_gt_slots: the batches' targets have one padded shape (compiled steps need not mark it dynamic).
    """

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batches: Callable[[int], Iterable[dict]],
        info: DistInfo,
        max_iters: int,
        hooks: Sequence[HookBase] = (),
        *,
        amp_dtype: torch.dtype | None = None,
        grad_clip: float | None = None,
        max_bad_steps: int = 10,
        compile: bool = False,
        compile_mode: str = "default",
        fixed_gt_slots: bool = False,
    ) -> None:
        self.task, self.model = task, task.model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batches, self.info, self.device = batches, info, info.device
        self.max_iters = max_iters
        self.amp_dtype, self.grad_clip, self.max_bad_steps = amp_dtype, grad_clip, max_bad_steps
        self.compile, self.fixed_gt_slots = compile, fixed_gt_slots
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # BatchNorm statistics change in the forward pass, before the loss says whether the step is kept: a
        # copy from before it restores them when a NaN/inf step is skipped (a few thousand numbers).
        self.statistics = [
            stat
            for module in task.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for stat in (module.running_mean, module.running_var)
        ]  # only what a forward pass moves: not the priors or other constant buffers
        self.statistics_before = [b.clone() for b in self.statistics]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        step_module: nn.Module = task
        if info.distributed:
            step_module = DistributedDataParallel(
                task, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step_module = torch.compile(step_module, mode=compile_mode) if compile else step_module
        self.hooks: list[HookBase] = []
        self.register(*hooks)
        self.iteration = 0
        self.start_iteration = 0  # where this process's run began (0, or the resumed checkpoint's)
        self.stop_requested = False  # set by a signal: the run checkpoints after this step and ends
        self.stopped = False  # the run ended on a stop request (every process agreed)
        self.bad_in_a_row = 0
        self.time_phases = False  # split the step into phases, the device synchronised after each
        self.phase_times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.step_output: StepOutput | None = None

    def register(self, *hooks: HookBase) -> None:
        """Add ``hooks`` after the ones the trainer has."""
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    # ------------------------------------------------------------------------------------- the run
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Resume from the checkpoint ``resume`` (if given), train, and say what came of it."""
        if resume is not None:
            self.resume(resume)
        self.train()
        fields = {}
        for hook in self.hooks:
            fields.update(hook.result())
        return TrainResult(self.iteration, self.stopped, **fields)

    def train(self) -> None:
        """Run the hooks and the steps from :attr:`iteration` to ``max_iters`` (or a stop request)."""
        self.start_iteration = self.iteration
        for hook in self.hooks:
            hook.before_train()
        try:
            batches = iter(prefetch_to_device(self.batches(self.iteration), self.device))
            while self.iteration < self.max_iters and not self.stopped:
                start = time.perf_counter()
                try:
                    self.batch = next(batches)
                except (RuntimeError, ConnectionError, EOFError):
                    # A stop signal sent to the whole process group also ends the loader workers, so the
                    # batch they were preparing never comes (torch reports a worker gone as RuntimeError,
                    # or, when it dies mid-transfer, as the pipe's ConnectionResetError or EOFError); the run
                    # stops here as it would after a step.
                    if not self.stop_requested:
                        raise
                    self.stopped = True
                    break
                self.phase_times["data wait"].append(time.perf_counter() - start)
                for hook in self.hooks:
                    hook.before_step()
                self.step_output = self.run_step()
                for hook in self.hooks:
                    hook.after_step()
        finally:
            for hook in self.hooks:
                hook.after_train()

    def run_step(self) -> StepOutput:
        """One iteration on :attr:`batch`; the step counter, the schedule and the stop state advance."""
        images, boxes, labels = self.batch
        _copy_all(self.statistics_before, self.statistics)
        if self.compile:
            begin_compiled_step(boxes, labels, fixed_gt_slots=self.fixed_gt_slots)
        with self.autocast():
            if self.time_phases:  # the task's two halves apart, as the phase times need
                mark = self._phase_timer()
                outputs = self.task.predict(images)
                mark("forward")
                losses = self.task.losses(outputs, boxes, labels)
                mark("matching + loss")
            else:
                losses = self.step_module(images, boxes, labels)
        loss = sum(losses.values())
        # One small all-reduce: every process skips the step, or stops, together. The host reads the flags
        # only after queuing the backward pass, so the GPU works through it while the host waits for the
        # forward's flags (reading them first would leave the GPU idle until the backward's kernels arrive).
        not_finite = (~torch.isfinite(loss.detach())).float()
        stop_flag = torch.full_like(not_finite, float(self.stop_requested))
        flags = _start_copy_to_host(all_reduce_sum(torch.stack([not_finite, stop_flag]), self.info))
        self.backward(loss)
        if self.time_phases:
            mark("backward")
        bad, stop = flags().tolist()
        if bad:
            self._skip_step(loss)
        else:
            self.bad_in_a_row = 0
            self.optimizer_step()
        self.scheduler.step()
        if self.time_phases:
            mark("optimizer")
        self.iteration += 1
        self.stopped = bool(stop)
        return StepOutput(losses, loss, images.shape[0] * self.info.world_size, bool(bad))

    def _skip_step(self, loss: torch.Tensor) -> None:
        """Leave no trace of the step in the model (its weights were not updated; its statistics are put
        back) and stop the run after ``max_bad_steps`` in a row."""
        _copy_all(self.statistics, self.statistics_before)
        self.bad_in_a_row += 1
        log.warning(
            "iteration %d: loss is %s, step skipped (%d in a row)", self.iteration, loss.item(), self.bad_in_a_row
        )
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingError(
                f"the loss was NaN/inf for {self.bad_in_a_row} iterations in a row (last at iteration "
                f"{self.iteration}). Lower optim.lr or lengthen optim.warmup_iters, and check the data for bad "
                "boxes; then resume from the last checkpoint."
            )
        self.optimizer.zero_grad(set_to_none=True)

    def _phase_timer(self) -> Callable[[str], None]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        last = [time.perf_counter()]

        def mark(phase: str) -> None:
            sync()
            now = time.perf_counter()
            self.phase_times[phase].append(now - last[0])
            last[0] = now

        return mark

    # --------------------------------------------------------------------------- the step's pieces
    def autocast(self) -> torch.autocast:
        """The mixed-precision context of the forward pass and the losses (disabled without AMP)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> None:
        """Clip (if configured), optimizer step, loss-scale update."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def log(self, record: dict) -> None:
        """Hand a record (``{"iter": ..., ...}``) to every hook (the metrics hook writes it)."""
        for hook in self.hooks:
            hook.log(record)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """A training checkpoint: the step's state (task, optimizer, schedule, loss scale, RNG) and every
        hook's."""
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this device's alone: the run may resume on a machine with fewer GPUs
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": TRAIN_FORMAT,
            "version": 1,
            "iteration": self.iteration,
            "spec": dict(self.model.spec),
            "preprocessing": self.model.preprocessing.to_dict(),
            "class_names": list(self.model.class_names) if self.model.class_names else None,
            "task": self.task.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this machine's kernels, not those of the one that saved
            group.update(fused=self.optimizer.defaults["fused"], foreach=self.optimizer.defaults["foreach"])
        match_state_layout(self.optimizer)
        configured = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(state["scheduler"])
        self._follow_configured_lr(configured)
        if state["scaler"]:  # empty when saved without fp16 (bf16, CPU); a fresh scale then
            self.scaler.load_state_dict(state["scaler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"].get("cuda")
        if cuda_rng is not None and self.device.type == "cuda":
            if isinstance(cuda_rng, list):  # checkpoints before 2026-11-24 hold every visible GPU's state
                cuda_rng = cuda_rng[self.device.index if self.device.index < len(cuda_rng) else 0]
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.iteration = state["iteration"]
        for hook in self.hooks:
            hook.load_state_dict(state)

    def _follow_configured_lr(self, configured: list[float]) -> None:
        """After loading a schedule saved with other base learning rates (``optim.lr`` changed before the
        resume): the configured ones win, the schedule's factor at this iteration kept, and the log says so."""
        saved = list(self.scheduler.base_lrs)
        if saved == configured:
            return
        log.warning(
            "optim.lr differs from the checkpoint's (base lr %s -> %s): the schedule goes on with the configured lr",
            ", ".join(f"{lr:g}" for lr in saved),
            ", ".join(f"{lr:g}" for lr in configured),
        )
        for group, old, new in zip(self.optimizer.param_groups, saved, configured, strict=True):
            group["lr"] *= new / old  # every schedule here is a factor of the base lr
            group["initial_lr"] = new
        self.scheduler.base_lrs = configured
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def resume(self, path: str | Path) -> None:
        """Continue the run saved in the training checkpoint at ``path``."""
        path = Path(path)
        state = read_torch_file(path)  # on the CPU: RNG states must stay there
        if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{path} is not an odkd training checkpoint (use model.init_checkpoint for weights)")
        if state["spec"] != self.model.spec:
            raise ValueError(f"{path} holds a {state['spec']} model, this run trains {self.model.spec}")
        self.load_state_dict(state)
        log.info("resumed from %s at iteration %d", path, self.iteration)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor the memory layout of its parameter. Loaded states keep the layout
    they were saved with (contiguous from a run without channels_last, channels_last from one with it),
    and the fused CUDA kernels refuse parameters, gradients and momenta of different strides."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def begin_compiled_step(*targets: torch.Tensor, fixed_gt_slots: bool = False) -> None:
    """Before a torch.compile'd step: unless the targets are padded to fixed GT slots, tell it that the
    padded GT count (dim 1 of boxes and labels) changes from batch to batch, so the step is compiled once
    for any count rather than again when the count first changes; and mark a new step, so that with CUDA
    graphs (compile_mode reduce-overhead) its replay may reuse the previous step's output memory."""
    if not fixed_gt_slots:
        for tensor in targets:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
    torch.compiler.cudagraph_mark_step_begin()


def _start_copy_to_host(values: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying ``values`` to the host without waiting; the returned function waits for this copy
    alone (not for work queued on the device after it) and gives the host tensor."""
    if values.device.type != "cuda":
        return lambda: values
    host = values.to("cpu", non_blocking=True)  # into pinned memory: the copy is queued, not waited for
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> torch.Tensor:
        copied.synchronize()
        return host

    return wait


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` in one call; nothing for empty lists (a model without BatchNorm, such
    as the VGG16 models), which ``_foreach_copy_`` refuses."""
    if targets:
        torch._foreach_copy_(targets, sources)
