"""One training loop for the detector's float baseline and its QAT, resumable and data-parallel.

The loop is the classification recipes' machinery (optimizer and schedule
registries, :class:`FloatMode` / :class:`QatMode`, best-checkpoint keeping)
with a detection step: the :class:`DetectionLoss` on raw outputs, gradient
clipping, an optional weight EMA and mAP evaluation every ``eval_every``
epochs. QAT goes through the engine's QAT API only: weights and quantizer
parameters (LSQ steps, TQT thresholds) in separate param groups with their own
learning rates, observer and BatchNorm freeze points.

Under torchrun, :func:`fit_detector` trains through DistributedDataParallel
on each rank's share of the data (the task's :class:`ShardSampler` loader),
keeps fake-quant observers and rank 0's buffers (BatchNorm statistics) on
every rank after each step, so the EMA and the best checkpoint are the same
everywhere, and sums the logged train losses over the ranks. Rank 0 scores
the validation set and broadcasts the metrics, so every rank keeps the same
best checkpoint (:mod:`quantbench.harness.distributed`).

With ``resume_dir`` set it checkpoints each epoch (after its evaluation) and
every ``checkpoint_steps``: weights, optimizer, schedule, history, best
weights, the EMA and the sums of a half-done epoch. A rerun carries on from
there and, with the task's loader (data order and augmentation a function of
(seed, epoch)), ends with the same weights and history on CPU as an
uninterrupted run (:mod:`quantbench.harness.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quantbench.harness import distributed
from quantbench.harness.checkpoint import TrainingCheckpoint
from quantbench.harness.protocol import TrainResult
from tasks.classification.loops import BestCheckpoint, TrainMode, start_epoch
from tasks.classification.recipes import FloatMode, load_qat_api, make_optimizer, qat_optimizer
from tasks.detection.config import DetQatConfig, DetTrainConfig
from tasks.detection.loss import DetectionLoss

__all__ = ["ModelEMA", "fit_detector", "train_float", "train_qat"]

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], dict[str, float]]

_LOSS_KEYS = ("loss", "cls", "iou", "dfl")


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

    def state(self) -> dict[str, Any]:
        """The average and its update count as plain data (for a resumable checkpoint)."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over what :meth:`state` returned (a resumed run)."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


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


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank, one collective per dtype; a no-op in a single process.

    Why: DDP broadcasts rank 0's buffers before each forward, but the forward
    then updates BatchNorm statistics from the rank's own batch, so between
    steps the ranks' buffers differ; the EMA, evaluation and checkpoints must
    see one model.
    """
    if not distributed.current().distributed:
        return
    buffers = list(model.buffers())
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        wire = flat.to(torch.uint8) if dtype == torch.bool else flat  # gloo has no bool
        dist.broadcast(wire, src=0)
        for b, chunk in zip(group, wire.to(dtype).split([b.numel() for b in group])):
            b.data.copy_(chunk.view_as(b))


@dataclass
class _EpochSums:
    """Running loss sums of one epoch on this rank (kept in a mid-epoch checkpoint)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_LOSS_KEYS, 0.0))
    batches: int = 0

    def add(self, loss: float, parts: dict[str, float]) -> None:
        self.batches += 1
        self.sums["loss"] += loss
        for k, v in parts.items():
            self.sums[k] += v

    def reduced(self) -> _EpochSums:
        """The sums over every rank (what a checkpoint keeps; after a resume rank 0 carries them on)."""
        *sums, batches = distributed.all_reduce_sum([*(self.sums[k] for k in _LOSS_KEYS), self.batches])
        return _EpochSums(dict(zip(_LOSS_KEYS, sums)), int(batches))

    def summary(self) -> dict[str, float]:
        """Mean batch losses over every rank's share of the epoch (``train_loss``, ``train_cls``, ...)."""
        total = self.reduced()
        return {f"train_{k}": total.sums[k] / max(total.batches, 1) for k in _LOSS_KEYS}


