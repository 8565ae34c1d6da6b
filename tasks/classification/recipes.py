"""Float-baseline and QAT recipes on top of :func:`loops.fit`.

A recipe is data (:class:`TrainConfig`, :class:`QatConfig`); this module turns
it into an optimizer with its param groups, a per-step LR schedule and a
:class:`loops.TrainMode`. Optimizers and schedules are registries, so a config
names them and an unknown name fails with the known ones listed.

QAT talks to the engine only through ``quantbench.engine.qat``. A torch.export GraphModule refuses
``.train()``/``.eval()``, so the engine's ``train_mode``/``eval_mode`` switch
BatchNorm, dropout and observers consistently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from quantbench.harness.protocol import TrainResult
from tasks.classification.config import LoopConfig, QatConfig, TrainConfig
from tasks.classification.loops import fit

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "FloatMode",
    "QatMode",
    "load_qat_api",
    "qat_optimizer",
    "train_float",
    "train_qat",
]

log = logging.getLogger(__name__)

Groups = list[dict[str, Any]]


def _sgd(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _adam(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr)


def _adamw(groups: Groups, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr)


OPTIMIZERS: dict[str, Callable[[Groups, LoopConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}

LrLambda = Callable[[int], float]


def _constant(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    return lambda step: 1.0


def _step(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    """x ``decay`` every ``decay_steps`` optimizer steps; each param group has its own pair."""
    gamma, period = group["decay"], max(1, group["decay_steps"])
    return lambda step: gamma ** (step // period)


def _cosine(group: dict[str, Any], cfg: LoopConfig, total: int, spe: int) -> LrLambda:
    """Linear warmup over ``warmup_epochs``, then cosine to zero at the last step."""
    warmup = min(int(round(cfg.warmup_epochs * spe)), max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


SCHEDULERS: dict[str, Callable[[dict[str, Any], LoopConfig, int, int], LrLambda]] = {
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
}


def _lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(registry)}") from None


def make_optimizer(groups: Groups, cfg: LoopConfig, steps_per_epoch: int):
    """The optimizer and its per-step LambdaLR (one lambda per param group)."""
    groups = [g for g in groups if g["params"]]
    optimizer = _lookup(OPTIMIZERS, cfg.optimizer, "optimizer")(groups, cfg)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    schedule = _lookup(SCHEDULERS, cfg.scheduler, "scheduler")
    lambdas = [schedule(g, cfg, total, steps_per_epoch) for g in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


class FloatMode:
    """An ordinary nn.Module: ``.train()``/``.eval()``; nothing to freeze."""

    def train(self, model: nn.Module) -> None:
        model.train()

    def eval(self, model: nn.Module) -> None:
        model.eval()

    def on_step(self, model: nn.Module, step: int) -> None:
        return None


class QatMode:
    """Switches a fake-quant GraphModule through the engine and applies the freeze points.

    Observer freezing stops range updates once the ranges have settled;
    BatchNorm freezing switches folded-BN QAT to running statistics so the
    folded weights stop moving with batch noise (Jacob et al., arXiv
    1712.05877, sec. 3.2; Krishnamoorthi, arXiv 1806.08342). Both stay frozen
    across later ``train`` calls, whatever the engine's ``train_mode`` resets.
    """

    def __init__(
        self, api: ModuleType, freeze_observers_step: int | None, freeze_bn_step: int | None
    ) -> None:
        self.api = api
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step
        self.observers_frozen = False
        self.bn_frozen = False

    def train(self, model: nn.Module) -> None:
        self.api.train_mode(model)
        if self.observers_frozen:
            self.api.set_observers(model, enabled=False)
        if self.bn_frozen:
            self.api.set_bn_frozen(model, True)

    def eval(self, model: nn.Module) -> None:
        self.api.eval_mode(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        if (
            not self.observers_frozen
            and self.freeze_observers_step is not None
            and step >= self.freeze_observers_step
        ):
            self.api.set_observers(model, enabled=False)
            self.observers_frozen = True
            log.info("QAT: observers frozen at step %d", step)
        if not self.bn_frozen and self.freeze_bn_step is not None and step >= self.freeze_bn_step:
            self.api.set_bn_frozen(model, True)
            self.bn_frozen = True
            log.info("QAT: BatchNorm statistics frozen at step %d", step)


def load_qat_api() -> ModuleType:
    """``quantbench.engine.qat``, imported late so float-only runs never need it."""
    try:
        from quantbench.engine import qat
    except ImportError as exc:
        raise NotImplementedError("QAT schemes need the engine's QAT support (issue 3)") from exc
    return qat


def train_float(
    model: nn.Module, train_loader: Iterable, val_loader: Iterable, cfg: TrainConfig, device: torch.device
) -> TrainResult:
    """Train a float nn.Module with one param group (the baseline recipe)."""
    model.to(device)
    groups = [
        {
            "params": [p for p in model.parameters() if p.requires_grad],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "decay": cfg.lr_decay,
            "decay_steps": cfg.lr_decay_steps,
        }
    ]
    optimizer, scheduler = make_optimizer(groups, cfg, len(train_loader))  # type: ignore[arg-type]
    return fit(
        model,
        train_loader,
        val_loader,
        cfg,
        optimizer=optimizer,
        scheduler=scheduler,
        mode=FloatMode(),
        device=device,
        desc="float",
    )


def _at_step(epochs: float | None, steps_per_epoch: int) -> int | None:
    return None if epochs is None else int(round(epochs * steps_per_epoch))


def qat_optimizer(
    api: ModuleType, model: nn.Module, cfg: QatConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, QatMode]:
    """Optimizer, schedule and :class:`QatMode` of a QAT recipe (shared by the tasks' QAT loops).

    Weights and quantizer parameters (LSQ step sizes, arXiv 1902.08153; TQT
    log2 thresholds, arXiv 1903.08066) go into two param groups: the
    quantizers get their own learning rate and decay and no weight decay,
    since decaying a threshold towards zero would shrink the range.
    """
    quant = list(api.quantizer_parameters(model))
    quant_ids = {id(p) for p in quant}
    weights = [p for p in api.weight_parameters(model) if id(p) not in quant_ids]
    groups = [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "decay": cfg.lr_decay,
         "decay_steps": cfg.lr_decay_steps, "name": "weights"},
        {"params": quant, "lr": cfg.quant_lr, "weight_decay": cfg.quant_weight_decay, "decay": cfg.quant_lr_decay,
         "decay_steps": cfg.quant_lr_decay_steps, "name": "quantizers"},
    ]
    optimizer, scheduler = make_optimizer(groups, cfg, steps_per_epoch)
    mode = QatMode(api, _at_step(cfg.freeze_observers_after, steps_per_epoch),
                   _at_step(cfg.freeze_bn_after, steps_per_epoch))
    log.info("QAT: %d weight and %d quantizer parameter tensors", len(weights), len(quant))
    return optimizer, scheduler, mode


def train_qat(
    model: nn.Module, train_loader: Iterable, val_loader: Iterable, cfg: QatConfig, device: torch.device
) -> TrainResult:
    """QAT of an engine fake-quant GraphModule: weights and quantizer parameters in two groups.

    Quantizer parameters (LSQ step sizes, arXiv 1902.08153; TQT log2
    thresholds, arXiv 1903.08066) get their own learning rate, decay and no
    weight decay: decaying a threshold towards zero would shrink the range.

    Raises:
        NotImplementedError: The engine has no QAT support yet.
    """
    api = load_qat_api()
    model.to(device)
    spe = len(train_loader)  # type: ignore[arg-type]
    optimizer, scheduler, mode = qat_optimizer(api, model, cfg, spe)
    return fit(
        model,
        train_loader,
        val_loader,
        cfg,
        optimizer=optimizer,
        scheduler=scheduler,
        mode=mode,
        device=device,
        desc="qat",
    )
