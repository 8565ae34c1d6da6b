"""Mode switches of a quantized GraphModule, as context managers and setters.

Every context manager restores the previous state in ``finally``; there are no
global flags. The setters are for a training loop that switches once for the
rest of training (e.g. freeze observers after N epochs).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase

__all__ = [
    "fake_quantizers",
    "calibration_mode",
    "set_observers",
    "set_fake_quant",
    "freeze_observers",
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


def set_observers(model: nn.Module, enabled: bool, *, roles: tuple[str, ...] | None = None) -> None:
    """Turn observers on or off (all, or only quantizers of the given roles)."""
    for m in fake_quantizers(model):
        if roles is None or m.role in roles:
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
        set_observers(model, True, roles=("activation",))
        set_observers(model, False, roles=("weight", "const"))
        yield model
    finally:
        _restore(state)


@contextlib.contextmanager
def freeze_observers(model: nn.Module) -> Iterator[nn.Module]:
    """Scales stay fixed inside the block (static QAT after its observer-freeze point)."""
    state = _snapshot(model)
    try:
        set_observers(model, False)
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
