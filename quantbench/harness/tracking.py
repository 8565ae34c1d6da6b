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

What the MLflow UI shows beyond params and metrics: a run's ONNX export is an
MLflow 3 LoggedModel (``mlflow.onnx`` flavor, a signature from onnxruntime) that
the run outputs (:meth:`RunRecorder.log_onnx_model`: the Models column, the
registry); the data sets it reads are its inputs (:func:`data_inputs`: the
Dataset column); a sweep's runs are children (``mlflow.parentRunId``) of one
parent run per sweep id (:meth:`Store.start_sweep`, ``quantbench.kind=sweep``),
which :meth:`Store.search` leaves out: a parent is never a result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # registered at import
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantbench.engine.machine import describe as describe_machine
from quantbench.errors import ArtifactWriteError, BadInputError, TrackingUnavailableError, one_line
from quantbench.harness.liveness import HOST, Heartbeat, process_alive, process_tags, stale_reason
from quantbench.harness.paths import check_tracking_uri, project_root
from quantbench.harness.schema import HASH_EXCLUDE
from quantbench.quiet import quiet_logger, quiet_warning

__all__ = [
    "KIND_TAG",
    "NullRecorder",
    "PARENT_TAG",
    "RunRecorder",
    "SWEEP_KIND",
    "Store",
    "TIMED_PREFIXES",
    "config_hash",
    "data_inputs",
    "error_line",
    "flatten",
    "git_sha",
    "hashed",
    "is_sweep_parent",
    "is_timed",
    "machine_tags",
    "onnx_signature",
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

#: The tag that tells a sweep's parent run (``quantbench.kind=sweep``) from the runs of record; a parent
#: only groups its sweep's runs in the UI and is never read as a result.
KIND_TAG = "quantbench.kind"
SWEEP_KIND = "sweep"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID): the UI nests by it


#: Metric prefixes measured in wall-clock time (and ratios of such times): they differ between two runs of
#: one config and seed, everything else a run logs is computed and repeats exactly.
TIMED_PREFIXES = ("time/", "latency/", "qat/seconds", "deploy/speedup_", "deploy/ov_speedup_", "deploy/ort_",
                  "deploy/ov_")


def is_timed(metric: str) -> bool:
    """Whether ``metric`` is a wall-clock measurement (:data:`TIMED_PREFIXES`), not a computed result."""
    return metric.startswith(TIMED_PREFIXES)


def is_sweep_parent(run: Run) -> bool:
    """Whether ``run`` is a sweep's parent run (``quantbench.kind=sweep``), not a run of a model x scheme."""
    return run.data.tags.get(KIND_TAG) == SWEEP_KIND


def machine_tags() -> dict[str, str]:
    """The machine a run measures on (:func:`quantbench.engine.machine.describe`), as the tags every run
    carries: ``machine.cpu``, ``machine.cores`` (logical CPUs), ``machine.cpus_allowed`` (this process's),
    ``machine.isa`` (its int8-relevant extensions, comma-joined: ``avx2,avx512f,avx512_vnni``; ``none``)."""
    m = describe_machine()
    return {"machine.cpu": m.cpu, "machine.cores": str(m.cores), "machine.cpus_allowed": str(m.cpus_allowed),
            "machine.isa": ",".join(m.isa) or "none"}


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
    """What a run of ``tree`` leaves out of its hash besides ``HASH_EXCLUDE``: a PTQ scheme ignores the QAT
    recipe, and quantbench's own engine leaves the hash as it was before engines were an axis (so the runs
    of record made then still count; ``engine.options`` are the peers'); so does ``run.runtime=ort``, the
    default (``openvino`` and ``both`` measure more, so they hash apart), and ``run.unsigned_weights=null``."""
    out = () if tree["scheme"]["qat"] else ("train.qat",)
    if (tree.get("engine") or {}).get("name", "quantbench") == "quantbench":  # its options come from the scheme
        out += ("engine",)
    if (tree.get("run") or {}).get("runtime", "ort") == "ort":
        out += ("run.runtime",)
    if (tree.get("run") or {}).get("unsigned_weights") is None:  # per machine, as every run before it
        out += ("run.unsigned_weights",)
    return out


def run_hash(tree: Mapping[str, Any]) -> str:
    """The ``config_hash`` tag of a run of the resolved ``tree``: the harness skips, resumes and reports by it."""
    return config_hash(tree, run_exclude(tree))