class _Resume:
    """The loop's checkpoints: each epoch end and every ``checkpoint_steps``; a no-op without ``resume_dir``."""

    def __init__(self, cfg: DetTrainConfig | DetQatConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, best: BestCheckpoint, ema: ModelEMA | None, desc: str) -> None:
        where = ("resume_dir", "checkpoint_dir", "checkpoint_steps")  # where and how often: not the run
        recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in where}
        fingerprint = {"recipe": recipe, "world_size": distributed.current().world_size, "loop": f"detection {desc}"}
        self.ckpt = (TrainingCheckpoint(cfg.resume_dir, model, optimizer, scheduler, fingerprint=fingerprint)
                     if cfg.resume_dir else None)
        self.every, self.best, self.ema = cfg.checkpoint_steps, best, ema

    def restore(self) -> tuple[int, list[dict[str, float]], _EpochSums | None, float]:
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
            partial = _EpochSums(**state["partial"]) if distributed.is_main() else _EpochSums()
        return step, list(state["history"]), partial, float(state["seconds"])

    def save(self, step: int, history: list, partial: _EpochSums | None, seconds: float) -> None:
        """Checkpoint after ``step``; called on every rank (``partial`` is reduced), rank 0 writes."""
        if self.ckpt is not None:
            partial = partial.reduced() if partial is not None else None
            self.ckpt.save(step, history=history, best=self.best.state(), seconds=seconds,
                           ema=self.ema.state() if self.ema is not None else None,
                           partial=dataclasses.asdict(partial) if partial is not None else None)

    def due(self, step: int) -> bool:
        return self.ckpt is not None and self.every is not None and step % self.every == 0


