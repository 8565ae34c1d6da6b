"""Mode switches of a quantized GraphModule's quantizers, as context managers.

Every context manager restores the previous state in ``finally``; there are no
global flags. Observers are switched for training by :mod:`quantbench.engine.qat`
(:func:`~quantbench.engine.qat.set_observers_frozen`,
:func:`~quantbench.engine.qat.freeze_observers`), which knows the train / eval
mode of a QAT graph; this module only sets the flags of calibration.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase

__all__ = [
    "fake_quantizers",
    "calibration_mode",
    "set_fake_quant",
    "disable_fake_quant",
]


def fake_quantizers(model: nn.Module) -> list[FakeQuantizeBase]:
    """Every quantizer module that owns state (derived bias quantizers excluded)."""
    return [m for m in model.modules()
            if isinstance(m, FakeQuantizeBase) and not isinstance(m, DerivedBiasFakeQuantize)]


def _snapshot(model: nn.Module) -> list[tuple[FakeQuantizeBase, bool, bool]]:
    return [(m, m.observer_enabled, m.fake_quant_enabled) for m in fake_quantizers(model)]


def _restore(state: list[tuple[FakeQuantizeBase, bool, bool]]) -> None:
    for m, obs, fq in state:
        m.observer_enabled, m.fake_quant_enabled = obs, fq


def _set_observers(model: nn.Module, enabled: bool, roles: tuple[str, ...]) -> None:
    """Turn the observers of quantizers of the given roles on or off."""
    for m in fake_quantizers(model):
        if m.role in roles:
            m.observer_enabled = enabled


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn rounding to the grid on or off everywhere."""
    for m in fake_quantizers(model):
        m.fake_quant_enabled = enabled


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Activation observers record float tensors; nothing is rounded."""
    state = _snapshot(model)
    try:
        set_fake_quant(model, False)
        _set_observers(model, True, roles=("activation",))
        _set_observers(model, False, roles=("weight", "const"))
        yield model
    finally:
        _restore(state)


@contextlib.contextmanager
def disable_fake_quant(model: nn.Module) -> Iterator[nn.Module]:
    """Run the quantized graph in float, for debugging (observers untouched)."""
    state = _snapshot(model)
    try:
        set_fake_quant(model, False)
        yield model
    finally:
        _restore(state)
