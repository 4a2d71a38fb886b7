"""Exponential moving average of the weights, updated after every optimizer step.

The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n: with a fixed 0.9998 the
average would still be mostly the random initialisation after a short run. Floating-point buffers
(BatchNorm running statistics) are averaged like the parameters; integer ones (batch counters) copied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(value.detach().to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return dict(module=self.module.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
