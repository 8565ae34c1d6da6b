"""One experiment = task x model x scheme: ``run(cfg) -> RunResult``.

``run`` is what the Hydra entry point wraps and what tests call. It resolves
the config, skips work that the store already holds (same config hash,
FINISHED), builds the task from ``cfg.task._target_`` (the harness never
imports a task), runs the stages of :mod:`quantbench.harness.pipeline` and
records everything in MLflow. A failure is recorded, never raised, so one bad
run cannot stop a sweep: the run is marked FAILED with a one-line ``error``
tag and the traceback as ``error.txt``. The one exception is a missing data
set, which no other run can get past either: it is re-raised as
:class:`DataMissingError` for the entry point to turn into exit status 2.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from quantbench.harness.pipeline import Context, execute
from quantbench.harness.protocol import TaskAdapter
from quantbench.harness.tracking import Store, config_hash, flatten, git_sha

__all__ = ["HARNESS_ONLY", "DataMissingError", "RunResult", "build_task", "is_data_missing", "run"]

log = logging.getLogger(__name__)


class DataMissingError(RuntimeError):
    """The task's data set is not where the config says; the message says how to get it."""


@dataclass
class RunResult:
    """What one run ended as. ``status``: FINISHED, FAILED or SKIPPED (already in the store)."""

    status: str
    task: str
    model: str
    scheme: str
    config_hash: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model} x {self.scheme}"


def is_data_missing(exc: BaseException) -> bool:
    """True for a task's ``DataNotFoundError`` (matched by name: the harness never imports tasks)."""
    return any(cls.__name__ == "DataNotFoundError" for cls in type(exc).__mro__)


#: Keys the harness reads itself and does not pass to the task adapter.
HARNESS_ONLY = {"task": ("pretrained_weights",), "model": ("display_name",)}


def _for_task(tree: Mapping[str, Any], group: str) -> dict[str, Any]:
    return {k: v for k, v in tree[group].items() if k not in HARNESS_ONLY.get(group, ())}


def build_task(tree: Mapping[str, Any]) -> TaskAdapter:
    """Instantiate ``task._target_`` with data, model and both recipes as plain dicts."""
    return instantiate(_for_task(tree, "task"), data=_for_task(tree, "data"), model=_for_task(tree, "model"),
                       train=dict(tree["train"]["baseline"]), qat=dict(tree["train"]["qat"]), _convert_="all")


def _resolve(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    tree = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    tree.pop("hydra", None)
    return tree


def _seed(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def run(cfg: DictConfig | Mapping[str, Any]) -> RunResult:
    """Run (or skip) one task x model x scheme and record it in MLflow.

    Raises:
        DataMissingError: the task reported its data set missing.
    """
    tree = _resolve(cfg)
    names = {"task": tree["task"]["name"], "model": tree["model"]["name"], "scheme": tree["scheme"]["name"]}
    chash = config_hash(tree, () if tree["scheme"]["qat"] else ("train.qat",))  # PTQ ignores the QAT recipe
    track, settings = tree["tracking"], tree["run"]
    store = Store.from_config(track)
    if not settings["force"]:
        done = store.find_finished(track["experiment"], chash)
        if done is not None:
            log.info("%s x %s: already FINISHED with config %s (run %s); run.force=true reruns it",
                     names["model"], names["scheme"], chash, done.info.run_id)
            return RunResult("SKIPPED", **names, config_hash=chash, run_id=done.info.run_id,
                             metrics=dict(done.data.metrics))
    tags = {**names, "sweep": track["sweep_id"], "config_hash": chash, "git_sha": git_sha()}
    recorder = store.start_run(track["experiment"], f"{names['model']}-{names['scheme']}", tags)
    recorder.log_params(flatten(tree))
    recorder.log_text(OmegaConf.to_yaml(OmegaConf.create(tree)), "config.yaml")
    _seed(int(settings["seed"]), int(settings["threads"]))
    try:
        with tempfile.TemporaryDirectory(prefix="quantbench-") as tmp:
            task = build_task(tree)
            recorder.set_tags({"primary_metric": task.primary_metric})
            ctx = Context(task=task, scheme=tree["scheme"], qat_recipe=tree["train"]["qat"],
                          settings=settings, workdir=Path(tmp), recorder=recorder)
            metrics = execute(ctx)
    except BaseException as exc:
        line = recorder.fail(exc)
        if is_data_missing(exc):
            raise DataMissingError(str(exc)) from exc
        log.error("%s x %s FAILED: %s (run %s)", names["model"], names["scheme"], line, recorder.run_id)
        if not isinstance(exc, Exception):
            raise
        return RunResult("FAILED", **names, config_hash=chash, run_id=recorder.run_id, error=line)
    recorder.finish()
    return RunResult("FINISHED", **names, config_hash=chash, run_id=recorder.run_id, metrics=metrics)
