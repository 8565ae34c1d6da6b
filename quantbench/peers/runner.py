"""Run a peer engine's job: in this process (an engine that shares our environment) or in its own virtualenv.

The job directory is written by :func:`write_job` from what every engine of a sweep is given: the
float model, the calibration batches (the same images in the same order), the fp32 ONNX export
and, for an isolated engine, the validation inputs on which it returns its torch-side outputs.
:func:`run_job` then runs it: in-process through :func:`quantbench.peers.worker.run_job`, or as
``<venv>/bin/python -m quantbench.peers.worker JOB_DIR`` with only the repository on its path.

A toolkit that is not installed (or a virtualenv not created) is an :class:`EngineUnavailableError`:
one line that says how to install it. A worker that fails is a bug or the toolkit's failure: a
``RuntimeError`` carrying the tail of its stderr (the full log stays in the job directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantbench.errors import BadInputError
from quantbench.peers.base import ENGINE_MODULES, PeerOutput, engine_module
from quantbench.peers.protocol import PeerJob, PeerRecord, save_tensors

__all__ = ["INSTALL_HINTS", "EngineUnavailableError", "check_available", "run_job", "write_job"]

#: How to get each engine, for the one-line error when it is missing.
INSTALL_HINTS = {
    "ort": "onnxruntime is part of quantbench's own install: `make install`",
    "torchao": "torchao is part of quantbench's own install: `make install`",
    "nncf": "`make install` installs nncf (pinned in constraints.txt)",
    "quark": "create it with `make engines` (python -m quantbench.peers.venvs create quark)",
}

_REPO = Path(__file__).resolve().parents[2]


class EngineUnavailableError(BadInputError):
    """The engine's toolkit is not installed here: one line naming it and how to install it."""


def _venv_python(venv: str | os.PathLike) -> Path:
    root = Path(venv)
    if not root.is_absolute():
        root = _REPO / root
    return root / "bin" / "python"


def check_available(engine: str, *, isolated: bool = False, venv: str | None = None) -> None:
    """Raise :class:`EngineUnavailableError` when ``engine`` cannot run here (cheap: no toolkit import)."""
    if engine not in ENGINE_MODULES:
        raise EngineUnavailableError(f"engine={engine}: no such peer engine; one of {sorted(ENGINE_MODULES)}")
    if isolated:
        if not venv:
            raise EngineUnavailableError(f"engine={engine}: isolated but engine.venv is not set")
        python = _venv_python(venv)
        if not python.exists():
            raise EngineUnavailableError(f"engine={engine}: its virtualenv {venv} is not there; "
                                         f"{INSTALL_HINTS.get(engine, 'create it')}")
        return
    import importlib.util

    module = ENGINE_MODULES[engine]
    toolkit = {"ort": "onnxruntime.quantization", "torchao": "torchao", "nncf": "nncf"}.get(engine)
    try:
        found = toolkit is None or importlib.util.find_spec(toolkit) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise EngineUnavailableError(f"engine={engine}: {toolkit} is not installed in {sys.prefix}; "
                                     f"{INSTALL_HINTS.get(engine, 'install it')} ({module})")


def write_job(root: str | Path, *, engine: str, scheme: str, options: dict[str, Any], calib: list,
              fp32_onnx: str | Path, model=None, example: tuple = (), input_names: list[str] | None = None,
              isolated: bool = False, eval_inputs: list | None = None, qat: dict | None = None,
              threads: int = 1, seed: int = 0) -> PeerJob:
    """Write a job directory: ``calib.pt``, ``fp32.onnx``, ``state_dict.pt`` and, for an isolated engine,
    ``float.pt2`` (``torch.export`` of ``model`` on ``example``) and ``eval.pt``."""
    import shutil

    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_tensors(calib, root / "calib.pt")
    shutil.copyfile(fp32_onnx, root / "fp32.onnx")
    job = PeerJob(engine=engine, scheme=scheme, options=dict(options), qat=dict(qat or {}), threads=int(threads),
                  seed=int(seed), input_names=list(input_names or ["x"]))
    if model is not None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, root / job.state_dict)
        if isolated:  # static (FX-graph tools re-trace it) and, where it exports so, with a dynamic batch
            static = (_first(calib[0]),) if calib else tuple(example)  # the calibration batch size
            torch.export.save(torch.export.export(model, static), root / job.program)
            batch = torch.export.Dim("batch", min=1)
            try:
                dynamic = torch.export.export(model, tuple(example), dynamic_shapes=tuple({0: batch} for _ in example))
            except Exception:  # noqa: BLE001 - a model whose graph fixes its batch has only the static program
                dynamic = None
            if dynamic is not None:
                torch.export.save(dynamic, root / "float_dynamic.pt2")
                job.program_dynamic = "float_dynamic.pt2"
    if eval_inputs is not None:
        save_tensors(eval_inputs, root / "eval.pt")
        job.eval_inputs = "eval.pt"
    job.save(root)
    return job


def _first(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_job(root: str | Path, *, isolated: bool = False, venv: str | None = None, timeout_s: float = 1800.0,
            model=None) -> tuple[PeerRecord, PeerOutput | None]:
    """Run the job in ``root``; returns its record and, in-process, the engine's output (its torch-side model)."""
    job = PeerJob.load(root)
    check_available(job.engine, isolated=isolated, venv=venv)
    if not isolated:
        from quantbench.peers.worker import run_job as run_here

        try:
            engine_module(job.engine)
        except ImportError as exc:
            raise EngineUnavailableError(f"engine={job.engine}: {exc}; {INSTALL_HINTS.get(job.engine, '')}") from None
        return run_here(root, model)
    root = Path(root)
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": str(max(1, job.threads)),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONHOME", None)
    out, err = root / "worker.out", root / "worker.err"
    start = time.perf_counter()
    with out.open("w") as fo, err.open("w") as fe:
        try:
            proc = subprocess.run([str(_venv_python(venv)), "-m", "quantbench.peers.worker", str(root)],
                                  stdout=fo, stderr=fe, env=env, cwd=str(root), timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"engine={job.engine}: its worker ran past engine.timeout_s={timeout_s:g} s "
                               f"(log: {err})") from None
    if proc.returncode != 0 or not (root / "record.json").is_file():
        raise RuntimeError(f"engine={job.engine}: its worker failed (exit {proc.returncode}, "
                           f"{time.perf_counter() - start:.0f} s):\n{_tail(err) or _tail(out)}")
    return PeerRecord.load(root), None
