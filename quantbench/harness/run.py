"""One experiment = task x model x scheme: ``run(cfg) -> RunResult``.

``run`` is what the Hydra entry point wraps and what tests call. It resolves
and checks the config, skips work that the store already holds (same config
hash, FINISHED), marks a stale RUNNING record of the same config FAILED
(killed), builds the task from ``cfg.task._target_`` (the harness never
imports a task), runs the stages of :mod:`quantbench.harness.pipeline` and
records everything in MLflow. A failure is recorded, never raised, so one bad
run cannot stop a sweep: the run is marked FAILED with a one-line ``error``
tag and the traceback as ``error.txt``. The exceptions are bad inputs that no
other run can get past either (missing or corrupt data, an unreachable
server, a device that is not there, a config that names foreign code): they
are raised as :class:`~quantbench.errors.BadInputError` for the entry
point to turn into one line and exit status 2. The task is built and its
data located before the run is recorded, so a missing data set, or a value
the task refuses in a single run, leaves nothing in the store.

Under ``torchrun`` every rank runs the stages (training is data-parallel,
evaluation sums every rank's share); rank 0 alone decides whether to skip,
talks to MLflow and writes files.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from quantbench.errors import BadInputError, ConfigError, DataError, DeviceUnavailableError, UnsafeConfigError
from quantbench.harness.config import resolve_tree
from quantbench.harness.pipeline import Context, execute
from quantbench.harness.schema import TARGET_PACKAGES, check_runtime
from quantbench.harness.tracking import (
    NullRecorder,
    RunRecorder,
    Store,
    flatten,
    git_sha,
    run_hash,
)
from quantbench.training import TaskAdapter, distributed
from quantbench.training.checkpoint import read_state_dict

__all__ = [
    "HARNESS_ONLY",
    "TARGET_PACKAGES",
    "RunResult",
    "build_task",
    "check_config",
    "resolve_threads",
    "resolve_tree",
    "run",
]

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What one run ended as. ``status``: FINISHED, FAILED or SKIPPED (already in the store).

    ``error_kind`` is ``"input"`` when a bad input (a full disk) failed the run.
    """

    status: str
    task: str
    model: str
    scheme: str
    config_hash: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    engine: str = "quantbench"

    @property
    def label(self) -> str:
        return f"{self.model} x {self.scheme}" + (f" x {self.engine}" if self.engine != "quantbench" else "")


#: Keys the harness reads itself and does not pass to the task adapter.
HARNESS_ONLY = {"task": ("pretrained_weights", "deploy_size")}


def _for_task(tree: Mapping[str, Any], group: str) -> dict[str, Any]:
    return {k: v for k, v in tree[group].items() if k not in HARNESS_ONLY.get(group, ())}


