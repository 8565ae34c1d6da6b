"""The engine's exceptions, in one leaf module that every engine layer can import.

A *bad input* (a spec or config value that cannot work, an unknown preset,
observer or target name) is a :class:`quantbench.errors.ConfigError`: one
line, exit status 2 at the command line. A model that cannot be captured,
quantized, aligned to a target or exported is not: those keep their own
``RuntimeError`` types (a traceback, status 1)::

    QuantizationError (RuntimeError)   the model cannot be quantized as asked
    ├── CalibrationError               a calibration batch does not fit the captured model
    └── HardwareError                  a graph cannot be aligned to a hardware target
    CaptureError (RuntimeError)        torch.export cannot capture the model
    ExportError (RuntimeError)         the graph cannot be exported to ONNX exactly
    NonFiniteError (ValueError)        calibration data produced NaN / inf
    SpecError (ConfigError, ValueError)   an invalid QuantizationSpec / Config field

Unknown registry names raise :class:`quantbench.registry.UnknownNameError`
(also a ``ConfigError``). This module imports nothing of the engine.
"""

from __future__ import annotations

from quantbench.errors import BadInputError, ConfigError

__all__ = [
    "CalibrationError",
    "CaptureError",
    "ExportError",
    "HardwareError",
    "NonFiniteError",
    "QuantizationError",
    "SpecError",
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


class NonFiniteError(ValueError):
    """Calibration data contained NaN or inf; the message names the observer's node."""


class SpecError(ConfigError):
    """An invalid quantization spec or config (a bad input); the message names the field.

    A :class:`~quantbench.errors.ConfigError`, hence also a ``ValueError``.
    """
