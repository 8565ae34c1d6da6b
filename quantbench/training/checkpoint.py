"""Resumable training: a checkpoint of everything a training loop needs to carry on exactly.

:class:`TrainingCheckpoint` saves the model, the optimizer, the LR scheduler,
the step count, the torch random state and whatever the loop adds (history,
best weights, the running sums of a half-finished epoch). With a data order
that is a function of (seed, epoch) (see
:class:`~quantbench.training.distributed.ShardSampler`), a run killed after
step k and started again ends with the same weights and metrics on CPU as one
that was never interrupted::

    ckpt = TrainingCheckpoint(cfg.resume_dir, model, optimizer, scheduler, fingerprint=recipe)
    state = ckpt.load()                       # None: nothing to resume, start at step 0
    step = state["step"] if state else 0
    ...                                       # train; every N steps or each epoch:
    ckpt.save(step, history=history)

Files are written to a temporary name, flushed to disk and renamed into place,
so a kill during ``save`` leaves the previous checkpoint intact; only rank 0
writes. They are read with ``torch.load(weights_only=True)``: a checkpoint is
data, never code. A file that does not load, belongs to another recipe
(``fingerprint``) or does not fit the model is reported, deleted and ignored,
and training starts over.

:func:`load_weights` loads a user's ``model.checkpoint`` (a state_dict, bare or
under ``state_dict``/``model_state_dict``/``model``, with or without DDP's
``module.`` prefix) with the same safe loader; a file that is missing, is not a
checkpoint, holds pickled objects, or does not fit the model is one line
naming the key (:class:`~quantbench.errors.WeightsError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from quantbench.errors import WeightsError, WeightsNotFoundError
from quantbench.training.distributed import is_main

__all__ = ["BestCheckpoint", "CheckpointMismatch", "TrainingCheckpoint", "fingerprint_of", "load_weights",
           "read_state_dict"]

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointMismatch(ValueError):
    """The checkpoint is readable but belongs to another run (recipe, model or world size)."""


def fingerprint_of(payload: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description of the run (recipe, world size, ...)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


class TrainingCheckpoint:
    """The latest state of one training run, in ``directory/last.pt``.

    Args:
        directory: Where the run keeps its checkpoint (one directory per run).
        model: The module whose ``state_dict`` is saved (not a DDP wrapper).
        optimizer: Saved and restored with it.
        scheduler: Optional LR scheduler, likewise.
        fingerprint: What identifies the run (e.g. the recipe and world size);
            a checkpoint with another fingerprint is not resumed.
    """

    def __init__(self, directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any = None, *, fingerprint: Mapping[str, Any] | str = "") -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / "last.pt"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.fingerprint = fingerprint if isinstance(fingerprint, str) else fingerprint_of(fingerprint)

    def save(self, step: int, **extra: Any) -> Path | None:
        """Write the state after ``step`` optimizer steps atomically (rank 0 only; others return None).

        ``extra`` must be plain data and tensors (what ``weights_only`` loads).
        """
        if not is_main():
            return None
        state = {
            "format": FORMAT, "fingerprint": self.fingerprint, "step": int(step),
            "model": _cpu(self.model.state_dict()), "optimizer": _cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": _rng_state(), "extra": _cpu(extra),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".last.pt-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.debug("checkpoint at step %d: %s", step, self.path)
        return self.path

    def _read(self) -> dict[str, Any]:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointMismatch("not a quantbench training checkpoint")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(f"written for another run (fingerprint {state.get('fingerprint')}, "
                                     f"this run {self.fingerprint})")
        expected, saved = set(self.model.state_dict()), set(state["model"])
        if expected != saved:
            raise CheckpointMismatch(f"model keys differ ({len(expected ^ saved)} of {len(expected)})")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except Exception:
            self.model.load_state_dict(backup)  # never train on from a half-loaded model
            raise
        _set_rng_state(state["rng"])

    def load(self) -> dict[str, Any] | None:
        """Restore the saved state into the model, optimizer, scheduler and RNG.

        Returns:
            ``{"step": int, **extra}``; ``None`` when there is no checkpoint or
            it is unusable (then deleted, with a warning naming the file and why).
        """
        if not self.path.is_file():
            return None
        try:
            state = self._read()
            self._restore(state)
        except Exception as exc:  # a truncated, foreign or stale file: start over rather than fail the run
            reason = str(exc).splitlines()[0] if str(exc) else ""
            log.warning("checkpoint %s is unusable (%s: %s); training from the start",
                        self.path, type(exc).__name__, reason)
            if is_main():
                self.path.unlink(missing_ok=True)
            return None
        log.info("resuming from %s at step %d", self.path, state["step"])
        return {"step": state["step"], **state["extra"]}

    def remove(self) -> None:
        """Delete the checkpoint directory (the run finished and was recorded); rank 0 only."""
        if is_main():
            shutil.rmtree(self.directory, ignore_errors=True)


class BestCheckpoint:
    """Keeps the weights of the best validation score, in memory or on disk.

    Why: QAT curves are noisy and the last epoch is not always the best, so
    the recipes keep the best checkpoint by validation score (``keep_best``).

    Args:
        keep: ``memory``, ``disk`` (``directory/best.pt``) or ``none`` (keep nothing).
        directory: Where ``disk`` keeps it (default: a temporary directory,
            removed by :meth:`restore`).
    """

    def __init__(self, keep: str = "memory", directory: str | os.PathLike | None = None) -> None:
        self.keep = keep
        self.best: float | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._own_dir = keep == "disk" and directory is None
        self._dir = Path(tempfile.mkdtemp(prefix="qb-best-")) if self._own_dir else Path(directory or ".")
        self.path = self._dir / "best.pt"

    def update(self, score: float, model: nn.Module) -> bool:
        """Save ``model`` if ``score`` beats the best so far; True when it did."""
        if self.keep == "none" or (self.best is not None and score <= self.best):
            return False
        self.best = score
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.keep == "disk":
            self._dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.path)
        else:
            self._state = state
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the best weights back into ``model`` (no-op when nothing was kept)."""
        if self.keep == "disk" and self.best is not None:
            model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        elif self._state is not None:
            model.load_state_dict(self._state)
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def state(self) -> dict[str, Any]:
        """The best score and weights as plain data (for a resumable checkpoint)."""
        weights = self._state
        if self.keep == "disk" and self.best is not None:
            weights = torch.load(self.path, map_location="cpu", weights_only=True)
        return {"best": self.best, "weights": weights}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over what :meth:`state` returned (a resumed run)."""
        self.best = state["best"]
        if state["weights"] is None:
            return
        if self.keep == "disk":
            self._dir.mkdir(parents=True, exist_ok=True)
            torch.save(state["weights"], self.path)
        else:
            self._state = state["weights"]


# ------------------------------------------------------------- a user's weights file
#: Keys under which training scripts usually nest the model's state_dict.
_WRAPPERS = ("state_dict", "model_state_dict", "model")
#: Prefixes that wrappers add to every key: DDP (``module.``), ``torch.compile`` (``_orig_mod.``).
_PREFIXES = ("module.", "_orig_mod.")
_SAVE_HINT = "save one with torch.save(model.state_dict(), PATH)"


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def read_state_dict(path: str | os.PathLike, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict in the file ``path``, read safely (tensors only, ``weights_only``), unwrapped.

    Args:
        path: The file (``~`` expanded).
        key: The config key that named it, for the messages.

    Raises:
        WeightsNotFoundError: There is no such file.
        WeightsError: The file is not a PyTorch checkpoint, holds pickled
            Python objects (never unpickled: that would run code), or holds no
            state_dict. One line naming ``key=path``.
    """
    path = Path(path).expanduser()
    where = f"{key}={path}"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsNotFoundError(f"{where}: {what}; point {key} at a state_dict file ({_SAVE_HINT})")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol: we say what is wrong with the file below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a real pickle, of something more than tensors (a whole nn.Module, a custom class)
            raise WeightsError(f"{where}: not loadable safely: it pickles the Python object {found.group(1)}, "
                               f"and checkpoints are loaded as tensors only; {_SAVE_HINT} and point {key} "
                               "at that file") from None
        raise WeightsError(f"{where}: not a PyTorch checkpoint, or not loadable safely (it does not unpickle as "
                           f"tensors only); point {key} at a state_dict file ({_SAVE_HINT})") from None
    except OSError as exc:
        raise WeightsError(f"{where}: cannot be read ({type(exc).__name__}: {exc.strerror or exc}); fix the file "
                           f"or point {key} elsewhere") from None
    except Exception as exc:  # noqa: BLE001 - torch.load of any file: KeyError, EOFError, RuntimeError, ...
        raise WeightsError(f"{where}: not a PyTorch checkpoint ({type(exc).__name__} while reading it); point "
                           f"{key} at a state_dict file ({_SAVE_HINT})") from None
    for _ in range(len(_WRAPPERS)):  # {"model": {"state_dict": ...}} too
        if not isinstance(state, Mapping):
            break
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        if isinstance(state, Mapping):
            held = f"a dict without tensors (keys: {_examples([str(k) for k in state], 5) or 'none'})"
        else:
            held = f"a {type(state).__name__}"
        raise WeightsError(f"{where}: holds {held}, not a state_dict; point {key} at a state_dict file "
                           f"({_SAVE_HINT})")
    state = {str(k): v for k, v in state.items()}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "[" + ",".join(str(d) for d in value.shape) + "]"
    return type(value).__name__


