"""How a model trains: float (``.train()``/``.eval()``) or QAT, with the QAT recipe's freeze points.

A torch.export GraphModule refuses ``.train()``/``.eval()``, so a fake-quant
model switches through the engine's QAT API (``train_mode``/``eval_mode``),
which also switches BatchNorm, dropout and the observers consistently.
"""

from __future__ import annotations

import logging
from typing import Protocol

from torch import nn

from quantbench.engine import qat as qat_api

__all__ = ["FloatMode", "QatMode", "TrainMode", "freeze_step"]

log = logging.getLogger(__name__)


class TrainMode(Protocol):
    """How :func:`~quantbench.training.loop.fit` switches a model between training and evaluation."""

    def train(self, model: nn.Module) -> None:
        """Put ``model`` in training mode."""

    def eval(self, model: nn.Module) -> None:
        """Put ``model`` in evaluation mode."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called before optimizer step ``step`` (0-based, global): freeze points."""


class FloatMode:
    """An ordinary nn.Module: ``.train()``/``.eval()``; nothing to freeze."""

    def train(self, model: nn.Module) -> None:
        model.train()

    def eval(self, model: nn.Module) -> None:
        model.eval()

    def on_step(self, model: nn.Module, step: int) -> None:
        return None


def freeze_step(epochs: float | None, steps_per_epoch: int) -> int | None:
    """The optimizer step at which a freeze point given in (fractional) epochs falls; ``None``: never."""
    return None if epochs is None else int(round(epochs * steps_per_epoch))


class QatMode:
    """Switches a fake-quant GraphModule through the engine and applies the QAT freeze schedule.

    Observer freezing stops range updates once the ranges have settled;
    BatchNorm freezing switches folded-BN QAT to running statistics so the
    folded weights stop moving with batch noise (Jacob et al., arXiv
    1712.05877, sec. 3.2; Krishnamoorthi, arXiv 1806.08342). Both stay frozen
    across later ``train`` calls.

    Args:
        freeze_observers_step: Optimizer step at which static observers freeze (``None``: never).
        freeze_bn_step: Optimizer step at which BatchNorm statistics freeze (``None``: never).
    """

    def __init__(self, freeze_observers_step: int | None, freeze_bn_step: int | None) -> None:
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step
        self.observers_frozen = False
        self.bn_frozen = False

    def train(self, model: nn.Module) -> None:
        qat_api.train_mode(model)
        if self.observers_frozen:
            qat_api.set_observers_frozen(model, True)
        if self.bn_frozen:
            qat_api.set_bn_frozen(model, True)

    def eval(self, model: nn.Module) -> None:
        qat_api.eval_mode(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        if not self.observers_frozen and self.freeze_observers_step is not None \
                and step >= self.freeze_observers_step:
            qat_api.set_observers_frozen(model, True)
            self.observers_frozen = True
            log.info("QAT: observers frozen at step %d", step)
        if not self.bn_frozen and self.freeze_bn_step is not None and step >= self.freeze_bn_step:
            qat_api.set_bn_frozen(model, True)
            self.bn_frozen = True
            log.info("QAT: BatchNorm statistics frozen at step %d", step)
