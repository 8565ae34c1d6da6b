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

A shared tracking server (``tracking.uri=http://...``, ``make server``) is
checked before anything runs, so a server that is down costs one line, not a
retry loop. Several processes may log to one sqlite store at once: the first
to open it creates the schema under a file lock. Artifact names are confined
to the run's artifact directory, and a full disk is reported as such.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import subprocess
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantbench.errors import ArtifactWriteError, BadInputError, TrackingUnavailableError, one_line
from quantbench.harness.liveness import Heartbeat, process_tags, stale_reason
from quantbench.harness.paths import check_tracking_uri, project_root
from quantbench.harness.schema import HASH_EXCLUDE
from quantbench.quiet import quiet_logger, quiet_warning

__all__ = [
    "NullRecorder",
    "RunRecorder",
    "Store",
    "config_hash",
    "error_line",
    "flatten",
    "git_sha",
    "hashed",
    "project_root",
    "run_exclude",
    "run_hash",
    "safe_artifact_path",
    "store_location",
]

log = logging.getLogger(__name__)

# MLflow logs "Creating initial MLflow database tables..." / "Updating database tables" at INFO each
# time a process opens a new sqlite store (the sweep, then its first job): nothing to act on.
quiet_logger("mlflow.store.db.utils")
quiet_logger("alembic")
# SQLAlchemy deprecates a loader option MLflow's store still uses; only MLflow can change it.
quiet_warning(r"The ``noload`` loader strategy is deprecated")

_BATCH = 100  # MLflow's log_batch takes at most 100 params / tags per call
_MAX_PARAM = 6000  # MLflow's limit on a param value
_MAX_TAG_ERROR = 500


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def store_location(tracking: Mapping[str, Any]) -> tuple[str, str | None]:
    """The tracking URI and the artifact root URI of a ``tracking`` config node.

    ``None`` values default to ``<project>/mlruns/mlflow.db`` and
    ``<project>/mlruns/artifacts``; a relative ``artifact_root`` is taken
    relative to the current directory. With a tracking server and no
    ``artifact_root``, the root is ``None``: the server stores artifacts.
    """
    check_tracking_uri(tracking.get("uri"))
    mlruns = project_root() / "mlruns"
    uri = tracking.get("uri") or f"sqlite:///{mlruns / 'mlflow.db'}"
    root = tracking.get("artifact_root")
    if root is None and _is_http(uri):
        return uri, None
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
    kept = {k: v for k, v in flatten(tree).items() if hashed(k, exclude)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def hashed(key: str, exclude: tuple[str, ...] = ()) -> bool:
    """Whether the dotted ``key`` counts in :func:`config_hash` (not under ``HASH_EXCLUDE`` or ``exclude``)."""
    return not any(key == e or key.startswith(f"{e}.") for e in (*HASH_EXCLUDE, *exclude))


def run_exclude(tree: Mapping[str, Any]) -> tuple[str, ...]:
    """What a run of ``tree`` leaves out of its hash besides ``HASH_EXCLUDE``: a PTQ scheme ignores the QAT recipe."""
    return () if tree["scheme"]["qat"] else ("train.qat",)


def run_hash(tree: Mapping[str, Any]) -> str:
    """The ``config_hash`` tag of a run of the resolved ``tree``: the harness skips, resumes and reports by it."""
    return config_hash(tree, run_exclude(tree))


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


def error_line(exc: BaseException, typed: bool = True) -> str:
    """``Type: message`` on one line (the message alone for a bad input, or with ``typed=False``).

    An error that a DataLoader worker raised keeps its type but arrives as
    "Caught X in DataLoader worker ..." plus a traceback: :func:`quantbench.errors.one_line`
    recovers the original message.
    """
    text = one_line(exc)
    line = text if isinstance(exc, BadInputError) or not typed else f"{type(exc).__name__}: {text}"
    return line[:_MAX_TAG_ERROR]


def safe_artifact_path(name: str | None) -> str | None:
    """``name`` if it stays inside a run's artifact directory (relative, no ``..``), else ValueError."""
    if name is None:
        return None
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or name.startswith("~"):
        raise ValueError(f"artifact path {name!r} must be relative and stay inside the run's artifact "
                         "directory (no '..', no absolute path)")
    return name


def _disk_full(exc: OSError, name: str, root: str | None) -> ArtifactWriteError | None:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return ArtifactWriteError(f"no space left on the device writing artifact {name} under {root or 'the server'}: "
                              "free space, or point tracking.artifact_root at a larger disk")


@dataclass
class RunRecorder:
    """Writes one MLflow run: params, metrics, artifacts, and its end state."""

    client: MlflowClient
    run_id: str
    artifact_root: str | None = None
    heartbeat: Heartbeat | None = field(default=None, repr=False)

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
        """Copy ``path`` into the run's artifacts (under ``artifact_path``, which must stay inside them)."""
        artifact_path = safe_artifact_path(artifact_path)
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except OSError as exc:
            full = _disk_full(exc, Path(path).name, self.artifact_root)
            if full is None:
                raise
            raise full from exc

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as the artifact ``name`` (relative, inside the run's artifacts)."""
        try:
            self.client.log_text(self.run_id, text, safe_artifact_path(name))
        except OSError as exc:
            full = _disk_full(exc, name, self.artifact_root)
            if full is None:
                raise
            raise full from exc

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def finish(self) -> None:
        self._stop_heartbeat()
        self.set_tags({"status": "FINISHED"})
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> str:
        """Record ``exc`` (one-line ``error`` tag, ``error.txt`` traceback); returns the line.

        Recording the failure must not fail in turn: a traceback that cannot be
        written (the disk that broke the run is full) is skipped with a warning.
        """
        self._stop_heartbeat()
        line = error_line(exc)
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self.log_text("".join(traceback.format_exception(exc)), "error.txt")
        except (OSError, BadInputError, MlflowException) as write_error:
            log.warning("could not write error.txt for run %s: %s", self.run_id, error_line(write_error))
        tags = {"status": status, "error": line}
        if isinstance(exc, BadInputError):
            tags["error_kind"] = "input"
        self.set_tags(tags)
        self.client.set_terminated(self.run_id, status)
        return line


class NullRecorder:
    """What ranks other than 0 of a torchrun job record: nothing (rank 0 logs for all)."""

    run_id = None

    def log_params(self, params: Mapping[str, str]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def finish(self) -> None: ...

    def fail(self, exc: BaseException) -> str:
        return error_line(exc)


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming ``uri``, when the tracking server does not answer its health check."""
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingUnavailableError(f"tracking server {uri} is unreachable ({reason}): start it with `make server` "
                                   "or fix tracking.uri")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Store:
    """One MLflow store (tracking URI + artifact root) and its experiments."""

    def __init__(self, uri: str, artifact_root: str | None) -> None:
        if _is_http(uri):
            check_server(uri)
        self.uri = uri
        self.artifact_root = artifact_root.rstrip("/") if artifact_root else None
        if not uri.startswith("sqlite:///"):
            self.client = MlflowClient(tracking_uri=uri)
            return
        db = Path(uri.removeprefix("sqlite:///"))
        # Opening a new store creates its schema; parallel jobs that raced there would run
        # the same migrations twice and fail. One process at a time, under a file lock.
        with _file_lock(db.with_name(f".{db.name}.lock")):
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)

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
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None  # None: the server's store
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel job
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, experiment: str, name: str, tags: Mapping[str, str],
                  heartbeat_s: float = 0.0) -> RunRecorder:
        """A RUNNING record with this process's liveness tags, and its heartbeat (every ``heartbeat_s``)."""
        run = self.client.create_run(self.experiment_id(experiment), run_name=name,
                                     tags={**tags, **process_tags(), "status": "RUNNING"})
        run_id = run.info.run_id
        beat = Heartbeat(lambda: self.client.set_tag(run_id, "heartbeat", str(int(time.time() * 1000))),
                         heartbeat_s).start()
        return RunRecorder(self.client, run_id, self.artifact_root, beat)

    def reap_stale(self, experiment: str, chash: str | None = None, stale_after_s: float = 600.0) -> list[str]:
        """Mark RUNNING records whose process is gone FAILED (``error: killed: ...``); returns their ids."""
        where = "tags.status = 'RUNNING'" + (f" and tags.config_hash = '{chash}'" if chash else "")
        reaped = []
        for run in self.search(where, [experiment]):
            reason = stale_reason(run.data.tags, run.info.start_time or 0, stale_after_s)
            if reason is None:
                continue
            reaped.append(run.info.run_id)
            log.warning("%s x %s: stale RUNNING record %s: %s; marked FAILED", run.data.tags.get("model"),
                        run.data.tags.get("scheme"), run.info.run_id, reason)
            self.client.log_batch(run.info.run_id, tags=[RunTag("status", "FAILED"), RunTag("error", reason),
                                                         RunTag("error_kind", "killed")])
            self.client.set_terminated(run.info.run_id, "FAILED")
        return reaped

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
