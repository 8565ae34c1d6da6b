"""The contract between the harness and a task adapter.

A task adapter (``tasks/``) is the only place that knows datasets, models and
metrics. The harness only sequences and records; it reaches an adapter through
``_target_`` in ``conf/task/*.yaml`` and talks to it through this protocol.

``evaluate`` takes a *predict function* (a batch of inputs -> raw model
outputs), so one metric code path serves the float model, the fake-quant
GraphModule and an onnxruntime session alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Tuple, Union, runtime_checkable

import torch

__all__ = ["CorruptDataError", "DataNotFoundError", "PredictFn", "TaskAdapter", "TrainResult"]

#: Input batch -> raw outputs: one tensor (a classifier's logits) or a tuple (a detector's raw heads).
PredictFn = Callable[[torch.Tensor], Union[torch.Tensor, Tuple[torch.Tensor, ...]]]


class DataNotFoundError(FileNotFoundError):
    """A task's data set is missing; the harness stops with exit status 2.

    The message is one line, printed as is: it says that the data was not
    found, where it was looked for, and how to get it. Tasks may raise this
    class or their own class of the same name: the harness matches the name
    (it never imports a task).
    """


class CorruptDataError(ValueError):
    """A file of the data set does not decode and the task's policy is to fail.

    Like :class:`DataNotFoundError`, it concerns every run of the task, so the
    harness records the run as FAILED and stops with exit status 2; the
    one-line message names the file and the setting that skips such files.
    Matched by name, as above.
    """


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
    """What every task (classification, detection) provides to the harness."""

    name: str
    primary_metric: str  # e.g. "top1" or "map50_95"

    def build_model(self) -> torch.nn.Module:
        """The float model, pretrained or from the cached float baseline (trained once)."""

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """An example batch (batch >= 2) for capture and ONNX export."""

    def calib_loader(self) -> Iterable[Any]:
        """Calibration batches (inputs, or (inputs, targets) pairs)."""

    def evaluate(self, predict: PredictFn, *, desc: str = "eval") -> dict[str, float]:
        """Metrics over the validation set, keys without prefix ("top1", "top5")."""

    def train(self, model: torch.nn.Module, recipe: Any, *, qat: bool) -> TrainResult:
        """Float-baseline or QAT training with the given recipe."""
