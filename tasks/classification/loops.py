"""Training, evaluation and calibration loops (torchvision ``references/`` style).

``evaluate`` takes a *predict function* (input batch -> logits), so the float
model, the fake-quant GraphModule and an onnxruntime session are scored by the
same top-1/top-5 code. ``fit`` is the one training loop for the float baseline
and for QAT; what differs between them (optimizer param groups, how the model
switches between train and eval, observer/BN freeze points) is supplied by a
:class:`TrainMode` and built in :mod:`tasks.classification.recipes`. Progress
bars are the engine's one helper (quiet under ``CI=true``, without a TTY, and on
torchrun ranks other than 0).

Under torchrun, ``fit`` trains through DistributedDataParallel on each rank's
share of the data, keeps fake-quant observers in agreement after every step
and reduces every metric over the ranks (:mod:`quantbench.harness.distributed`).
With ``resume_dir`` set it checkpoints each epoch (and every
``checkpoint_steps``) and a rerun carries on from the last checkpoint, to the
same weights as an uninterrupted run (:mod:`quantbench.harness.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from quantbench.engine.progress import progress
from quantbench.harness import distributed
from quantbench.harness.checkpoint import TrainingCheckpoint
from quantbench.harness.protocol import PredictFn, TrainResult
from tasks.classification.config import LoopConfig

__all__ = [
    "BestCheckpoint",
    "CalibrationBatches",
    "EpochStats",
    "TrainMode",
    "evaluate",
    "fit",
    "start_epoch",
    "topk_correct",
    "train_one_epoch",
]

log = logging.getLogger(__name__)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """How many rows have the target among their k highest logits, for each k.

    A k above the number of classes counts as the number of classes (top-5 of
    a 3-way problem is top-3), so small test tasks stay well defined.
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def _as_logits(output: Any) -> torch.Tensor:
    """Logits as a float CPU tensor, whatever the predict function returned (tensor, array, tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    return torch.as_tensor(output).detach().float().cpu()


def evaluate(
    predict: PredictFn,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    topk: Sequence[int] = (1, 5),
    device: torch.device | str = "cpu",
    desc: str = "eval",
) -> dict[str, float]:
    """Top-k accuracy (percent) of ``predict`` over ``loader``; keys ``top1``, ``top5``.

    Args:
        predict: Input batch -> logits. A model, ``lambda x: gm(x)``, or an
            onnxruntime predict function; it is called under ``no_grad`` and
            is responsible for its own mode (eval/observers off).
        loader: ``(inputs, targets)`` batches.
        topk: Which k to report.
        device: Where the input batches are moved before ``predict``.
        desc: Progress-bar label.
    """
    correct = [0] * len(topk)
    seen = 0
    with torch.no_grad():
        for batch in progress(loader, desc, total=_len(loader)):
            if batch is None:  # every image of the batch was skipped as corrupt
                continue
            inputs, target = batch
            logits = _as_logits(predict(inputs.to(device)))
            for i, hits in enumerate(topk_correct(logits, target, topk)):
                correct[i] += hits
            seen += len(target)
    if _sharded(loader):  # this rank saw its share of the set: sum the counts over all ranks
        *correct, seen = distributed.all_reduce_sum([*correct, seen])
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {f"top{k}": 100.0 * c / seen for k, c in zip(topk, correct)}


def _sharded(loader: Any) -> bool:
    return getattr(getattr(loader, "sampler", None), "world_size", 1) > 1


def _len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


class CalibrationBatches:
    """Re-iterable input batches for calibration, with a progress bar.

    Yields only the input tensors (targets dropped); the engine accepts either.
    """

    def __init__(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], desc: str = "calibrate") -> None:
        self.loader = loader
        self.desc = desc

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in progress(self.loader, self.desc, total=_len(self.loader)):
            if batch is not None:
                yield batch[0]


class TrainMode(Protocol):
    """How a model is trained: float (``.train()``) or QAT (the engine's ``qat`` API)."""

    def train(self, model: nn.Module) -> None:
        """Put ``model`` in training mode."""

    def eval(self, model: nn.Module) -> None:
        """Put ``model`` in evaluation mode."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called before optimizer step ``step`` (0-based, global): freeze points."""


class BestCheckpoint:
    """Keeps the weights of the best validation score, in memory or on disk.

    Why: QAT curves are noisy (REFERENCES.md keeps the best checkpoint by val
    accuracy) and the last epoch is not always the best.
    """

    def __init__(self, keep: str = "memory", directory: str | os.PathLike | None = None) -> None:
        self.keep = keep
        self.best: float | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._own_dir = keep == "disk" and directory is None
        self._dir = Path(tempfile.mkdtemp(prefix="qb-best-")) if self._own_dir else Path(directory or ".")
        self.path = self._dir / "best.pt"

    def update(self, score: float, model: nn.Module) -> bool:
        """Save ``model`` if ``score`` beats the best so far; True when it did."""
        if self.keep == "none" or (self.best is not None and score <= self.best):
            return False
        self.best = score
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.keep == "disk":
            self._dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.path)
        else:
            self._state = state
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the best weights back into ``model`` (no-op when nothing was kept)."""
        if self.keep == "disk" and self.best is not None:
            model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        elif self._state is not None:
            model.load_state_dict(self._state)
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def state(self) -> dict[str, Any]:
        """The best score and weights as plain data (for a resumable checkpoint)."""
        weights = self._state
        if self.keep == "disk" and self.best is not None:
            weights = torch.load(self.path, map_location="cpu", weights_only=True)
        return {"best": self.best, "weights": weights}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over what :meth:`state` returned (a resumed run)."""
        self.best = state["best"]
        if state["weights"] is None:
            return
        if self.keep == "disk":
            self._dir.mkdir(parents=True, exist_ok=True)
            torch.save(state["weights"], self.path)
        else:
            self._state = state["weights"]


