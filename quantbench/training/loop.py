"""The one training loop: float baselines and QAT, for every task, resumable and data-parallel.

:func:`fit` owns what every task's training shares: epochs or a step budget,
the per-step LR schedule, freeze points (through a
:class:`~quantbench.training.qat_schedule.TrainMode`), gradient clipping, a weight
EMA, validation every ``eval_every`` epochs with the best checkpoint kept,
resumable checkpoints, and DistributedDataParallel. A task supplies only what
it knows:

* an :class:`Objective`: the loss of one batch, and additive per-batch sums
  (loss x samples, correct predictions, ...) that the loop accumulates over
  the epoch and the ranks, and that the objective turns into epoch metrics;
* a ``validate(model) -> metrics`` function, called on every rank with the
  model in evaluation mode; ``monitor`` names the metric whose best value is
  kept (the task's primary metric).

Under torchrun each rank trains on its share of the data through DDP; after
every step the fake-quant observers are synchronised
(:func:`~quantbench.training.distributed.sync_quantizers`) and rank 0's buffers
broadcast, so the EMA, validation and checkpoints see one model. With
``resume_dir`` set the loop checkpoints each epoch (after its validation) and
every ``checkpoint_steps``; a rerun carries on from there and, with a seeded
loader (:func:`~quantbench.training.data.make_loader`), ends with the same
weights and history on CPU as an uninterrupted run. Every rank checks that it
resumes at the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from quantbench.engine.finite import QuantizerGuard
from quantbench.progress import progress
from quantbench.training import distributed
from quantbench.training.checkpoint import BestCheckpoint, TrainingCheckpoint
from quantbench.training.config import LoopConfig
from quantbench.training.data import start_epoch
from quantbench.training.ema import ModelEMA
from quantbench.training.protocol import TrainResult
from quantbench.training.qat_schedule import TrainMode

__all__ = ["EpochSums", "Objective", "Validate", "fit", "steps_per_epoch"]

log = logging.getLogger(__name__)

#: What to do when a quantizer parameter (LSQ step, TQT log2 threshold) turns NaN / inf in training.
_DIVERGED = ("the quantizer parameters diverged: lower the recipe's quantizer and weight learning rates "
             "(train.qat.quant_lr, train.qat.lr) or set train.qat.grad_clip")

#: model (in eval mode) -> validation metrics, keys without prefix ("top1", "map50_95").
Validate = Callable[[nn.Module], Mapping[str, float]]


class Objective(Protocol):
    """What a task computes on one training batch."""

    def __call__(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise, and this batch's additive sums (summed over the epoch and the ranks)."""

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Epoch metrics from the summed values; the loop logs them as ``train_<key>``."""


@dataclass
class EpochSums:
    """Running sums of one epoch on this rank (kept in a mid-epoch checkpoint)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: Mapping[str, float]) -> None:
        self.steps += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def reduced(self) -> EpochSums:
        """The sums over every rank (what a checkpoint keeps; after a resume rank 0 carries them on)."""
        keys = sorted(self.sums)
        *values, steps = distributed.all_reduce_sum([*(self.sums[k] for k in keys), self.steps])
        return EpochSums(dict(zip(keys, values)), int(steps))


def steps_per_epoch(loader: Any) -> int:
    """Optimizer steps in one epoch of ``loader`` (a loader left part-way through a resumed epoch counts whole)."""
    start_epoch(loader, 1, 0)
    return len(loader)


