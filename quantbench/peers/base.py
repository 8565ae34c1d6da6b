"""What every peer engine module provides, and the registry of engines.

An engine module (``quantbench/peers/<name>_engine.py``) defines:

* ``DISTRIBUTION``: the pip distribution whose version the run records (``onnxruntime``);
* ``resolve_options(options) -> dict``: the options checked and laid over the engine's defaults, a
  ``ValueError`` naming an unknown key or a bad value (the harness calls it before the run records
  anything heavy, so ``engine.options`` with a typo is one line, exit 2);
* ``quantize(job: PeerJob, model: torch.nn.Module | None) -> PeerOutput``: quantize the float model
  with the toolkit's public API, calibrating on ``job.calibration()`` only, and write its QDQ ONNX
  model into the job directory. ``model`` is the float model when the engine runs in our process;
  in an isolated virtualenv it is None and the module loads ``job.program`` itself.

It raises :class:`Unsupported` for options it cannot express (the mapping table should have said
so first), and lets any other exception propagate: that is a bug or the toolkit's failure, recorded
with its traceback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ENGINE_MODULES", "NATIVE", "PeerOutput", "Unsupported", "engine_module", "installed_version",
           "overlay_options", "require_bool"]

#: The engine quantbench itself is (no peer module).
NATIVE = "quantbench"

#: engine name -> its module (an engine in an isolated virtualenv is loaded there, never here).
ENGINE_MODULES = {
    "ort": "quantbench.peers.ort_engine",
    "torchao": "quantbench.peers.torchao_engine",
    "nncf": "quantbench.peers.nncf_engine",
    "quark": "quantbench.peers.quark_engine",
}


class Unsupported(Exception):
    """The engine cannot express this scheme or option; the message says why (recorded, not a failure)."""


@dataclass
class PeerOutput:
    """What an engine module returns.

    Attributes:
        onnx: its QDQ ONNX model (a path in the job directory), or None when its exporter cannot write one.
        torch_model: its torch-side quantized model (callable on an input batch), or None.
        options: the options it actually ran with (the toolkit's names and values).
        notes: what a reader should know (an approximation, a fallback).
        metrics: extra metrics to log as they are (e.g. ``latency/inductor_int8_ms``).
        quantize_s: seconds from the float model to the quantized one, calibration included.
    """

    onnx: Path | None = None
    torch_model: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    quantize_s: float = 0.0


def engine_module(name: str):
    """Import an engine's module (ImportError when its toolkit is not installed in this interpreter)."""
    return importlib.import_module(ENGINE_MODULES[name])


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def overlay_options(engine: str, options: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """``options`` laid over ``defaults`` (values unchecked: each module checks its own); an unknown key is a
    ``ValueError`` naming it and the known ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{engine} engine: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(defaults))})")
    return {**defaults, **options}


def require_bool(engine: str, key: str, value: Any) -> bool:
    """``value`` when it is a bool, else a ``ValueError`` naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{engine} engine: option {key}={value!r} must be true or false")
    return value