@dataclass
class EpochStats:
    """Running sums of one epoch on this rank (kept in a mid-epoch checkpoint)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0

    def summary(self) -> dict[str, float]:
        """Loss and top-1 over every rank's share of the epoch, and the epoch's optimizer steps."""
        loss_sum, correct, seen = distributed.all_reduce_sum([self.loss_sum, self.correct, self.seen])
        return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * correct / max(seen, 1), "steps": self.steps}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mode: TrainMode,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    first_step: int = 0,
    max_steps: int | None = None,
    channels_last: bool = False,
    desc: str = "train",
    net: nn.Module | None = None,
    stats: EpochStats | None = None,
    after_step: Callable[[int, EpochStats], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (or ``max_steps`` batches); returns loss, top1, steps.

    The scheduler steps per optimizer step, so ``steps``-based recipes and
    decays "every N steps" (REFERENCES.md) are exact. ``net`` is what the
    forward runs through (a DDP wrapper of ``model``); modes and freeze points
    act on ``model``. ``stats`` carries the sums of a resumed epoch;
    ``after_step(global_step, stats)`` runs after every optimizer step.
    """
    net = model if net is None else net
    stats = EpochStats() if stats is None else stats
    mode.train(model)
    done = 0
    total = min(_len(loader) or 0, max_steps) if max_steps is not None else _len(loader)
    bar = progress(loader, desc, total=total)
    for batch in bar:
        if max_steps is not None and done >= max_steps:
            break
        if batch is None:  # every image of the batch was skipped as corrupt
            continue
        inputs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        mode.on_step(model, first_step + done)
        logits = net(inputs)
        loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if net is not model:  # data-parallel: every rank's static scales from the global batch's ranges
            distributed.sync_quantizers(model)
        done += 1
        stats.steps += 1
        stats.loss_sum += float(loss.detach()) * len(target)
        stats.correct += int((logits.argmax(1) == target).sum())
        stats.seen += len(target)
        if done % 10 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{stats.loss_sum / stats.seen:.3f}")
        if after_step is not None:
            after_step(first_step + done, stats)
    if hasattr(bar, "close"):
        bar.close()
    return stats.summary()


