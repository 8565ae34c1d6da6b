"""One training loop for the detector's float baseline and its QAT.

The loop is the classification recipes' machinery (optimizer and schedule
registries, :class:`FloatMode` / :class:`QatMode`, best-checkpoint keeping)
with a detection step: the :class:`DetectionLoss` on raw outputs, gradient
clipping, an optional weight EMA and mAP evaluation every ``eval_every``
epochs. QAT goes through the engine's QAT API only: weights and quantizer
parameters (LSQ steps, TQT thresholds) in separate param groups with their own
learning rates, observer and BatchNorm freeze points.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from quantbench.harness.protocol import TrainResult
from tasks.classification.loops import BestCheckpoint, TrainMode
from tasks.classification.recipes import FloatMode, load_qat_api, make_optimizer, qat_optimizer
from tasks.detection.config import DetQatConfig, DetTrainConfig
from tasks.detection.loss import DetectionLoss

__all__ = ["ModelEMA", "fit_detector", "train_float", "train_qat"]

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], dict[str, float]]


class ModelEMA:
    """Exponential moving average of a model's floating-point state (Polyak averaging).

    The decay ramps up as ``decay * (1 - exp(-updates / tau))``, so the
    average follows the fast early training and settles later. Integer buffers
    (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(value, alpha=1.0 - d)
            else:
                avg.copy_(value)


def _decay_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BatchNorm, biases and branch scales are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    common = {"lr": cfg.lr, "decay": cfg.lr_decay, "decay_steps": cfg.lr_decay_steps}
    return [{"params": decay, "weight_decay": cfg.weight_decay, **common},
            {"params": no_decay, "weight_decay": 0.0, **common}]


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


def fit_detector(
    model: nn.Module,
    train_loader: Iterable,
    evaluate: Evaluate,
    loss_fn: DetectionLoss,
    cfg: DetTrainConfig | DetQatConfig,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mode: TrainMode,
    device: torch.device,
    desc: str = "train",
) -> TrainResult:
    """Train for ``cfg.epochs`` (or ``cfg.steps``); keep the best mAP@0.5:0.95 checkpoint.

    ``evaluate(model) -> {"map50_95", "map50"}`` is called with the model in
    eval mode (the EMA copy when ``cfg.ema``). The model comes back on the
    CPU/device it came in on, with the best weights loaded, in eval mode.
    """
    start = time.perf_counter()
    home = next(iter(model.parameters())).device
    spe = len(train_loader)  # type: ignore[arg-type]
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe) if spe else 0
    model.to(device)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
    best = BestCheckpoint(cfg.keep_best, cfg.checkpoint_dir)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history: list[dict[str, float]] = []
    torch.manual_seed(cfg.seed)  # augmentation and shuffling draw from the global generator
    step = 0
    for epoch in range(1, epochs + 1):
        mode.train(model)
        sums: dict[str, float] = {"loss": 0.0, "cls": 0.0, "iou": 0.0, "dfl": 0.0}
        seen = 0
        for images, targets in train_loader:
            if step >= total:
                break
            mode.on_step(model, step)
            outputs = model(images.to(device, non_blocking=True))
            loss, parts = loss_fn(outputs, _to_device(targets, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {float(loss)} at step {step}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            seen += 1
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
        row = {"epoch": epoch, "step": step, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        if epoch % max(1, cfg.eval_every) == 0 or epoch == epochs:
            target = ema.module if ema is not None else model
            mode.eval(target)
            val = evaluate(target)
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = best.update(val["map50_95"], target)
            log.info("%s epoch %d/%d: loss %.3f, val mAP %.4f (mAP50 %.4f)%s", desc, epoch, epochs,
                     row["train_loss"], val["map50_95"], val["map50"], " (best)" if improved else "")
        else:
            log.info("%s epoch %d/%d: loss %.3f", desc, epoch, epochs, row["train_loss"])
        history.append(row)
    if ema is not None and best.best is None:  # nothing evaluated (e.g. steps < one epoch): keep the average
        model.load_state_dict(ema.module.state_dict())
    best.restore(model)
    mode.eval(model)
    model.to(home)
    return TrainResult(model=model, history=history, best_metric=best.best, seconds=time.perf_counter() - start)


def train_float(
    model: nn.Module, train_loader: Iterable, evaluate: Evaluate, loss_fn: DetectionLoss, cfg: DetTrainConfig,
    device: torch.device,
) -> TrainResult:
    """The float baseline: decayed conv weights and undecayed BN/bias in two groups, EMA on by default."""
    model.to(device)
    optimizer, scheduler = make_optimizer(_decay_groups(model, cfg), cfg, len(train_loader))  # type: ignore[arg-type]
    return fit_detector(model, train_loader, evaluate, loss_fn, cfg, optimizer=optimizer, scheduler=scheduler,
                        mode=FloatMode(), device=device, desc="float")


def train_qat(
    model: nn.Module, train_loader: Iterable, evaluate: Evaluate, loss_fn: DetectionLoss, cfg: DetQatConfig,
    device: torch.device,
) -> TrainResult:
    """QAT of the engine's fake-quant GraphModule: weights and quantizer parameters at their own rates."""
    api = load_qat_api()
    model.to(device)
    optimizer, scheduler, mode = qat_optimizer(api, model, cfg, len(train_loader))  # type: ignore[arg-type]
    return fit_detector(model, train_loader, evaluate, loss_fn, cfg, optimizer=optimizer, scheduler=scheduler,
                        mode=mode, device=device, desc="qat")
