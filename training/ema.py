"""An exponential moving average (EMA) of the model's weights, updated after every optimizer step.

As RT-DETR's and D-FINE's ModelEMA: after `updates` steps the average moves by (1 - d) towards the weights,
with d = decay * (1 - exp(-updates / warmup)), so that early on, while the weights move fast, the average
follows them closely and only later averages over about 1 / (1 - decay) steps. Buffers that are not floating
point (counters) are copied. The average is a full model in eval mode, evaluated as the model is.
"""
import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """The EMA of `model`'s state (of the module inside DistributedDataParallel)."""

    def __init__(self, model: nn.Module, decay: float, warmup: int) -> None:
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay of the `updates`-th update: warmed up from 0 towards `decay` (no warm-up with warmup 0)."""
        return self.decay * (1 - math.exp(-updates / self.warmup)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1 - self.decay_at(self.updates)
        current = _unwrap(model).state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value, weight)  # average + weight * (value - average)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint saves: the averaged weights ("model") and the update count."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved average; this run's decay and warm-up apply from here."""
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
