"""Float-baseline and QAT training: a recipe (data) turned into param groups, a schedule and a mode, then :func:`fit`.

Both tasks train through these two functions; what differs between tasks is
the :class:`~quantbench.training.loop.Objective` (the loss) and the
``validate`` function they pass in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from quantbench.training.config import LoopConfig, QatConfig
from quantbench.training.loop import Objective, Validate, fit, steps_per_epoch
from quantbench.training.optim import float_param_groups, make_optimizer, qat_param_groups
from quantbench.training.protocol import TrainResult
from quantbench.training.qat_schedule import FloatMode, QatMode, freeze_step

__all__ = ["train_float", "train_qat"]


def train_float(model: nn.Module, train_loader: Iterable, cfg: LoopConfig, *, objective: Objective,
                validate: Validate, monitor: str, device: torch.device) -> TrainResult:
    """Train a float nn.Module with the recipe ``cfg`` (the float baseline)."""
    model.to(device)
    optimizer, scheduler = make_optimizer(float_param_groups(model, cfg), cfg, steps_per_epoch(train_loader))
    return fit(model, train_loader, cfg, objective=objective, validate=validate, monitor=monitor,
               optimizer=optimizer, scheduler=scheduler, mode=FloatMode(), device=device, desc="float")


def train_qat(model: nn.Module, train_loader: Iterable, cfg: QatConfig, *, objective: Objective,
              validate: Validate, monitor: str, device: torch.device) -> TrainResult:
    """QAT of an engine fake-quant GraphModule: weights and quantizer parameters at their own rates,
    observers and BatchNorm frozen at the recipe's points."""
    model.to(device)
    spe = steps_per_epoch(train_loader)
    optimizer, scheduler = make_optimizer(qat_param_groups(model, cfg), cfg, spe)
    mode = QatMode(freeze_step(cfg.freeze_observers_after, spe), freeze_step(cfg.freeze_bn_after, spe))
    return fit(model, train_loader, cfg, objective=objective, validate=validate, monitor=monitor,
               optimizer=optimizer, scheduler=scheduler, mode=mode, device=device, desc="qat")
