"""Training, evaluation and calibration loops (torchvision ``references/`` style).

``evaluate`` takes a *predict function* (input batch -> logits), so the float
model, the fake-quant GraphModule and an onnxruntime session are scored by the
same top-1/top-5 code. ``fit`` is the one training loop for the float baseline
and for QAT; what differs between them (optimizer param groups, how the model
switches between train and eval, observer/BN freeze points) is supplied by a
:class:`TrainMode` and built in :mod:`tasks.classification.recipes`. Progress
bars are the engine's one helper (quiet under ``CI=true`` or without a TTY).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from quantbench.engine.progress import progress
from quantbench.harness.protocol import PredictFn, TrainResult
from tasks.classification.config import LoopConfig

__all__ = [
    "BestCheckpoint",
    "CalibrationBatches",
    "TrainMode",
    "evaluate",
    "fit",
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
        for inputs, target in progress(loader, desc, total=_len(loader)):
            logits = _as_logits(predict(inputs.to(device)))
            for i, hits in enumerate(topk_correct(logits, target, topk)):
                correct[i] += hits
            seen += len(target)
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {f"top{k}": 100.0 * c / seen for k, c in zip(topk, correct)}


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
        for inputs, _ in progress(self.loader, self.desc, total=_len(self.loader)):
            yield inputs


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
) -> dict[str, float]:
    """One pass over ``loader`` (or ``max_steps`` batches); returns loss, top1, steps.

    The scheduler steps per optimizer step, so ``steps``-based recipes and
    decays "every N steps" (REFERENCES.md) are exact.
    """
    mode.train(model)
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    total = min(_len(loader) or 0, max_steps) if max_steps is not None else _len(loader)
    bar = progress(loader, desc, total=total)
    for inputs, target in bar:
        if max_steps is not None and steps >= max_steps:
            break
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        mode.on_step(model, first_step + steps)
        logits = model(inputs)
        loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        loss_sum += float(loss.detach()) * len(target)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(target)
        if steps % 10 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    if hasattr(bar, "close"):
        bar.close()
    return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * correct / max(seen, 1), "steps": steps}


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
    """
    start, home = time.perf_counter(), _device_of(model)
    spe = len(train_loader)  # type: ignore[arg-type]
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    epochs = math.ceil(total / spe) if spe else 0
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    best = BestCheckpoint(cfg.keep_best, cfg.checkpoint_dir)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history: list[dict[str, float]] = []
    torch.manual_seed(cfg.seed)  # augmentation draws from the global generator
    for epoch in range(1, epochs + 1):
        step = int(history[-1]["step"]) if history else 0
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, mode, criterion=criterion, device=device,
            first_step=step, max_steps=total - step, channels_last=cfg.channels_last, desc=f"{desc} {epoch}",
        )  # fmt: skip
        mode.eval(model)
        val = evaluate(
            lambda x: model(x.contiguous(memory_format=memory_format)),
            val_loader,
            device=device,
            desc=f"{desc} val",
        )
        improved = best.update(val["top1"], model)
        history.append(
            {"epoch": epoch, "step": step + stats["steps"], "train_loss": stats["loss"], "train_top1": stats["top1"],
             "val_top1": val["top1"], "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"],
             "seconds": time.perf_counter() - start}
        )  # fmt: skip
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