def start_epoch(loader: Any, epoch: int, skip_batches: int) -> Iterable:
    """The loader positioned at batch ``skip_batches`` of ``epoch`` (seeded samplers skip without loading)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        if skip_batches and getattr(loader, "batch_size", None):
            sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
            return loader
        sampler.set_epoch(epoch)
    return itertools.islice(loader, skip_batches, None) if skip_batches else loader


class _Resume:
    """``fit``'s checkpoints: each epoch end and every ``checkpoint_steps``; a no-op without ``resume_dir``."""

    def __init__(self, cfg: LoopConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, best: BestCheckpoint, desc: str) -> None:
        recipe = {k: v for k, v in dataclasses.asdict(cfg).items()
                  if k not in ("resume_dir", "checkpoint_dir", "checkpoint_steps")}
        fingerprint = {"recipe": recipe, "world_size": distributed.current().world_size, "loop": desc}
        self.ckpt = (TrainingCheckpoint(cfg.resume_dir, model, optimizer, scheduler, fingerprint=fingerprint)
                     if cfg.resume_dir else None)
        self.every, self.best = cfg.checkpoint_steps, best

    def restore(self) -> tuple[int, list[dict[str, float]], EpochStats | None, float]:
        """(step, history, sums of a half-done epoch, seconds spent) of the last checkpoint, or a fresh start."""
        state = self.ckpt.load() if self.ckpt is not None else None
        if state is None:
            return 0, [], None, 0.0
        self.best.load_state(state["best"])
        partial = EpochStats(**state["partial"]) if state["partial"] else None
        return state["step"], list(state["history"]), partial, float(state["seconds"])

    def save(self, step: int, history: list, partial: EpochStats | None, seconds: float) -> None:
        if self.ckpt is not None:
            self.ckpt.save(step, history=history, best=self.best.state(), seconds=seconds,
                           partial=dataclasses.asdict(partial) if partial is not None else None)

    def due(self, step: int) -> bool:
        return self.ckpt is not None and self.every is not None and step % self.every == 0


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: LoopConfig,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mode: TrainMode,
    device: torch.device,
    desc: str = "train",
) -> TrainResult:
    """Train for ``cfg.epochs`` (or ``cfg.steps``), evaluate each epoch, keep the best.

    The model comes back on the device it came in on, with the best
    checkpoint loaded (``cfg.keep_best``), in eval mode and contiguous format.
    With ``cfg.resume_dir`` a rerun resumes from the last checkpoint there.
    """
    start, home = time.perf_counter(), _device_of(model)
    start_epoch(train_loader, 1, 0)
    spe = len(train_loader)  # type: ignore[arg-type]
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe) if spe else 0
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    net = distributed.wrap_ddp(model, device)
    best = BestCheckpoint(cfg.keep_best, cfg.checkpoint_dir)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    torch.manual_seed(cfg.seed)  # dropout draws from the global generator (augmentation is seeded per sample)
    resume = _Resume(cfg, model, optimizer, scheduler, best, desc)
    step, history, partial, spent = resume.restore()
    start -= spent
    while spe and step < total:
        epoch, offset = step // spe + 1, step % spe
        end = min(epoch * spe, total)

        def checkpoint(at: int, stats: EpochStats, end: int = end) -> None:
            if at < end and resume.due(at):  # the epoch's last step is saved after its evaluation
                resume.save(at, history, stats, time.perf_counter() - start)

        stats = train_one_epoch(
            model, start_epoch(train_loader, epoch, offset), optimizer, scheduler, mode, criterion=criterion,
            device=device, first_step=step, max_steps=end - step, channels_last=cfg.channels_last,
            desc=f"{desc} {epoch}", net=net, stats=partial, after_step=checkpoint,
        )  # fmt: skip
        step, partial = end, None
        mode.eval(model)
        val = evaluate(
            lambda x: model(x.contiguous(memory_format=memory_format)),
            val_loader,
            device=device,
            desc=f"{desc} val",
        )
        improved = best.update(val["top1"], model)
        history.append(
            {"epoch": epoch, "step": step, "train_loss": stats["loss"], "train_top1": stats["top1"],
             "val_top1": val["top1"], "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"],
             "seconds": time.perf_counter() - start}
        )  # fmt: skip
        if net is not model and distributed.quantizer_state(model).numel():
            history[-1]["ddp_quantizer_spread"] = distributed.quantizer_spread(model)
        resume.save(step, history, None, time.perf_counter() - start)
        log.info("%s epoch %d/%d: loss %.4f, val top1 %.2f top5 %.2f%s", desc, epoch, epochs, stats["loss"],
                 val["top1"], val["top5"], " (best)" if improved else "")  # fmt: skip
    best.restore(model)
    mode.eval(model)
    model.to(device=home, memory_format=torch.contiguous_format)
    return TrainResult(
        model=model, history=history, best_metric=best.best, seconds=time.perf_counter() - start
    )


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
