"""``quantbench sweep TASK [--grid GRID]``: a real Hydra ``--multirun`` over conf/sweep/<TASK>.yaml (or the
task's named grid, conf/sweep/<TASK>_<GRID>.yaml), then a verdict.

Hydra aborts a multirun when a job raises, so jobs never raise: each records
its failure in MLflow (see :func:`quantbench.harness.run.run`). This module
adds the step Hydra cannot: after the multirun it asks the store which runs of
this sweep id FAILED, so the command exits non-zero and names them, while
every finished run stays recorded.

Jobs run on a Hydra launcher plugin, never a scheduler of our own:
``conf/hydra/launcher/basic`` (one after the other), ``parallel`` (joblib:
``--jobs N`` processes on this machine, each with cores / N threads),
``slurm`` (submitit on a SLURM cluster) and ``slurm_local`` (submitit's local
executor: the SLURM code path on this machine). Before launching, the first
job's config is checked (a typo, an unreachable tracking server, a device that
is not there: one line, exit 2), the store is created once (parallel jobs
would race to create its schema), and RUNNING records left by a killed sweep
are marked FAILED, so the jobs redo them. A local parallel sweep also puts
QAT jobs first and trains missing float baselines with every core before the
jobs start (:mod:`quantbench.harness.warmup`).

Each sweep id has one *parent run* in the sweep's experiment (tags ``sweep=<id>``,
``quantbench.kind=sweep``; the task, the grid and the overrides as params, tags and
``sweep.yaml``), created by the first invocation and reused when the same ``--id`` runs
again. Every job gets its id as ``tracking.parent_run`` (left out of the config hash, like
all of ``tracking``) and is tagged ``mlflow.parentRunId``, so the MLflow UI nests a sweep's
runs under it. It ends FINISHED when every job finished or was skipped, FAILED when one
failed, KILLED on Ctrl-C, with the counts as metrics (``runs_finished``, ``runs_failed``,
``runs_skipped``, ``jobs``). It is never a result: the store's searches leave it out.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import yaml
from omegaconf import OmegaConf

from quantbench.errors import ArtifactWriteError, UsageError
from quantbench.harness.callbacks import count_jobs
from quantbench.harness.config import CONF_DIR, compose_config, first_job_overrides, resolve_tree
from quantbench.harness.preflight import check_group_values, check_overrides, parse, sweep_file
from quantbench.harness.run import build_task, check_config, resolve_threads
from quantbench.harness.tracking import RunRecorder, Store, error_line
from quantbench.harness.warmup import longest_first, sweep_values, warm_baselines

__all__ = ["LAUNCHERS", "SweepOutcome", "UsageError", "launch", "launcher_overrides", "sweep"]

#: ``--launcher`` names: files of conf/hydra/launcher.
LAUNCHERS = ("basic", "parallel", "slurm", "slurm_local")

log = logging.getLogger(__name__)

_SWEEP_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_CLOCK_SLACK_MS = 1000  # runs on other nodes stamp their start with their own clocks


@dataclass
class SweepOutcome:
    """The end of a sweep: Hydra's exit status and the runs this sweep id wrote."""

    sweep_id: str
    exit_code: int
    jobs: int | None = None
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (label, error, run id)
    bad_input: bool = False  # a run failed on a bad input (a full disk): exit status 2

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.failed

    @property
    def skipped(self) -> int | None:
        """Jobs that found their run already FINISHED in the store (resume)."""
        if self.jobs is None or self.exit_code:
            return None
        return self.jobs - len(self.finished) - len(self.failed)