#: Data keys that change how data is read, not which data: left out of a data set's digest.
_DATA_RUNTIME = ("num_workers", "on_corrupt", "eval_batch_size", "calib_batch_size", "root", "root_env")


def data_inputs(tree: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The data sets a run of the resolved ``tree`` reads, as :meth:`RunRecorder.log_dataset` arguments.

    ``<task>-<val split>`` (context ``eval``) and, when the scheme quantizes, ``<task>-<train split>``
    (context ``calibration``: the seeded ``calib_size`` subset of the training images). The source is the
    data root (``data.root``, else the ``data.root_env`` variable) as an absolute path; a config without
    one names its generator (``source_type="generator"``). The digest is a short hash of the data config
    (what is read, not where from or how fast), so it is cheap: no image is read.
    """
    data, task = tree["data"], str(tree["task"]["name"])
    root = data.get("root") or (os.environ.get(data["root_env"]) if data.get("root_env") else None)
    if root:
        source, source_type = str(Path(str(root)).expanduser().resolve()), None
    elif data.get("generate"):
        source, source_type = str(data["generate"]), "generator"
    else:  # no data located (a job that failed before it read any): say where it would come from
        source, source_type = f"${data['root_env']}" if data.get("root_env") else "data.root", "unresolved"
    kept = {k: v for k, v in data.items() if k not in _DATA_RUNTIME}

    def digest(context: str, split: str) -> str:
        payload = {"source": source, "context": context, "split": split, "data": kept}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]

    common = {"source": source, "source_type": source_type}
    extra = {"generator": data["generate"]} if data.get("generate") else {}
    val, train = str(data.get("val_split") or "val"), str(data.get("train_split") or "train")
    out = [{"name": f"{task}-{val}", "digest": digest("eval", val), "context": "eval", **common,
            "profile": {"split": val, "fraction": data.get("val_fraction", 1.0), **extra}}]
    if tree.get("scheme", {}).get("preset") is not None:  # a float run calibrates nothing
        out.append({"name": f"{task}-{train}", "digest": digest("calibration", train), "context": "calibration",
                    **common, "profile": {"split": train, "images": data.get("calib_size"),
                                          "seed": data.get("seed"), **extra}})
    return out


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


@contextlib.contextmanager
def _writing(name: str, root: str | None) -> Iterator[None]:
    """A full disk while writing artifact ``name`` becomes an :class:`ArtifactWriteError` (that run FAILED, the
    sweep goes on); any other error propagates as it is."""
    try:
        yield
    except OSError as exc:
        full = _disk_full(exc, name, root)
        if full is None:
            raise
        raise full from exc


def _local_dir(uri: str | None) -> Path | None:
    """The directory of a ``file:`` (or plain path) artifact location on this machine, else None (a server's)."""
    if not uri:
        return None
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        return Path(unquote(parsed.path)) if parsed.netloc in ("", "localhost") else None
    return Path(uri) if uri.startswith("/") else None


def _ort_probe(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # one call: setup time dominates
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _tensor_spec(meta: Any, value: Any) -> Any:
    """A TensorSpec named after the graph's input/output ``meta``: the dtype of ``value``, its shape with the
    batch dimension (and any other dimension the graph leaves symbolic) as -1."""
    import numpy as np
    from mlflow.types.schema import TensorSpec

    declared = list(meta.shape) if meta.shape is not None else [None] * value.ndim
    shape = tuple(-1 if i == 0 or not isinstance(d, int) else int(value.shape[i])
                  for i, d in enumerate(declared[:value.ndim]))
    return TensorSpec(np.dtype(value.dtype), shape, meta.name)


def onnx_signature(path: str | os.PathLike, example: Any) -> Any:
    """The MLflow ``ModelSignature`` of the ONNX model at ``path``, found by running it in onnxruntime on
    ``example`` (an array, or a sequence of arrays for a model of several inputs; its first sample only
    when the graph's batch is symbolic): each input and output by its graph name, with its dtype and its
    shape, the batch dimension as -1."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema

    session = _ort_probe(Path(path))
    arrays = [example] if not isinstance(example, (list, tuple)) else list(example)
    arrays = [np.ascontiguousarray(np.asarray(a)) for a in arrays]
    inputs = session.get_inputs()
    if len(arrays) != len(inputs):
        raise ValueError(f"{path}: the model takes {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs)}), the example has {len(arrays)}")
    if all(a.ndim and not isinstance((meta.shape or [1])[0], int) for meta, a in zip(inputs, arrays)):
        arrays = [a[:1] for a in arrays]  # a symbolic batch: one sample tells the types and shapes
    else:  # a fixed batch (a peer's static-graph export): the example's samples repeated to that size
        arrays = [np.resize(a, (meta.shape[0], *a.shape[1:])) if a.ndim and isinstance((meta.shape or [None])[0], int)
                  and meta.shape[0] > 0 and a.shape[0] != meta.shape[0] else a for meta, a in zip(inputs, arrays)]
    outputs = session.run(None, {meta.name: a for meta, a in zip(inputs, arrays)})
    return ModelSignature(
        inputs=Schema([_tensor_spec(meta, a) for meta, a in zip(inputs, arrays)]),
        outputs=Schema([_tensor_spec(meta, np.asarray(o)) for meta, o in zip(session.get_outputs(), outputs)]),
    )


class _NamedSource(DatasetSource):
    """A data set source that is a name, not a location: data a generator writes (``{"generator": "digits"}``)."""

    def __init__(self, kind: str, value: str) -> None:
        self.kind, self.value = kind, value

    def _get_source_type(self) -> str:  # type: ignore[override]  # per instance, unlike MLflow's own sources
        return self.kind

    def load(self) -> str:
        return self.value

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DatasetSource:
        raise NotImplementedError("a named source is never resolved from a raw value")

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.value}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DatasetSource:
        ((kind, value),) = source_dict.items()
        return cls(kind, value)


class _Dataset(MetaDataset):
    """An ``mlflow.data`` data set of metadata only (name, digest, source), with a profile (JSON)."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: Mapping[str, Any] | None) -> None:
        self._profile = dict(profile) if profile else None
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> Any:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        if self._profile:
            out["profile"] = json.dumps(self._profile, sort_keys=True, default=str)
        return out


def _dataset(name: str, source: str | os.PathLike, digest: str, profile: Mapping[str, Any] | None,
             source_type: str | None) -> _Dataset:
    """A local directory (or URI) as a ``local`` source, or a named source of ``source_type`` (a generator)."""
    if source_type is not None:
        return _Dataset(_NamedSource(source_type, str(source)), name, digest, profile)
    where = str(source)
    return _Dataset(LocalArtifactDatasetSource(where if "://" in where else str(Path(where).resolve())),
                    name, digest, profile)


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
        with _writing(Path(path).name, self.artifact_root):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` as the artifact ``name`` (relative, inside the run's artifacts)."""
        with _writing(name, self.artifact_root):
            self.client.log_text(self.run_id, text, safe_artifact_path(name))

    def log_onnx_model(self, path: str | os.PathLike, example: Any, *, name: str = "model") -> str:
        """Log the ONNX file at ``path`` as an MLflow model (``mlflow.onnx`` flavor) output by this run; returns
        its model id (``models:/<id>`` loads it; the registry can register it).

        Its signature comes from running the model on ``example`` (an array, or one per input) in onnxruntime:
        input and output names, dtypes and shapes, the batch dimension as -1. The model is an MLflow 3
        LoggedModel with this run as its source, created through this recorder's client (no active run, no
        global tracking URI: safe in a Hydra multirun and in joblib workers, with sqlite or a server). The
        file is written once: parsed and saved straight into a local artifact store, or saved to a temporary
        folder and uploaded to a server. A full disk is an :class:`ArtifactWriteError`, as for
        :meth:`log_artifact`; the LoggedModel is then marked FAILED and not linked to the run.
        """
        import mlflow.onnx
        import onnx
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        path = Path(path)
        signature = onnx_signature(path, example)
        proto = onnx.load(str(path), load_external_data=False)
        external = any(uses_external_data(t) for t in proto.graph.initializer)  # over 2 GB: stays external
        if external:
            load_external_data_for_model(proto, str(path.parent))
        run = self.client.get_run(self.run_id)
        tags = {k: run.data.tags[k] for k in ("task", "model", "scheme", "engine", "sweep", "config_hash")
                if k in run.data.tags}
        model = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                tags=tags, model_type="onnx")
        local = _local_dir(model.artifact_location)
        try:
            meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=self.run_id,
                         model_id=model.model_id)
            with _writing(f"{name} ({path.name})", self.artifact_root), \
                    tempfile.TemporaryDirectory(prefix="quantbench-model-") as tmp:
                target = local if local is not None else Path(tmp) / name
                mlflow.onnx.save_model(proto, str(target), mlflow_model=meta, signature=signature,
                                       pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                       save_as_external_data=external)
                if local is None:
                    self.client.log_model_artifacts(model.model_id, str(target))
        except BaseException:
            if local is not None:  # what a full disk let through: the space is better left to error.txt
                shutil.rmtree(local, ignore_errors=True)
            with contextlib.suppress(Exception):
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id

    def log_dataset(self, name: str, source: str | os.PathLike, digest: str, context: str = "eval",
                    profile: Mapping[str, Any] | None = None, *, source_type: str | None = None) -> None:
        """Record a data set as an input of this run (the UI's Dataset column): metadata only, never the data.

        ``source`` is a local directory (recorded as its absolute path, a ``local`` source) or a URI; with
        ``source_type`` (``"generator"``) it is a name of that kind instead. ``digest`` tells versions of the
        data apart (a short hash of its config); ``context`` (``eval``, ``calibration``) is the input's
        ``mlflow.data.context`` tag; ``profile`` is shown as the data set's profile (JSON).
        """
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entity = _dataset(name, source, digest, profile, source_type)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_data_inputs(self, tree: Mapping[str, Any]) -> None:
        """Log the data sets a run of the resolved ``tree`` reads (:func:`data_inputs`). A store that refuses
        one costs a warning, not the run: they describe the run, they are not its results."""
        for spec in data_inputs(tree):
            try:
                self.log_dataset(**spec)
            except MlflowException as exc:
                log.warning("could not log data set %s of run %s: %s", spec["name"], self.run_id, error_line(exc))

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def finish(self) -> None:
        self._stop_heartbeat()
        self.set_tags({"status": "FINISHED"})
        self.client.set_terminated(self.run_id, "FINISHED")

    def end(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        """End the run as ``status`` (FINISHED, FAILED, KILLED), its ``status`` tag and ``tags`` set first."""
        self._stop_heartbeat()
        self.set_tags({**(tags or {}), "status": status})
        self.client.set_terminated(self.run_id, status)

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

    def log_onnx_model(self, path: str | os.PathLike, example: Any, *, name: str = "model") -> None:
        return None

    def log_dataset(self, name: str, source: str | os.PathLike, digest: str, context: str = "eval",
                    profile: Mapping[str, Any] | None = None, *, source_type: str | None = None) -> None:
        return None

    def log_data_inputs(self, tree: Mapping[str, Any]) -> None: ...

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
                  heartbeat_s: float = 0.0, parent_run: str | None = None) -> RunRecorder:
        """A RUNNING record with this process's liveness tags, and its heartbeat (every ``heartbeat_s``);
        a child of ``parent_run`` (a sweep's parent run: the ``mlflow.parentRunId`` tag) when given."""
        parent = {PARENT_TAG: parent_run} if parent_run else {}
        run = self.client.create_run(self.experiment_id(experiment), run_name=name,
                                     tags={**tags, **parent, **process_tags(), **machine_tags(), "status": "RUNNING"})
        run_id = run.info.run_id
        beat = Heartbeat(lambda: self.client.set_tag(run_id, "heartbeat", str(int(time.time() * 1000))),
                         heartbeat_s).start()
        return RunRecorder(self.client, run_id, self.artifact_root, beat)

    def reap_stale(self, experiment: str, chash: str | None = None, stale_after_s: float = 600.0) -> list[str]:
        """Mark RUNNING records whose process is gone FAILED (``error: killed: ...``); returns their ids."""
        where = "tags.status = 'RUNNING'" + (f" and tags.config_hash = '{chash}'" if chash else "")
        reaped = []
        for run in self.search(where, [experiment]):  # never a sweep's parent run: see reap_stale_parents
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

    def reap_stale_parents(self, experiment: str) -> list[str]:
        """Mark the RUNNING parent runs of sweeps whose process on this host is gone (a sweep killed with
        SIGKILL) KILLED; returns their ids. A parent on another host is left alone: it has no heartbeat."""
        reaped = []
        for run in self.search(f"tags.status = 'RUNNING' and tags.`{KIND_TAG}` = '{SWEEP_KIND}'", [experiment],
                               parents=True):
            tags = run.data.tags
            if tags.get("host") != HOST or not tags.get("pid", "").isdigit():
                continue
            if process_alive(int(tags["pid"]), tags.get("pid_start", "")):
                continue
            reaped.append(run.info.run_id)
            self.client.log_batch(run.info.run_id, tags=[RunTag("status", "KILLED"), RunTag(
                "error", f"killed: its process {tags['pid']} on {HOST} is gone (the sweep never finished)")])
            self.client.set_terminated(run.info.run_id, "KILLED")
        return reaped

    def sweep_parent(self, experiment: str, sweep_id: str) -> Run | None:
        """The parent run of sweep ``sweep_id`` in ``experiment`` (the newest, if several), or None."""
        runs = self.search(f"tags.sweep = '{sweep_id}' and tags.`{KIND_TAG}` = '{SWEEP_KIND}'", [experiment],
                           parents=True)
        return runs[0] if runs else None

    def start_sweep(self, experiment: str, sweep_id: str, tags: Mapping[str, str],
                    params: Mapping[str, str]) -> RunRecorder:
        """The RUNNING parent run of sweep ``sweep_id`` (tags ``sweep`` and ``quantbench.kind=sweep``), created,
        or reused when the same id is run again. A reused parent keeps its params (MLflow never changes a
        param): only keys it lacks are added; ``tags`` (this invocation's) are replaced."""
        tags = {**tags, "sweep": sweep_id, KIND_TAG: SWEEP_KIND, **process_tags(), "status": "RUNNING"}
        parent = self.sweep_parent(experiment, sweep_id)
        if parent is None:
            run = self.client.create_run(self.experiment_id(experiment), run_name=sweep_id, tags=tags)
            recorder = RunRecorder(self.client, run.info.run_id, self.artifact_root)
            recorder.log_params(params)
            return recorder
        recorder = RunRecorder(self.client, parent.info.run_id, self.artifact_root)
        self.client.update_run(parent.info.run_id, status="RUNNING")
        recorder.set_tags(tags)
        if "error" in parent.data.tags:  # the previous invocation's
            self.client.delete_tag(parent.info.run_id, "error")
        recorder.log_params({k: v for k, v in params.items() if k not in parent.data.params})
        return recorder

    def search(self, filter_string: str, experiments: list[str] | None = None, *,
               parents: bool = False) -> list[Run]:
        """All runs matching ``filter_string``, newest first, over ``experiments`` (default: all).

        A sweep's parent run (``quantbench.kind=sweep``) groups its runs in the UI and is never a result:
        it is left out unless ``parents``.
        """
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
            runs.extend(run for run in page if parents or not is_sweep_parent(run))
            token = page.token
            if not token:
                return runs

    def find_finished(self, experiment: str, chash: str) -> Run | None:
        """The newest FINISHED run of ``experiment`` whose config hash is ``chash``."""
        runs = self.search(f"tags.config_hash = '{chash}' and tags.status = 'FINISHED'", [experiment])
        return runs[0] if runs else None

    def download_model(self, run_id: str, dst: str | os.PathLike, name: str = "model") -> Path:
        """The ONNX file of the model ``name`` that run ``run_id`` logged (:meth:`RunRecorder.log_onnx_model`),
        downloaded under ``dst``; FileNotFoundError when the run logged none."""
        from mlflow.artifacts import download_artifacts

        outputs = self.client.get_run(run_id).outputs
        models = [self.client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])]
        ready = [m for m in models if m.name == name and str(m.status) == "READY"]
        if not ready:
            raise FileNotFoundError(f"run {run_id} logged no model {name!r}")
        newest = max(ready, key=lambda m: m.creation_timestamp or 0)
        return Path(download_artifacts(artifact_uri=f"{newest.artifact_location}/model.onnx", dst_path=str(dst),
                                       tracking_uri=self.uri))

    def sweep_runs(self, sweep_id: str) -> list[Run]:
        """Every run tagged with ``sweep_id``, in any experiment (not its parent run)."""
        return self.search(f"tags.sweep = '{sweep_id}'")