def load_weights(model: nn.Module, path: str | os.PathLike, *, key: str = "model.checkpoint",
                 name: str | None = None) -> nn.Module:
    """Load the state_dict file ``path`` into ``model`` (strict), safely; see :func:`read_state_dict`.

    Args:
        model: The freshly built model.
        path: The state_dict file.
        key: The config key that named it.
        name: The model's name for the message (``model.name``); default: its class name.

    Raises:
        WeightsNotFoundError: No such file.
        WeightsError: Not a loadable checkpoint, or a state_dict that does not fit ``model``: one line
            with the counts and a few examples of missing, unexpected and mis-shaped keys.
    """
    state = read_state_dict(path, key)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {_shape(own[k])} vs {_shape(state[k])}" for k in own
                  if k in state and _shape(own[k]) != _shape(state[k])]
        parts = [f"{len(missing)} missing keys (e.g. {_examples(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})" if unexpected else "",
                 f"{len(shapes)} shape mismatches (model vs file, e.g. {_examples(shapes, 2)})" if shapes else ""]
        diff = ", ".join(p for p in parts if p) or str(exc).strip().splitlines()[0]
        fix = f"point {key} at weights for this model"
        if shapes and not missing and not unexpected:
            fix += " or change the model's config to match them (e.g. model.num_classes)"
        where = Path(path).expanduser()
        message = f"{key}={where}: its state_dict does not fit {name or type(model).__name__}: {diff}; {fix}"
        raise WeightsError(message.replace("\r", " ").replace("\n", " ")) from None
    return model