def launch(argv: Sequence[str]) -> int:
    """Run the Hydra entry point in this process with ``argv``; returns its exit status.

    In-process (rather than a subprocess) so torch and the engine are imported
    once; Hydra reads its command line from ``sys.argv``, which is restored.
    """
    from quantbench.harness.main import main

    saved = sys.argv
    sys.argv = ["quantbench", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


_PLUGINS = {"parallel": "hydra_plugins.hydra_joblib_launcher", "slurm": "hydra_plugins.hydra_submitit_launcher",
            "slurm_local": "hydra_plugins.hydra_submitit_launcher"}


def launcher_overrides(jobs: int, launcher: str | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """Hydra overrides for the launcher: ``basic`` for one job at a time, ``parallel`` (joblib) beyond.

    With ``jobs`` > 1 on this machine, each job gets cores / jobs threads
    (``run.threads``) unless the overrides set them: n jobs of c threads on c
    cores would only fight over them.
    """
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: needs at least 1")
    launcher = launcher or ("parallel" if jobs > 1 else "basic")
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {launcher}: unknown; known: {', '.join(LAUNCHERS)}")
    if launcher in _PLUGINS and importlib.util.find_spec(_PLUGINS[launcher]) is None:
        raise UsageError(f"--launcher {launcher} needs the Hydra plugin {_PLUGINS[launcher]}: make install "
                         "(hydra-joblib-launcher, hydra-submitit-launcher), or use JOBS=1")
    out = [f"hydra/launcher={launcher}"]
    if launcher == "basic" and jobs > 1:
        raise UsageError(f"--jobs {jobs} with --launcher basic: the basic launcher runs one job at a time")
    if launcher == "parallel":
        out.append(f"hydra.launcher.n_jobs={jobs}")
        if not any(o.split("=", 1)[0].lstrip("+~") == "run.threads" for o in overrides):
            out.append(f"run.threads={max(1, resolve_threads(0) // jobs)}")
    return out


def _collect(outcome: SweepOutcome, store: Store, since_ms: int) -> SweepOutcome:
    """What this invocation recorded under its sweep id (runs started since ``since_ms``), newest per config.

    A sweep rerun under the same id after a kill does not count the earlier
    invocation's runs again, nor the stale record it marked FAILED.
    """
    seen: set[str] = set()
    for run in store.sweep_runs(outcome.sweep_id):  # newest first
        if (run.info.start_time or 0) < since_ms:
            continue
        tags = run.data.tags
        key = tags.get("config_hash") or run.info.run_id
        if key in seen:
            continue
        seen.add(key)
        label = f"{tags.get('model')} x {tags.get('scheme')}" + (
            f" x {tags['engine']}" if tags.get("engine", "quantbench") != "quantbench" else "")
        if tags.get("status") == "FINISHED":
            outcome.finished.append(label)
        elif tags.get("status") in ("FAILED", "KILLED"):
            outcome.failed.append((label, tags.get("error", ""), run.info.run_id))
            outcome.bad_input |= tags.get("error_kind") == "input"
    return outcome


def _start_parent(store: Store, experiment: str, sweep_id: str, task: str, grid_file: str,
                  overrides: Sequence[str], params: dict, jobs: int, launcher: Sequence[str]) -> RunRecorder:
    """The sweep's parent run (created, or reused for the same id), RUNNING, with what this invocation runs:
    the task, the sweep file (``grid``) and its lists (``grid.model``, ``grid.scheme``), the overrides."""
    grid_lists = {f"grid.{k}": str(v) for k, v in params.items()}
    joined = " ".join(overrides)
    launcher_name = next((o.split("=", 1)[1] for o in launcher if o.startswith("hydra/launcher=")), "basic")
    parent = store.start_sweep(experiment, sweep_id,
                               tags={"task": task, "grid": grid_file, "overrides": joined[:5000], "jobs": str(jobs),
                                     "launcher": launcher_name},
                               params={"task": task, "grid": grid_file, "overrides": joined[:6000], **grid_lists})
    text = yaml.safe_dump({"sweep_id": sweep_id, "task": task, "grid": grid_file, "grid_lists": grid_lists,
                           "overrides": list(overrides), "jobs": jobs, "launcher": list(launcher)}, sort_keys=False)
    try:
        parent.log_text(text, "sweep.yaml")
    except ArtifactWriteError as exc:  # a full disk fails the jobs' runs, each in one line; this is a note
        log.warning("sweep %s: sweep.yaml not written: %s", sweep_id, exc)
    return parent


def _end_parent(parent: RunRecorder, outcome: SweepOutcome) -> None:
    parent.log_metrics({"jobs": outcome.jobs or 0, "runs_finished": len(outcome.finished),
                        "runs_failed": len(outcome.failed), "runs_skipped": outcome.skipped or 0})
    status = "FINISHED" if outcome.ok else "FAILED"
    error = {} if outcome.ok else {"error": (f"{len(outcome.failed)} of {outcome.jobs} runs FAILED" if outcome.failed
                                            else f"the multirun exited with status {outcome.exit_code}")}
    parent.end(status, error)


def sweep(task: str, overrides: Sequence[str] = (), *, jobs: int = 1, sweep_id: str | None = None,
          launcher: str | None = None, grid: str | None = None) -> SweepOutcome:
    """Run the sweep of ``task`` (its named ``grid``: ``conf/sweep/<task>_<grid>.yaml``) with extra Hydra
    ``overrides`` and collect what it recorded. The default sweep id names the sweep file
    (``digits-<time>``, ``digits_hard-<time>``).

    Raises:
        UsageError: unknown task, grid or launcher, bad sweep id or ``jobs``.
        BadInputError: the first job's config asks for a missing device or
            foreign code, or its tracking server does not answer.
    """
    name = sweep_file(task, grid).name
    sweep_id = sweep_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _SWEEP_ID.match(sweep_id):
        raise UsageError(f"sweep id {sweep_id!r}: use letters, digits, '.', '_' and '-' only")
    base = [f"sweep={name}", f"tracking.sweep_id={sweep_id}", *overrides]
    hydra_launcher = launcher_overrides(jobs, launcher, overrides)
    # Check every swept value and compose the first job up front: a typo fails here, before anything
    # runs, and the composed tracking node says which store to ask for failures afterwards.
    configs = check_overrides(base)
    first = compose_config(first_job_overrides(base), hydra_config=True)
    replaced = {o.key_or_group for o in parse(list(overrides))}  # a list the overrides replace never runs
    for group, values in (first.hydra.sweeper.params or {}).items():  # the sweep file's own lists
        if (CONF_DIR / str(group)).is_dir() and str(group) not in replaced:
            check_group_values(str(group), [v.strip() for v in str(values).split(",")])
    check_config(resolve_tree(configs[0]))
    # Build the task of each checked job: a value the task refuses (data.on_corrupt=skipp) stops the
    # sweep with one line before anything runs or is recorded.
    for config in configs:
        build_task(resolve_tree(config))
    tracking = OmegaConf.to_container(first.tracking, resolve=True)
    store = Store.from_config(tracking)  # a server that is down fails here; a new sqlite store is created once
    experiment = str(tracking["experiment"])
    store.experiment_id(experiment)
    store.reap_stale(experiment, stale_after_s=float(tracking["stale_after_s"]))
    store.reap_stale_parents(experiment)
    params = dict(first.hydra.sweeper.params or {})
    total = count_jobs(params or None, base)
    parent = _start_parent(store, experiment, sweep_id, task, name, overrides, params, jobs, hydra_launcher)
    base = [*base, f"tracking.parent_run='{parent.run_id}'"]  # quoted: an id of digits is still a string
    try:
        if "hydra/launcher=parallel" in hydra_launcher:  # N jobs on this machine: see quantbench.harness.warmup
            values = sweep_values(params, base)
            base = [*base, *longest_first(values, first_job_overrides(base))]
            warm_baselines(first_job_overrides(base), values, store, jobs)
        since_ms = int(time.time() * 1000) - _CLOCK_SLACK_MS
        code = launch(["--multirun", *hydra_launcher, *base])
        outcome = _collect(SweepOutcome(sweep_id, code, total), store, since_ms)
    except BaseException as exc:
        try:
            parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", {"error": error_line(exc)})
        except Exception as end_error:  # the error that stopped the sweep is the one to report
            log.warning("could not end the parent run %s of sweep %s: %s", parent.run_id, sweep_id,
                        error_line(end_error))
        raise
    _end_parent(parent, outcome)
    return outcome
