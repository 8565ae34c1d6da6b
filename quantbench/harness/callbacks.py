"""A progress bar over a Hydra multirun, as a Hydra callback.

Configured in ``conf/config.yaml`` under ``hydra.callbacks``, so any
``--multirun`` of quantbench shows it, whether started by ``quantbench sweep``
or by Hydra directly. It is quiet under ``CI=true``. With a launcher that runs
jobs in other processes (joblib), ``on_job_end`` fires there and the bar only
shows the start.
"""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm

from quantbench.progress import progress_disabled

__all__ = ["SweepProgress", "count_jobs"]


def count_jobs(params: dict[str, str] | None, overrides: list[str]) -> int | None:
    """How many jobs Hydra's basic sweeper makes of ``hydra.sweeper.params`` + command-line overrides.

    Mirrors the sweeper: a command-line key replaces the same key from
    ``params``; the job count is the product of the value counts. ``None``
    when an override cannot be counted without the config loader (glob).
    """
    parser = OverridesParser.create()
    sizes: dict[str, int] = {}
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    try:
        for override in parser.parse_overrides(lines):
            key = override.get_key_element()
            sizes[key] = len(list(override.sweep_string_iterator())) if override.is_discrete_sweep() else 1
    except Exception:  # a glob sweep needs the config loader; the bar then runs without a total
        return None
    return math.prod(sizes.values())


class SweepProgress(Callback):
    """One tick per finished job, with the last job's model x scheme and status."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params")
        total = count_jobs(dict(params) if params else None, list(config.hydra.overrides.task))
        self._bar = tqdm(total=total, desc=f"sweep {config.tracking.sweep_id}", unit="run",
                         disable=progress_disabled(), dynamic_ncols=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._bar is None:
            return
        result = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        status = getattr(result, "status", job_return.status.name)
        self._bar.set_postfix_str(f"{config.model.name} x {config.scheme.name}: {status}")
        self._bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