class _Resume:
    """The loop's checkpoints: each epoch end and every ``checkpoint_steps``; a no-op without ``resume_dir``."""

    def __init__(self, cfg: LoopConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 best: BestCheckpoint, ema: ModelEMA | None, desc: str) -> None:
        where = ("resume_dir", "checkpoint_dir", "checkpoint_steps")  # where and how often: not the run
        recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in where}
        fingerprint = {"recipe": recipe, "world_size": distributed.current().world_size, "loop": desc}
        self.ckpt = (TrainingCheckpoint(cfg.resume_dir, model, optimizer, scheduler, fingerprint=fingerprint)
                     if cfg.resume_dir else None)
        self.every, self.best, self.ema = cfg.checkpoint_steps, best, ema

    def restore(self) -> tuple[int, list[dict[str, float]], EpochSums | None, float]:
        """(step, history, sums of a half-done epoch, seconds spent) of the last checkpoint, or a fresh start."""
        state = self.ckpt.load() if self.ckpt is not None else None
        step = state["step"] if state is not None else 0
        total, squares = distributed.all_reduce_sum([step, step * step])
        if squares * distributed.current().world_size != total * total:  # the ranks' steps are not all equal
            raise RuntimeError(f"ranks resumed {self.ckpt.path if self.ckpt else ''} at different steps; "
                               "is resume_dir shared by all ranks?")
        if state is None:
            return 0, [], None, 0.0
        self.best.load_state(state["best"])
        if self.ema is not None:
            self.ema.load_state(state["ema"])
        partial = None
        if state["partial"]:  # summed over the ranks when saved: rank 0 carries them on
            partial = EpochSums(**state["partial"]) if distributed.is_main() else EpochSums()
        return step, list(state["history"]), partial, float(state["seconds"])

    def save(self, step: int, history: list, partial: EpochSums | None, seconds: float) -> None:
        """Checkpoint after ``step``; called on every rank (``partial`` is reduced), rank 0 writes."""
        if self.ckpt is not None:
            partial = partial.reduced() if partial is not None else None
            self.ckpt.save(step, history=history, best=self.best.state(), seconds=seconds,
                           ema=self.ema.state() if self.ema is not None else None,
                           partial=dataclasses.asdict(partial) if partial is not None else None)

    def due(self, step: int) -> bool:
        return self.ckpt is not None and self.every is not None and step % self.every == 0


