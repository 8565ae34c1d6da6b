"""The engine's exceptions, in one leaf module that every engine layer can import.

A *bad input* (a spec or config value that cannot work, a model torch.export
cannot capture, a wrong argument at the public API, calibration batches that do
not fit) is a :class:`quantbench.errors.BadInputError`: one line, exit status 2
at the command line. A graph that cannot be aligned to a hardware target or
exported keeps its ``RuntimeError`` type (a traceback, status 1)::

    QuantizationError (RuntimeError)   the model cannot be quantized as asked
    ├── CalibrationError (BadInputError)  a calibration loader or batch that does not fit the captured model
    └── HardwareError                  a graph cannot be aligned to a hardware target
    CaptureError (BadInputError)       torch.export cannot capture the model, or an API that needs
                                       the captured graph (or example tensors) got something else
    ExportError (RuntimeError)         the graph cannot be exported to ONNX exactly
    NonFiniteError (ValueError)        calibration data produced NaN / inf
    SpecError (ConfigError, ValueError)   an invalid QuantizationSpec / QuantizationConfig / Config field

Unknown registry names raise :class:`quantbench.registry.UnknownNameError`
(also a ``ConfigError``). This module imports nothing of the engine, and torch
only inside the two argument checks every public entry point shares
(:func:`require_graph`, :func:`example_tuple`), so a config check stays torch-free.
"""

from __future__ import annotations

from typing import Any

from quantbench.errors import BadInputError, ConfigError

__all__ = [
    "CalibrationError",
    "CaptureError",
    "ExportError",
    "HardwareError",
    "NonFiniteError",
    "QuantizationError",
    "SpecError",
    "example_tuple",
    "require_graph",
]


class QuantizationError(RuntimeError):
    """The model cannot be quantized as asked; the message says why and what to do."""


class CalibrationError(QuantizationError, BadInputError):
    """A calibration batch does not fit the captured model (a bad input: one line, exit 2)."""


class HardwareError(QuantizationError):
    """A graph cannot be aligned to a hardware target; the message names the quantizer and the fix."""


class CaptureError(BadInputError):
    """The model could not be captured by torch.export, or an API that needs a captured graph got
    something else; the message names the construct (a bad input: one line, exit 2). A failed
    capture keeps what torch printed in ``graph_dump``."""

    graph_dump: str = ""


class ExportError(RuntimeError):
    """The graph cannot be exported to ONNX exactly; the message names the node and the fix."""


class NonFiniteError(BadInputError, ValueError):
    """A NaN or inf where a finite number must be: in calibration data (the message names the
    observer's node), in a quantizer's scale after a QAT step (it names the quantizer and the
    hyper-parameters to lower), or in a scale that freeze / export would bake. A bad input: the
    data or the training recipe, not the engine."""


class SpecError(ConfigError):
    """An invalid quantization spec or config (a bad input); the message names the field.

    A :class:`~quantbench.errors.ConfigError`, hence also a ``ValueError``.
    """


def _a(value: Any) -> str:
    """``value``'s type with its article, for messages: "a dict", "an int", "None"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


_CAPTURED = "the GraphModule that quantbench.engine.capture returns"
_QUANTIZED = "the GraphModule that ModelQuantizer.quantize_model returns"


def require_graph(value: Any, api: str, *, quantized: bool = False) -> None:
    """Refuse anything but a ``torch.fx.GraphModule`` in one line naming ``api`` and how to get one.

    ``quantized``: ``api`` works on the output of ``quantize_model`` (``freeze``, ``coverage``, the QAT
    switches), not on the captured graph itself.
    """
    from torch import fx, nn  # lazily: this module is imported by config checks that must not load torch

    if isinstance(value, fx.GraphModule):
        return
    needs = f"{api} needs {_QUANTIZED if quantized else _CAPTURED}"
    steps = "gm = capture(model, (example_batch,))" + ("; qmodel = quantizer.quantize_model(gm, calib)"
                                                         if quantized else ", then quantize gm")
    if type(value).__name__ == "ExportedProgram":
        raise CaptureError(f"{needs}, got a torch.export ExportedProgram; pass its .module(), or capture the "
                           f"nn.Module itself: {steps}")
    what = _a(value) + (" (an nn.Module that is not captured)" if isinstance(value, nn.Module) else "")
    raise CaptureError(f"{needs}, got {what}; capture it first: {steps}")


def example_tuple(example_inputs: Any, api: str) -> tuple:
    """``example_inputs`` as a tuple of tensors (a single tensor or a list is accepted), else one line."""
    import torch  # lazily, as above

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        got = f"({', '.join(type(t).__name__ for t in example_inputs)})"
    else:
        got = _a(example_inputs)
    raise CaptureError(f"{api} needs example_inputs as a tuple of tensors, e.g. (torch.randn(2, 3, 224, 224),), "
                       f"got {got}")
