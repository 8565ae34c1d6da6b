"""``quantbench sweep TASK``: a real Hydra ``--multirun`` over conf/sweep/<TASK>.yaml, then a verdict.

Hydra aborts a multirun when a job raises, so jobs never raise: each records
its failure in MLflow (see :func:`quantbench.harness.run.run`). This module
adds the step Hydra cannot: after the multirun it asks the store which runs of
this sweep id FAILED, so the command exits non-zero and names them, while
every finished run stays recorded.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from omegaconf import OmegaConf

from quantbench.harness.config import CONF_DIR, compose_config, first_job_overrides, known_options
from quantbench.harness.progress import count_jobs
from quantbench.harness.tracking import Store

__all__ = ["SweepOutcome", "UsageError", "launch", "launcher_overrides", "sweep"]

_SWEEP_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class UsageError(ValueError):
    """A bad command line; the message names the culprit and the fix."""


@dataclass
class SweepOutcome:
    """The end of a sweep: Hydra's exit status and the runs this sweep id wrote."""

    sweep_id: str
    exit_code: int
    jobs: int | None = None
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (label, error, run id)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.failed

    @property
    def skipped(self) -> int | None:
        """Jobs that found their run already FINISHED in the store (resume)."""
        return None if self.jobs is None else self.jobs - len(self.finished) - len(self.failed)


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


def launcher_overrides(jobs: int) -> list[str]:
    """Hydra overrides for ``jobs`` parallel jobs: the basic launcher for 1, joblib beyond."""
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: needs at least 1")
    if jobs == 1:
        return ["hydra/launcher=basic"]
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        raise UsageError(f"--jobs {jobs} (JOBS={jobs}) needs the joblib launcher: pip install "
                         "hydra-joblib-launcher, or use JOBS=1 (sequential)")
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]


def _check_task(task: str) -> None:
    if not (CONF_DIR / "sweep" / f"{task}.yaml").is_file():
        raise UsageError(f"no sweep for task {task!r} (conf/sweep/{task}.yaml); known: "
                         f"{', '.join(known_options('sweep'))}")


def sweep(task: str, overrides: Sequence[str] = (), *, jobs: int = 1, sweep_id: str | None = None) -> SweepOutcome:
    """Run the sweep of ``task`` with extra Hydra ``overrides`` and collect what it recorded.

    Raises:
        UsageError: unknown task, bad sweep id or ``jobs``.
    """
    _check_task(task)
    sweep_id = sweep_id or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _SWEEP_ID.match(sweep_id):
        raise UsageError(f"sweep id {sweep_id!r}: use letters, digits, '.', '_' and '-' only")
    base = [f"sweep={task}", f"tracking.sweep_id={sweep_id}", *overrides]
    # Compose the first job up front: a typo fails here, before anything runs, and
    # the composed tracking node says which store to ask for failures afterwards.
    first = compose_config(first_job_overrides(base), hydra_config=True)
    tracking = OmegaConf.to_container(first.tracking, resolve=True)
    params = first.hydra.sweeper.params
    total = count_jobs(dict(params) if params else None, base)
    code = launch(["--multirun", *launcher_overrides(jobs), *base])
    outcome = SweepOutcome(sweep_id, code, total)
    for run in Store.from_config(tracking).sweep_runs(sweep_id):
        tags = run.data.tags
        label = f"{tags.get('model')} x {tags.get('scheme')}"
        if tags.get("status") == "FINISHED":
            outcome.finished.append(label)
        elif tags.get("status") in ("FAILED", "KILLED"):
            outcome.failed.append((label, tags.get("error", ""), run.info.run_id))
    return outcome
