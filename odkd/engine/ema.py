"""An exponential moving average (EMA) of a model's weights, evaluated and exported instead of the raw ones."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * model`` after each optimizer step (:meth:`update`).

    The first update copies the model; later ones average its floating-point parameters and buffers
    (BN statistics included) with one multi-tensor lerp on the device, and copy integer buffers (BN's
    batch counters). The update count lives on the host, so an update never waits for the GPU (torch's
    ``AveragedModel`` reads its device-side count twice per update), and both models' module lists are
    collected once: walking the module tree for every update took 1.5 ms of host time per step for
    MobileNetV2-SSDLite (481 tensors), reading them from the kept lists 0.25 ms.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._modules = list(self.module.modules())
        self._source: tuple[nn.Module, list[nn.Module]] | None = None  # the model averaged, its modules

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._source is None or self._source[0] is not model:
            self._source = (model, list(model.modules()))
        pairs = list(zip(_tensors(self._modules), _tensors(self._source[1]), strict=True))
        if self.updates == 0:
            torch._foreach_copy_([ema for ema, _ in pairs], [new for _, new in pairs])
        else:
            floats = [(ema, new) for ema, new in pairs if ema.is_floating_point()]
            torch._foreach_lerp_([ema for ema, _ in floats], [new for _, new in floats], 1.0 - self.decay)
            for ema, new in pairs:
                if not ema.is_floating_point():
                    ema.copy_(new)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "n_averaged" in state:  # written by torch's AveragedModel (odkd before ModelEMA): same weights
            module = {key.removeprefix("module."): value for key, value in state.items() if key != "n_averaged"}
            state = {"module": module, "updates": int(state["n_averaged"])}
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, read now: a buffer replaced since (``.to()``) is seen."""
    return [
        t for module in modules for own in (module._parameters, module._buffers) for t in own.values() if t is not None
    ]
