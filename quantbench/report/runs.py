"""MLflow runs of one task -> a pandas DataFrame, one row per run.

Columns: ``run_id``, ``start_time``, ``status``, ``model``, ``scheme``, ``engine`` (``quantbench`` for
a run that logged none) with ``engine_status`` / ``engine_reason`` / ``engine_version`` (a peer's),
``model_name`` (the display name), ``method``, ``primary_metric``, the tags
``sweep``, ``config_hash`` and ``git_sha``, ``force`` (``run.force``), ``params``
(the logged params, a dict) and one column per logged metric under its own key
(``float/top1``, ``onnx/top1``, ...). Which runs a report or gate reads is
decided in :mod:`quantbench.report.record` (one sweep's); :func:`latest` keeps
the newest run of each model x scheme of a frame. A sweep's parent run
(``quantbench.kind=sweep``: it only groups the sweep's runs in the MLflow UI) is
never a row.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pandas as pd
from omegaconf import OmegaConf

from quantbench.harness.config import compose_config, first_job_overrides
from quantbench.harness.preflight import sweep_file
from quantbench.harness.tracking import Store, is_sweep_parent

__all__ = ["BASE_COLUMNS", "NATIVE_ENGINE", "engine_of", "is_unsupported", "latest", "load_runs", "order_rows",
           "task_store"]

#: The engine of a run that logged none (before engines were an axis): quantbench's own.
NATIVE_ENGINE = "quantbench"

BASE_COLUMNS = ("run_id", "start_time", "status", "error", "model", "scheme", "engine", "engine_status",
                "engine_reason", "engine_version", "engine_notes", "model_name", "method",
                "primary_metric", "sweep", "config_hash", "git_sha", "force", "params")


def task_store(task: str, overrides: Iterable[str] = (), *, grid: str | None = None) -> tuple[Store, str]:
    """The store and experiment name of ``task`` (its named ``grid``), as its sweep config resolves them
    (sweep overrides such as ``scheme=a,b`` are fine: the first job's config names the store). A named
    grid's sweep file gives it an experiment of its own (``digits_hard``)."""
    name = sweep_file(task, grid).name
    cfg = compose_config(first_job_overrides([f"sweep={name}", *overrides]))
    tracking = OmegaConf.to_container(cfg.tracking, resolve=True)
    return Store.from_config(tracking), str(tracking["experiment"])


def load_runs(store: Store, experiment: str) -> pd.DataFrame:
    """Every run of ``experiment`` (newest first) as a DataFrame; sweeps' parent runs are not runs of record."""
    rows = []
    for run in store.search("", [experiment]):
        if is_sweep_parent(run):  # Store.search leaves them out already; a parent is never a result
            continue
        tags, params = run.data.tags, run.data.params
        rows.append({
            "run_id": run.info.run_id,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
            "status": tags.get("status", run.info.status),
            "error": tags.get("error", ""),
            "model": tags.get("model", params.get("model.name", "")),
            "scheme": tags.get("scheme", params.get("scheme.name", "")),
            "engine": tags.get("engine", params.get("engine.name", NATIVE_ENGINE)),
            "engine_status": tags.get("engine_status", ""),
            "engine_reason": tags.get("engine_reason", ""),
            "engine_version": tags.get("engine_version", ""),
            "engine_notes": tags.get("engine_notes", ""),
            "model_name": params.get("model.display_name") or tags.get("model", ""),
            "method": params.get("scheme.method") or tags.get("scheme", ""),
            "primary_metric": tags.get("primary_metric", "top1"),
            "sweep": tags.get("sweep", ""),
            "config_hash": tags.get("config_hash", ""),
            "git_sha": tags.get("git_sha", ""),
            "force": params.get("run.force") == "True",
            "params": dict(params),
            **run.data.metrics,
        })
    return pd.DataFrame(rows, columns=None if rows else list(BASE_COLUMNS))


def engine_of(row_or_value: Any) -> str:
    """The engine of a run row (or of an ``engine`` value): quantbench's own where none is named."""
    value = row_or_value.get("engine") if isinstance(row_or_value, (pd.Series, dict)) else row_or_value
    return value if isinstance(value, str) and value else NATIVE_ENGINE


def is_unsupported(row: Any) -> bool:
    """A peer engine's run of a scheme it cannot express (``engine_status=unsupported``): no metrics."""
    return row.get("engine_status") == "unsupported"


def latest(runs: pd.DataFrame, *, finished_only: bool = True) -> pd.DataFrame:
    """The newest run per model x scheme (of the FINISHED ones when ``finished_only``)."""
    if finished_only:
        runs = runs[runs["status"] == "FINISHED"]
    return runs.sort_values("start_time", ascending=False).drop_duplicates(["model", "scheme"])


def order_rows(runs: pd.DataFrame, models: Sequence[str], schemes: Sequence[str]) -> pd.DataFrame:
    """Rows in sweep order (models, then schemes, as conf/sweep lists them); others after, by name."""
    def rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
        return values.map({v: i for i, v in enumerate(order)}).fillna(len(order))

    keyed = runs.assign(_m=rank(runs["model"], models), _s=rank(runs["scheme"], schemes))
    return keyed.sort_values(["_m", "model", "_s", "scheme"]).drop(columns=["_m", "_s"])
