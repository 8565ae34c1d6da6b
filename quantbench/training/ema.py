"""An exponential moving average of a model's weights (Polyak averaging), for :func:`~quantbench.training.loop.fit`."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """Exponential moving average of a model's floating-point state.

    The decay ramps up as ``decay * (1 - exp(-updates / tau))``, so the
    average follows the fast early training and settles later. Integer
    buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current state."""
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(value, alpha=1.0 - d)
            else:
                avg.copy_(value)

    def state(self) -> dict[str, Any]:
        """The average and its update count as plain data (for a resumable checkpoint)."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over what :meth:`state` returned (a resumed run)."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
