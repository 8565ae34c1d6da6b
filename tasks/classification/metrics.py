"""Classification metrics and training objective.

``evaluate`` takes a *predict function* (input batch -> logits), so the float
model, the fake-quant GraphModule and an onnxruntime session are scored by the
same top-1/top-5 code; under torchrun each rank scores its share of the
validation set and the counts are summed. :class:`CrossEntropyObjective` is
what this task gives the training layer's one loop
(:func:`quantbench.training.fit`): the loss of a batch and its additive sums.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from quantbench.progress import progress
from quantbench.training import PredictFn, distributed

__all__ = ["CrossEntropyObjective", "evaluate", "topk_correct"]

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


class CrossEntropyObjective:
    """Cross-entropy on logits: the loss of one batch, and its loss x samples, correct and seen counts.

    Args:
        label_smoothing: Cross-entropy label smoothing.
        channels_last: Feed channels-last inputs (the model trains in that format).
    """

    def __init__(self, label_smoothing: float = 0.0, channels_last: bool = False) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.channels_last = channels_last

    def __call__(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = net(inputs)
        loss = self.criterion(logits, target)
        sums = {"loss": float(loss.detach()) * len(target), "correct": int((logits.argmax(1) == target).sum()),
                "seen": len(target)}
        return loss, sums

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Mean loss and top-1 (percent) over the epoch's samples."""
        seen = max(sums.get("seen", 0.0), 1.0)
        return {"loss": sums.get("loss", 0.0) / seen, "top1": 100.0 * sums.get("correct", 0.0) / seen}
