"""Optimizers, per-step LR schedules and the param groups of float and QAT training.

A recipe names its optimizer and schedule (:class:`~quantbench.training.config.LoopConfig`);
both are registries, so an unknown name fails with the close matches listed.
Each param group carries its own ``decay``/``decay_steps`` pair, which the
``step`` schedule reads: QAT decays the quantizers' learning rate on its own
period. The scheduler steps once per optimizer step, so recipes stated in
steps ("x0.94 every 2000 steps") are exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from quantbench.engine import qat as qat_api
from quantbench.registry import Registry
from quantbench.training.config import LoopConfig, QatConfig

__all__ = ["OPTIMIZERS", "SCHEDULERS", "float_param_groups", "make_optimizer", "qat_param_groups"]

log = logging.getLogger(__name__)

Groups = list[dict[str, Any]]
LrLambda = Callable[[int], float]

#: name -> (param groups, recipe) -> optimizer.
OPTIMIZERS: Registry[Callable[[Groups, LoopConfig], torch.optim.Optimizer]] = Registry(
    "optimizer", hint="(train.*.optimizer)")
#: name -> (param group, recipe, total steps, steps per epoch) -> LR factor of a step.
SCHEDULERS: Registry[Callable[[dict[str, Any], LoopConfig, int, int], LrLambda]] = Registry(
    "scheduler", hint="(train.*.scheduler)")


@OPTIMIZERS.register
def sgd(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


@OPTIMIZERS.register
def adam(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr)


@OPTIMIZERS.register
def adamw(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr)


@SCHEDULERS.register
def constant(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    return lambda step: 1.0


@SCHEDULERS.register
def step(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    """x ``decay`` every ``decay_steps`` optimizer steps; each param group has its own pair."""
    gamma, period = group["decay"], max(1, group["decay_steps"])
    return lambda i: gamma ** (i // period)


@SCHEDULERS.register
def cosine(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    """Linear warmup over ``warmup_epochs``, then cosine to zero at the last step."""
    warmup = min(int(round(cfg.warmup_epochs * spe)), max(total - 1, 0))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

    return factor


def make_optimizer(groups: Groups, cfg: LoopConfig, steps_per_epoch: int):
    """The optimizer of ``cfg`` over the non-empty ``groups`` and its per-step LambdaLR (one lambda a group)."""
    groups = [g for g in groups if g["params"]]
    optimizer = OPTIMIZERS.get(cfg.optimizer)(groups, cfg)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    schedule = SCHEDULERS.get(cfg.scheduler)
    lambdas = [schedule(g, cfg, total, steps_per_epoch) for g in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _weight_groups(params: Iterable[nn.Parameter], cfg: LoopConfig, name: str) -> Groups:
    """The recipe's weights: one decayed group, or (``decay_norm_and_bias=False``) 1-d parameters apart, undecayed."""
    common = {"lr": cfg.lr, "decay": cfg.lr_decay, "decay_steps": cfg.lr_decay_steps}
    params = [p for p in params if p.requires_grad]
    if cfg.decay_norm_and_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay, "name": name, **common}]
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay, "name": name,
             **common},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, "name": f"{name}_no_decay",
             **common}]


def float_param_groups(model: nn.Module, cfg: LoopConfig) -> Groups:
    """Param groups of a float model's training."""
    return _weight_groups(model.parameters(), cfg, "weights")


def qat_param_groups(model: nn.Module, cfg: QatConfig) -> Groups:
    """Param groups of QAT: the weights, and the quantizer parameters at their own rate.

    Quantizer parameters (LSQ step sizes, arXiv 1902.08153; TQT log2
    thresholds, arXiv 1903.08066) get their own learning rate and decay and
    no weight decay: decaying a threshold towards zero would shrink the range.
    """
    quant = list(qat_api.quantizer_parameters(model))
    quant_ids = {id(p) for p in quant}
    weights = [p for p in qat_api.weight_parameters(model) if id(p) not in quant_ids]
    log.info("QAT: %d weight and %d quantizer parameter tensors", len(weights), len(quant))
    return [*_weight_groups(weights, cfg, "weights"),
            {"params": quant, "lr": cfg.quant_lr, "weight_decay": cfg.quant_weight_decay,
             "decay": cfg.quant_lr_decay, "decay_steps": cfg.quant_lr_decay_steps, "name": "quantizers"}]
