"""The narrow file protocol between a run and a peer toolkit (an *engine*), in its own process or in ours.

A job directory holds everything a peer needs and nothing of the harness:

* ``job.json``: :class:`PeerJob` (engine, scheme, the options the mapping table resolved, paths);
* ``float.pt2``: the float model as a ``torch.export`` program (architecture and weights) at the example's
  batch size, ``float_dynamic.pt2`` the same with a dynamic batch dimension (where the model exports so),
  and ``state_dict.pt``: the same weights as a plain state_dict;
* ``calib.pt``: the calibration input batches, the very tensors (same images, same order) every
  engine of the run's sweep is given;
* ``fp32.onnx``: the float model's ONNX export, for engines that quantize an ONNX model;
* ``eval.pt`` (optional): validation input batches, for a peer in another process whose torch-side
  model cannot come back to ours: it returns its outputs on them instead (``outputs.pt``).
* ``train.pt`` (optional, QAT only): one epoch of the task's QAT training data, in order: a list of
  ``(x, y)`` batches (``x`` the float NCHW inputs, ``y`` int64 class labels), for a peer that trains
  with the run's recipe (``PeerJob.qat``).

The peer writes back ``record.json`` (:class:`PeerRecord`) and the files it names (its QDQ ONNX
model, ``outputs.pt``). This module imports only the standard library and torch, so the worker of an
isolated virtualenv can load it without the rest of quantbench's dependencies.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["JOB_FILE", "RECORD_FILE", "PeerJob", "PeerRecord", "load_tensors", "save_tensors"]

JOB_FILE = "job.json"
RECORD_FILE = "record.json"


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@dataclass
class PeerJob:
    """What goes in: every path is relative to the job directory (``root``), so the directory can move.

    Attributes:
        engine: the engine's name (``ort``, ``torchao``, ``nncf``, ``quark``).
        scheme: quantbench's scheme name, for messages.
        options: the engine's own options for this scheme, from the mapping table
            (:mod:`quantbench.peers.mapping`), with the engine config's options laid over them.
        qat: the QAT recipe (``train.qat`` keys) for an engine that trains; empty for PTQ.
        threads: intra-op threads the peer may use.
        seed: the run's seed.
        input_names: the ONNX input names of ``fp32.onnx`` (the first takes the image batch).
        train_data: ``train.pt`` (see the module docstring) for a QAT job, else None.
    """

    engine: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)
    qat: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    seed: int = 0
    input_names: list[str] = field(default_factory=lambda: ["x"])
    program: str = "float.pt2"  # the example's batch size, static (what FX-graph tools such as Quark's need)
    program_dynamic: str | None = None  # the same with a dynamic batch dimension, where the model exports so
    state_dict: str = "state_dict.pt"
    calib: str = "calib.pt"
    fp32_onnx: str = "fp32.onnx"
    eval_inputs: str | None = None
    train_data: str | None = None  # QAT: one epoch of (x, y) training batches, in order
    root: str = field(default=".", compare=False)

    def path(self, name: str | None) -> Path | None:
        return None if name is None else Path(self.root) / name

    def save(self, root: str | Path) -> Path:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "root"}
        _atomic_write(root / JOB_FILE, json.dumps(data, indent=2, sort_keys=True))
        self.root = str(root)
        return root / JOB_FILE

    @classmethod
    def load(cls, root: str | Path) -> PeerJob:
        root = Path(root)
        data = json.loads((root / JOB_FILE).read_text())
        known = {f.name for f in fields(cls)}
        job = cls(**{k: v for k, v in data.items() if k in known})
        job.root = str(root)
        return job

    def calibration(self) -> list:
        """The calibration batches (a list of input tensors), in order."""
        return load_tensors(self.path(self.calib))


@dataclass
class PeerRecord:
    """What comes out (``record.json``).

    Attributes:
        engine, version: the toolkit and its installed version (``onnxruntime 1.32.0``).
        status: ``ok``, or ``unsupported`` (``reason`` says why; nothing else was produced).
        options: the options the engine actually ran with.
        onnx: the QDQ ONNX model it produced (a file name in the job directory), or None.
        outputs: ``outputs.pt``, its torch-side outputs on ``eval.pt`` (isolated engines), or None.
        quantize_s: seconds from the float model to the quantized one (calibration included).
        notes: what a reader of the results should know (an approximation, a skipped step).
        metrics: extra metrics to log as they are (``latency/inductor_int8_ms``).
    """

    engine: str
    version: str = ""
    status: str = "ok"
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    onnx: str | None = None
    outputs: str | None = None
    quantize_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def save(self, root: str | Path) -> Path:
        path = Path(root) / RECORD_FILE
        _atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, root: str | Path) -> PeerRecord:
        data = json.loads((Path(root) / RECORD_FILE).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_tensors(tensors: list, path: str | Path) -> Path:
    """A list of tensors (or of tuples of tensors), contiguous and on the CPU, loadable with ``weights_only``."""
    import torch

    def cpu(t):
        return tuple(cpu(x) for x in t) if isinstance(t, (list, tuple)) else t.detach().cpu().contiguous()

    path = Path(path)
    torch.save([cpu(t) for t in tensors], path)
    return path


def load_tensors(path: str | Path) -> list:
    import torch

    return torch.load(Path(path), map_location="cpu", weights_only=True)