def build_task(tree: Mapping[str, Any]) -> TaskAdapter:
    """Instantiate ``task._target_`` with data, model and both recipes as plain dicts.

    Raises:
        BadInputError: the task refused a config value (e.g. ``data.on_corrupt``): the task's own
            one-line error, not Hydra's InstantiationException around it.
    """
    try:
        return instantiate(_for_task(tree, "task"), data=_for_task(tree, "data"), model=_for_task(tree, "model"),
                           train=dict(tree["train"]["baseline"]), qat=dict(tree["train"]["qat"]), _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, BadInputError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            yield from _targets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def check_config(tree: Mapping[str, Any]) -> None:
    """Refuse, before anything runs, a config that names foreign code or a device that is not here.

    ``hydra.utils.instantiate`` would import and call whatever a ``_target_``
    names, anywhere in the nodes given to it. The only one allowed is
    ``task._target_``, and only for the project's own classes.

    Raises:
        UnsafeConfigError: another ``_target_``, or one outside :data:`TARGET_PACKAGES`.
        DeviceUnavailableError: ``task.device`` asks for CUDA on a machine without it.
        ConfigError: ``run.runtime`` is not a runtime; RuntimeUnavailableError: it asks for OpenVINO, which
            is not installed (:func:`~quantbench.harness.schema.check_runtime`).
    """
    for where, target in _targets({k: v for k, v in tree.items() if k != "hydra"}):
        if where != "task._target_":
            raise UnsafeConfigError(f"{where}={target!r}: a config may name code to run only in task._target_")
        if not str(target).startswith(TARGET_PACKAGES):
            raise UnsafeConfigError(f"task._target_={target!r} is not one of the project's classes "
                                    f"(allowed: {', '.join(p + '*' for p in TARGET_PACKAGES)})")
    device = str(tree["task"].get("device") or "auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"task.device={device} but this machine has no CUDA device (torch "
                                     f"{torch.__version__}): use task.device=cpu or task.device=auto")
    check_runtime(str((tree.get("run") or {}).get("runtime", "ort")))


def resolve_threads(threads: int) -> int:
    """``run.threads``, where 0 means every CPU this process may run on (a SLURM allocation, a cgroup)."""
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _seed(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def _qat_recipe(tree: Mapping[str, Any], names: Mapping[str, str], chash: str) -> dict[str, Any]:
    """``train.qat`` with the scheme's ``qat_recipe`` laid over it (a 4-bit QAT needs more steps and a higher
    rate than the task's 8-bit recipe), and a resume directory of its own per config (``run.resume_root``)."""
    extra = tree["scheme"].get("qat_recipe") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"scheme.qat_recipe={extra!r}: must map train.qat keys to values, e.g. {{epochs: 10}}")
    recipe = {**dict(tree["train"]["qat"]), **dict(extra)}
    root = tree["run"].get("resume_root")
    if root and tree["scheme"].get("qat") and recipe.get("resume_dir") is None:
        recipe["resume_dir"] = str(Path(root) / f"{names['task']}-{names['model']}-{names['scheme']}-{chash}")
    return recipe


def _finished(store: Store, track: Mapping[str, Any], chash: str) -> tuple[str, dict[str, float]] | None:
    done = store.find_finished(track["experiment"], chash)
    return None if done is None else (done.info.run_id, dict(done.data.metrics))


def _start(store: Store, tree: Mapping[str, Any], names: Mapping[str, str], chash: str) -> RunRecorder:
    track = tree["tracking"]
    store.reap_stale(track["experiment"], chash, float(track["stale_after_s"]))
    tags = {**names, "sweep": track["sweep_id"], "config_hash": chash, "git_sha": git_sha()}
    recorder = store.start_run(track["experiment"], f"{names['model']}-{names['scheme']}", tags,
                               heartbeat_s=float(track["heartbeat_s"]), parent_run=track.get("parent_run"))
    recorder.log_params(flatten(tree))
    recorder.log_data_inputs(tree)  # the eval (and calibration) data sets: the UI's Dataset column
    recorder.log_text(OmegaConf.to_yaml(OmegaConf.create(tree)), "config.yaml")
    return recorder


def run(cfg: DictConfig | Mapping[str, Any]) -> RunResult:
    """Run (or skip) one task x model x scheme and record it in MLflow.

    Raises:
        BadInputError: a bad input that stops every run (missing or corrupt
            data, an unreachable tracking server, a missing device, an unsafe config).
    """
    tree = resolve_tree(cfg)
    check_config(tree)
    engine = dict(tree.get("engine") or {"name": "quantbench"})
    names = {"task": tree["task"]["name"], "model": tree["model"]["name"], "scheme": tree["scheme"]["name"],
             "engine": engine["name"]}
    chash = run_hash(tree)
    track, settings = tree["tracking"], dict(tree["run"])
    settings["task_deploy_size"] = tree["task"].get("deploy_size")
    settings["threads"] = resolve_threads(int(settings["threads"]))
    env = distributed.init_from_env(tree["task"].get("device"))
    store = Store.from_config(track) if env.is_main else None
    done = _finished(store, track, chash) if env.is_main and not settings["force"] else None
    done = distributed.broadcast_object(done)
    if done is not None:
        log.info("%s x %s: already FINISHED with config %s (run %s); run.force=true reruns it",
                 names["model"], names["scheme"], chash, done[0])
        return RunResult("SKIPPED", **names, config_hash=chash, run_id=done[0], metrics=done[1])
    qat_recipe = _qat_recipe(tree, names, chash)
    if not env.is_main:
        settings["fp32_onnx_cache"] = None  # only rank 0 writes files
    _seed(int(settings["seed"]), settings["threads"])
    try:
        # Before anything is recorded: a data set that is not there, or a value the task refuses, is a
        # bad input (one line, exit 2, nothing in the store), like a device that is not there.
        task = build_task(tree)
        task.load_data()
        if tree["model"].get("checkpoint"):  # not there, or not a checkpoint (whether it fits: when built)
            read_state_dict(tree["model"]["checkpoint"], key="model.checkpoint")
        if engine["name"] != "quantbench":  # a peer toolkit that is not installed: one line on how to get it
            from quantbench.peers.runner import check_available

            check_available(engine["name"], isolated=bool(engine.get("isolated")), venv=engine.get("venv"))
        else:
            from quantbench.harness.engines import engine_options

            if engine_options(engine):
                raise ConfigError(f"engine.options={engine['options']}: quantbench's own engine takes its options "
                                  "from the scheme (scheme.*); engine.options are a peer engine's "
                                  "({ort: {...}, torchao: {...}} in a sweep over engines)")
    except BadInputError as exc:
        if isinstance(exc, DataError) or not _in_multirun():
            raise
        # One job of a sweep (a bad value in a sweep list): recorded FAILED, the sweep goes on.
        recorder = _start(store, tree, names, chash) if env.is_main else NullRecorder()
        line = recorder.fail(exc)
        log.error("%s x %s FAILED: %s (run %s)", names["model"], names["scheme"], line, recorder.run_id)
        return RunResult("FAILED", **names, config_hash=chash, run_id=recorder.run_id, error=line, error_kind="input")
    recorder = _start(store, tree, names, chash) if env.is_main else NullRecorder()
    try:
        with tempfile.TemporaryDirectory(prefix="quantbench-") as tmp:
            recorder.set_tags({"primary_metric": task.primary_metric})
            ctx = Context(task=task, scheme=tree["scheme"], qat_recipe=qat_recipe, engine=engine,
                          settings=settings, workdir=Path(tmp), recorder=recorder)
            metrics = execute(ctx)
    except BaseException as exc:
        line = recorder.fail(exc)
        if isinstance(exc, DataError):  # every run would fail the same way: stop here
            raise
        log.error("%s x %s FAILED: %s (run %s)", names["model"], names["scheme"], line, recorder.run_id)
        if not isinstance(exc, Exception):
            raise
        kind = "input" if isinstance(exc, BadInputError) else None
        return RunResult("FAILED", **names, config_hash=chash, run_id=recorder.run_id, error=line, error_kind=kind)
    recorder.finish()
    if env.is_main and qat_recipe.get("resume_dir") and tree["scheme"].get("qat"):
        shutil.rmtree(qat_recipe["resume_dir"], ignore_errors=True)  # recorded: nothing left to resume
    return RunResult("FINISHED", **names, config_hash=chash, run_id=recorder.run_id, metrics=metrics)