@dataclass
class _Stepper:
    """One optimizer step of :func:`fit`, and one pass over part of an epoch."""

    model: nn.Module
    net: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mode: TrainMode
    ema: ModelEMA | None
    cfg: LoopConfig
    device: torch.device
    desc: str
    params: list[nn.Parameter] = field(init=False, repr=False)
    guard: QuantizerGuard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.guard = QuantizerGuard(self.model)

    def step(self, batch: Any, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (0-based, global) on one batch; the batch's sums.

        The loss and every quantizer parameter (as the previous update left it, and as this
        forward initialised it) are checked for NaN / inf in one host sync, before the backward.
        """
        self.mode.on_step(self.model, step)
        loss, sums = self.objective(self.net, batch, self.device)
        finite = torch.isfinite(loss.detach()).all()
        quantizers = self.guard.finite()
        if not bool(finite if quantizers is None else finite & quantizers):
            self.guard.check(f"{self.desc} step {step}", hint=_DIVERGED, scales=True)  # names the quantizer
            raise FloatingPointError(f"{self.desc}: the loss became {float(loss)} at step {step}; "
                                     "lower the recipe's lr (train.*.lr) or set train.*.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.net is not self.model:  # data-parallel: observers from the global batch, rank 0's BN statistics
            distributed.sync_quantizers(self.model)
            distributed.broadcast_buffers(self.model)
        if self.ema is not None:
            self.ema.update(self.model)
        return sums

    def epoch(self, loader: Iterable, first: int, end: int, sums: EpochSums | None, label: str,
              after_step: Callable[[int, EpochSums], None]) -> EpochSums:
        """Steps ``first`` to ``end`` (exclusive) from ``loader``; ``sums`` carries a resumed epoch's.

        A ``None`` batch (every image of it skipped as corrupt) is passed over without a step.
        """
        sums = EpochSums() if sums is None else sums
        self.mode.train(self.model)
        step = first
        bar = progress(loader, label, total=end - first)
        for batch in bar:
            if batch is None:
                continue
            sums.add(self.step(batch, step))
            step += 1
            after_step(step, sums)
            if step >= end:
                break
        if hasattr(bar, "close"):
            bar.close()
        self.guard.check(f"{self.desc} after step {step - 1}", hint=_DIVERGED)  # the epoch's last update
        return sums

    def validate(self, validate: Validate, best: BestCheckpoint, monitor: str) -> tuple[dict[str, float], bool]:
        """``validate`` of the EMA (or the model) on every rank; whether it is the best so far."""
        target = self.ema.module if self.ema is not None else self.model
        self.mode.eval(target)
        val = dict(validate(target))
        if monitor not in val:
            raise KeyError(f"validation returned {sorted(val)}, without the monitored metric {monitor!r}")
        return val, best.update(val[monitor], target)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    cfg: LoopConfig,
    *,
    objective: Objective,
    validate: Validate,
    monitor: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    mode: TrainMode,
    device: torch.device,
    desc: str = "train",
) -> TrainResult:
    """Train for ``cfg.epochs`` (or ``cfg.steps``); validate every ``cfg.eval_every`` epochs and keep the best.

    Args:
        model: The model (an nn.Module or a fake-quant GraphModule); trained in place.
        train_loader: Training batches; a seeded loader (``sampler.set_epoch``) makes resuming exact.
        cfg: The recipe.
        objective: The task's loss and per-batch sums.
        validate: ``model -> metrics``, on every rank, the model in eval mode.
        monitor: The metric of ``validate`` whose best value is kept (higher is better).
        optimizer, scheduler: From :mod:`quantbench.training.optim` (the scheduler steps per optimizer step).
        mode: How the model switches between training and evaluation, and its freeze points.
        device: Where training runs.
        desc: Label of progress bars, log lines and the checkpoint fingerprint.

    Returns:
        The model on the device it came in on, in eval mode and contiguous
        format, with the best weights loaded (``cfg.keep_best``; the EMA's
        when ``cfg.ema``), and one history row per epoch.
    """
    start, home = time.perf_counter(), _device_of(model)
    spe = steps_per_epoch(train_loader)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe) if spe else 0
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    net = distributed.wrap_ddp(model, device)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
    best = BestCheckpoint(cfg.keep_best, cfg.checkpoint_dir)
    stepper = _Stepper(model, net, objective, optimizer, scheduler, mode, ema, cfg, device, desc)
    torch.manual_seed(cfg.seed)  # dropout draws from the global generator (augmentation is seeded per sample)
    resume = _Resume(cfg, model, optimizer, scheduler, best, ema, desc)
    step, history, partial, spent = resume.restore()
    start -= spent
    while spe and step < total:
        epoch, end = step // spe + 1, min((step // spe + 1) * spe, total)

        def checkpoint(at: int, sums: EpochSums, end: int = end) -> None:
            if at < end and resume.due(at):  # the epoch's last step is saved after its validation
                resume.save(at, history, sums, time.perf_counter() - start)

        sums = stepper.epoch(start_epoch(train_loader, epoch, step % spe), step, end, partial,
                             f"{desc} {epoch}", checkpoint)
        step, partial = end, None
        row = {"epoch": epoch, "step": step,
               **{f"train_{k}": v for k, v in objective.summarize(sums.reduced().sums).items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        summary = f"loss {row.get('train_loss', float('nan')):.4f}"
        if epoch % cfg.eval_every == 0 or epoch == epochs:
            val, improved = stepper.validate(validate, best, monitor)
            row.update({f"val_{k}": v for k, v in val.items()})
            summary += f", val {monitor} {val[monitor]:.4f}" + (" (best)" if improved else "")
        if net is not model and distributed.quantizer_state(model).numel():
            row["ddp_quantizer_spread"] = distributed.quantizer_spread(model)
        history.append(row)
        resume.save(step, history, None, time.perf_counter() - start)
        log.info("%s epoch %d/%d: %s", desc, epoch, epochs, summary)
    if ema is not None and best.best is None:  # no best kept (keep_best=none): return the average
        model.load_state_dict(ema.module.state_dict())
    best.restore(model)
    mode.eval(model)
    model.to(device=home, memory_format=torch.contiguous_format)
    return TrainResult(model=model, history=history, best_metric=best.best, seconds=time.perf_counter() - start)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
