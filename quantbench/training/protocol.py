"""The contract between the harness and a task adapter.

A task adapter (``tasks/``) is the only place that knows data sets, models and
metrics. The harness only sequences and records: it builds an adapter from
``_target_`` in ``conf/task/*.yaml`` and talks to it through this protocol.

``evaluate`` takes a *predict function* (a batch of inputs -> raw model
outputs), so one metric code path serves the float model, the fake-quant
GraphModule and an onnxruntime session alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Tuple, Union, runtime_checkable

import torch

__all__ = ["PredictFn", "TaskAdapter", "TrainResult"]

#: Input batch -> raw outputs: one tensor (a classifier's logits) or a tuple (a detector's raw heads).
PredictFn = Callable[[torch.Tensor], Union[torch.Tensor, Tuple[torch.Tensor, ...]]]


@dataclass
class TrainResult:
    """What a training loop returns: the model to use (best checkpoint loaded)
    and the history of per-epoch metrics."""

    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    seconds: float = 0.0


@runtime_checkable
class TaskAdapter(Protocol):
    """What every task (classification, detection) provides to the harness.

    Errors follow :mod:`quantbench.errors`: a missing data set raises
    ``DataNotFoundError``, an undecodable file ``CorruptDataError``, missing
    weights ``WeightsNotFoundError``; the harness maps them by type.
    """

    name: str
    primary_metric: str  # e.g. "top1" or "map50_95"

    def load_data(self) -> None:
        """Open the data set (writing a generated one if it is missing); a missing set raises now."""

    def build_model(self) -> torch.nn.Module:
        """The float model, pretrained or from the cached float baseline (trained once)."""

    def baseline_key(self) -> dict[str, Any]:
        """What determines the trained float baseline (its cache key payload)."""

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """An example batch (batch >= 2) for capture and ONNX export."""

    def calib_loader(self) -> Iterable[Any]:
        """Calibration batches (inputs, or (inputs, targets) pairs)."""

    def evaluate(self, predict: PredictFn, *, desc: str = "eval") -> dict[str, float]:
        """Metrics over the validation set, keys without prefix ("top1", "top5")."""

    def train(self, model: torch.nn.Module, recipe: Any, *, qat: bool) -> TrainResult:
        """Float-baseline or QAT training with the given recipe."""

    # Optional: ``train_batches(recipe, *, qat) -> Iterable[(inputs, class labels)]``, one epoch of what
    # ``train`` would train on, for a peer engine that trains in its own process (``harness/engines.py``).
