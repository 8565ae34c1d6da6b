"""MLflow tracking: the store, one experiment per task, one run per model x scheme.

The store is a real sqlite database (``mlruns/mlflow.db`` in the project by
default) with artifacts in a folder beside it. Both are set explicitly: MLflow
3 refuses its old file store by default, and without an explicit artifact
location artifacts would land in ``./mlruns`` of whatever directory a run
happens to start in.

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run
ids rather than the fluent ``mlflow.start_run`` API: a Hydra multirun executes
many runs in one process, and explicit ids cannot leak an active run from a
failed job into the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantbench.harness.schema import HASH_EXCLUDE

__all__ = [
    "RunRecorder",
    "Store",
    "config_hash",
    "flatten",
    "git_sha",
    "project_root",
    "store_location",
]

log = logging.getLogger(__name__)

_BATCH = 100  # MLflow's log_batch takes at most 100 params / tags per call
_MAX_PARAM = 6000  # MLflow's limit on a param value
_MAX_TAG_ERROR = 500


def project_root() -> Path:
    """The checkout that holds ``conf/`` and ``mlruns/`` (the parent of the package)."""
    return Path(__file__).resolve().parents[2]


def store_location(tracking: Mapping[str, Any]) -> tuple[str, str]:
    """The tracking URI and the artifact root URI of a ``tracking`` config node.

    ``None`` values default to ``<project>/mlruns/mlflow.db`` and
    ``<project>/mlruns/artifacts``; a relative ``artifact_root`` is taken
    relative to the current directory.
    """
    mlruns = project_root() / "mlruns"
    uri = tracking.get("uri") or f"sqlite:///{mlruns / 'mlflow.db'}"
    root = tracking.get("artifact_root")
    if root is None:
        db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
        root = str(Path(db).parent / "artifacts") if db else str(mlruns / "artifacts")
    if "://" not in root:
        root = Path(root).resolve().as_uri()
    return uri, root


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values for every leaf (lists stay one leaf)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


def config_hash(tree: Mapping[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of what a run computes (``HASH_EXCLUDE`` and ``exclude`` left out).

    Two runs with the same hash measure the same thing, so resume may skip the
    second one.
    """
    skip = (*HASH_EXCLUDE, *exclude)
    kept = {k: v for k, v in flatten(tree).items() if not any(k == e or k.startswith(f"{e}.") for e in skip)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def git_sha() -> str:
    """The checkout's commit (``+dirty`` when it has local changes), or ``unknown``."""
    root = project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def _chunks(items: list, n: int = _BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


@dataclass
class RunRecorder:
    """Writes one MLflow run: params, metrics, artifacts, and its end state."""

    client: MlflowClient
    run_id: str

    def log_params(self, params: Mapping[str, str]) -> None:
        for chunk in _chunks([Param(k, v) for k, v in params.items()]):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(rows, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for chunk in _chunks([RunTag(k, str(v)) for k, v in tags.items()]):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self) -> None:
        self.set_tags({"status": "FINISHED"})
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> str:
        """Record ``exc`` (one-line ``error`` tag, ``error.txt`` traceback); returns the line."""
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:_MAX_TAG_ERROR]
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self.log_text("".join(traceback.format_exception(exc)), "error.txt")
        self.set_tags({"status": status, "error": line})
        self.client.set_terminated(self.run_id, status)
        return line


class Store:
    """One MLflow store (tracking URI + artifact root) and its experiments."""

    def __init__(self, uri: str, artifact_root: str) -> None:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.artifact_root = artifact_root.rstrip("/")
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def from_config(cls, tracking: Mapping[str, Any]) -> Store:
        return cls(*store_location(tracking))

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The id of experiment ``name``, created (or restored) on first use."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted" and create:
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(name, artifact_location=f"{self.artifact_root}/{name}")
        except MlflowException:  # created meanwhile by a parallel job
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, experiment: str, name: str, tags: Mapping[str, str]) -> RunRecorder:
        run = self.client.create_run(self.experiment_id(experiment), run_name=name,
                                     tags={**tags, "status": "RUNNING"})
        return RunRecorder(self.client, run.info.run_id)

    def search(self, filter_string: str, experiments: list[str] | None = None) -> list[Run]:
        """All runs matching ``filter_string``, newest first, over ``experiments`` (default: all)."""
        if experiments is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            ids = [i for i in (self.experiment_id(n, create=False) for n in experiments) if i]
        if not ids:
            return []
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(ids, filter_string, max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def find_finished(self, experiment: str, chash: str) -> Run | None:
        """The newest FINISHED run of ``experiment`` whose config hash is ``chash``."""
        runs = self.search(f"tags.config_hash = '{chash}' and tags.status = 'FINISHED'", [experiment])
        return runs[0] if runs else None

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        """Every run tagged with ``sweep_id``, in any experiment."""
        return self.search(f"tags.sweep = '{sweep_id}'")
