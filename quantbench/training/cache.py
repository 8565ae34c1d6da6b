"""On-disk cache of trained float baselines, keyed by the config that made them.

Tasks without pretrained weights (digits) train their float model once; every
later run of the sweep with the same model, data and recipe loads it. The key
is a hash of exactly those settings, so changing the learning rate or the
image size trains a new baseline instead of silently reusing a stale one.

Files are written with ``torch.save(state_dict)`` to a temporary name and
renamed into place (a killed run never leaves half a file under the real
name), and read with ``torch.load(weights_only=True)``. A file that does not
load, or does not fit the model, is reported, deleted and rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantbench.training import distributed
from quantbench.training.distributed import is_main
from quantbench.training.protocol import TrainResult

__all__ = ["CACHE_VERSION", "SAVE_FIELDS", "BaselineCache", "baseline_payload", "payload_hash"]

log = logging.getLogger(__name__)

# Bump when the training code changes what a config produces. 2: per-epoch seeded data order and
# per-sample seeded augmentation (resumable, the same under torchrun). 3: one training loop for every
# task (quantbench.training.loop); the recipe gained ema, grad_clip, eval_every, decay_norm_and_bias.
CACHE_VERSION = 3


#: Recipe fields that say where and how often training saves, not what it learns: left out of keys.
SAVE_FIELDS = frozenset({"checkpoint_dir", "resume_dir", "checkpoint_steps"})


def baseline_payload(task: str, model: dict[str, Any], data: dict[str, Any], dataset: dict[str, Any],
                     recipe: Any) -> dict[str, Any]:
    """What determines a trained baseline, as a cache key payload.

    ``data`` is the data config without what does not change the weights
    (paths, workers, evaluation batch sizes); ``dataset`` identifies the data
    (classes, split sizes); ``recipe`` is the float-baseline dataclass, kept
    without :data:`SAVE_FIELDS`. Under torchrun N ranks train on N x
    batch_size images a step, so the world size is part of the key.
    """
    key = {"task": task, "model": model, "data": data, "dataset": dataset,
           "train": {k: v for k, v in dataclasses.asdict(recipe).items() if k not in SAVE_FIELDS}}
    world = distributed.current().world_size
    if world > 1:
        key["world_size"] = world
    return key


def payload_hash(payload: dict[str, Any]) -> str:
    """Stable SHA-256 of a JSON-able payload (sorted keys), first 16 hex digits."""
    text = json.dumps({"version": CACHE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class BaselineCache:
    """One cached baseline: ``<dir>/<task>_<model>_<hash>.pt`` plus a ``.json`` of its key and metrics."""

    def __init__(self, directory: str | os.PathLike, task: str, model: str, payload: dict[str, Any]) -> None:
        self.task, self.model = task, model
        self.payload = payload
        self.key = payload_hash(payload)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}_{model}")
        self.path = Path(directory).expanduser() / f"{safe}_{self.key}.pt"
        self.meta_path = self.path.with_suffix(".json")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the entry's file lock: parallel sweep jobs train a missing baseline once, not once each.

        Not under torchrun: there the ranks train it together.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load_into(self, model: nn.Module) -> bool:
        """Load the cached weights into ``model``; False when absent or unusable.

        An unusable file (truncated, not a state_dict, wrong shapes) is deleted
        so the caller rebuilds it.
        """
        if not self.path.is_file():
            return False
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"expected a state_dict, found {type(state).__name__}")
            model.load_state_dict(state)
        except Exception as exc:  # any unreadable file is rebuilt, whatever broke it
            log.warning(
                "cached baseline %s is unusable (%s: %s); retraining",
                self.path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self.path.unlink(missing_ok=True)
            return False
        log.info("loaded the cached float baseline %s", self.path)
        return True

    def load_on_every_rank(self, model: nn.Module) -> bool:
        """:meth:`load_into` on every torchrun rank; all of them loaded it, or none (then they train it).

        Raises:
            RuntimeError: Some ranks loaded it and others could not (a cache
                directory that is not shared by all ranks).
        """
        loaded = self.load_into(model)
        world = distributed.current().world_size
        hits = distributed.all_reduce_sum([float(loaded)])[0]
        if 0 < hits < world:
            raise RuntimeError(f"only {hits:.0f} of {world} ranks could load the cached baseline {self.path}; "
                               "is the cache directory shared by all ranks?")
        return loaded

    def load_or_train(self, fresh: Callable[[], nn.Module], train: Callable[[nn.Module, Any], TrainResult],
                      recipe: Any, metric: str) -> nn.Module:
        """The cached baseline, or ``train(fresh(), recipe)`` and cache it (in eval mode either way).

        Parallel jobs training the same entry wait on its lock and load it;
        under torchrun the ranks load it, or train it, together. Without a
        ``recipe.resume_dir`` training checkpoints next to the entry (a long
        baseline resumes after an interruption); that folder is removed once
        the baseline is cached. ``metric`` names ``best_metric`` in the
        ``.json`` beside the weights.
        """
        if distributed.current().distributed:
            return self._load_or_train(fresh, train, recipe, metric)
        with self.lock():
            return self._load_or_train(fresh, train, recipe, metric)

    def _load_or_train(self, fresh: Callable[[], nn.Module], train: Callable[[nn.Module, Any], TrainResult],
                       recipe: Any, metric: str) -> nn.Module:
        model, existed = fresh(), self.path.is_file()
        if self.load_on_every_rank(model):
            return model.eval()
        if existed:  # a failed load may have overwritten some tensors: start again from the seeded init
            model = fresh()
        log.info("training the %s float baseline for %s (cached at %s afterwards)", self.model, self.task, self.path)
        if recipe.resume_dir is None:
            recipe = dataclasses.replace(recipe, resume_dir=str(self.path.with_suffix(".resume")))
        result = train(model, recipe)
        self.save(result.model, {metric: result.best_metric, "seconds": round(result.seconds, 2),
                                 "history": result.history})
        if is_main():
            shutil.rmtree(recipe.resume_dir, ignore_errors=True)
        return result.model.eval()

    def save(self, model: nn.Module, metrics: dict[str, Any]) -> Path:
        """Write ``model.state_dict()`` atomically, and the key payload with ``metrics`` beside it.

        Under torchrun only rank 0 writes (every rank holds the same weights).
        """
        if not is_main():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}-", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = {"key": self.key, "config": self.payload, "metrics": metrics}
        self.meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        log.info("cached the float baseline at %s", self.path)
        return self.path