@dataclass
class _Loop:
    """What one optimizer step and one evaluation of :func:`fit_detector` need."""

    model: nn.Module
    net: nn.Module
    loss_fn: DetectionLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mode: TrainMode
    ema: ModelEMA | None
    cfg: DetTrainConfig | DetQatConfig
    device: torch.device
    desc: str
    params: list[nn.Parameter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, images: torch.Tensor, targets: list[dict], step: int) -> tuple[float, dict[str, float]]:
        """Optimizer step ``step`` (0-based, global) on one batch; its loss and loss parts."""
        self.mode.on_step(self.model, step)
        outputs = self.net(images.to(self.device, non_blocking=True))
        loss, parts = self.loss_fn(outputs, _to_device(targets, self.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: the loss became {float(loss)} at step {step}; lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.net is not self.model:  # data-parallel: observers from the global batch, rank 0's BN statistics
            distributed.sync_quantizers(self.model)
            _broadcast_buffers(self.model)
        if self.ema is not None:
            self.ema.update(self.model)
        return float(loss.detach()), parts

    def train_epoch(self, loader: Iterable, first: int, end: int, sums: _EpochSums | None,
                    after_step: Callable[[int, _EpochSums], None]) -> _EpochSums:
        """Steps ``first`` to ``end`` (exclusive) from ``loader``; ``sums`` carries a resumed epoch's."""
        sums = _EpochSums() if sums is None else sums
        self.mode.train(self.model)
        step = first
        for images, targets in itertools.islice(loader, end - first):
            loss, parts = self.step(images, targets, step)
            step += 1
            sums.add(loss, parts)
            after_step(step, sums)
        return sums

    def validate(self, evaluate: Evaluate, best: BestCheckpoint) -> tuple[dict[str, float], bool]:
        """Rank 0's ``evaluate`` of the EMA (or the model), on every rank; whether it is the best so far."""
        target = self.ema.module if self.ema is not None else self.model
        self.mode.eval(target)
        val = distributed.broadcast_object(evaluate(target) if distributed.is_main() else None)
        return val, best.update(val["map50_95"], target)


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

    ``evaluate(model) -> {"map50_95", "map50"}`` is called on rank 0 with the
    model in eval mode (the EMA copy when ``cfg.ema``). The model comes back on
    the CPU/device it came in on, with the best weights loaded, in eval mode.
    With ``cfg.resume_dir`` a rerun resumes from the last checkpoint there.
    """
    start = time.perf_counter()
    home = next(iter(model.parameters())).device
    start_epoch(train_loader, 1, 0)
    spe = len(train_loader)  # type: ignore[arg-type]
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe) if spe else 0
    model.to(device)
    net = distributed.wrap_ddp(model, device)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
    best = BestCheckpoint(cfg.keep_best, cfg.checkpoint_dir)
    loop = _Loop(model, net, loss_fn, optimizer, scheduler, mode, ema, cfg, device, desc)
    torch.manual_seed(cfg.seed)  # augmentation is seeded per sample and epoch; this covers anything else
    resume = _Resume(cfg, model, optimizer, scheduler, best, ema, desc)
    step, history, partial, spent = resume.restore()
    start -= spent
    while spe and step < total:
        epoch, end = step // spe + 1, min((step // spe + 1) * spe, total)

        def checkpoint(at: int, sums: _EpochSums, end: int = end) -> None:
            if at < end and resume.due(at):  # the epoch's last step is saved after its evaluation
                resume.save(at, history, sums, time.perf_counter() - start)

        sums = loop.train_epoch(start_epoch(train_loader, epoch, step % spe), step, end, partial, checkpoint)
        step, partial = end, None
        row = {"epoch": epoch, "step": step, **sums.summary(), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - start}
        if epoch % max(1, cfg.eval_every) == 0 or epoch == epochs:
            val, improved = loop.validate(evaluate, best)
            row.update({f"val_{k}": v for k, v in val.items()})
            log.info("%s epoch %d/%d: loss %.3f, val mAP %.4f (mAP50 %.4f)%s", desc, epoch, epochs,
                     row["train_loss"], val["map50_95"], val["map50"], " (best)" if improved else "")
        else:
            log.info("%s epoch %d/%d: loss %.3f", desc, epoch, epochs, row["train_loss"])
        if net is not model and distributed.quantizer_state(model).numel():
            row["ddp_quantizer_spread"] = distributed.quantizer_spread(model)
        history.append(row)
        resume.save(step, history, None, time.perf_counter() - start)
    if ema is not None and best.best is None:  # no best kept (keep_best=none): return the average
        model.load_state_dict(ema.module.state_dict())
    best.restore(model)
    mode.eval(model)
    model.to(home)
    return TrainResult(model=model, history=history, best_metric=best.best, seconds=time.perf_counter() - start)


def _steps_per_epoch(loader: Any) -> int:
    start_epoch(loader, 1, 0)  # a loader left part-way through a resumed epoch counts its whole epoch
    return len(loader)


def train_float(
    model: nn.Module, train_loader: Iterable, evaluate: Evaluate, loss_fn: DetectionLoss, cfg: DetTrainConfig,
    device: torch.device,
) -> TrainResult:
    """The float baseline: decayed conv weights and undecayed BN/bias in two groups, EMA on by default."""
    model.to(device)
    optimizer, scheduler = make_optimizer(_decay_groups(model, cfg), cfg, _steps_per_epoch(train_loader))
    return fit_detector(model, train_loader, evaluate, loss_fn, cfg, optimizer=optimizer, scheduler=scheduler,
                        mode=FloatMode(), device=device, desc="float")


def train_qat(
    model: nn.Module, train_loader: Iterable, evaluate: Evaluate, loss_fn: DetectionLoss, cfg: DetQatConfig,
    device: torch.device,
) -> TrainResult:
    """QAT of the engine's fake-quant GraphModule: weights and quantizer parameters at their own rates."""
    api = load_qat_api()
    model.to(device)
    optimizer, scheduler, mode = qat_optimizer(api, model, cfg, _steps_per_epoch(train_loader))
    return fit_detector(model, train_loader, evaluate, loss_fn, cfg, optimizer=optimizer, scheduler=scheduler,
                        mode=mode, device=device, desc="qat")
