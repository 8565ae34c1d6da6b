"""The structured-config schema: one dataclass per config group, in Hydra's ConfigStore.

Every YAML file under ``conf/`` starts from a schema (its defaults list names
``base_<...>``), and the primary config is typed by :class:`QuantbenchConf`.
OmegaConf then refuses unknown keys and wrong types while Hydra composes, so a
typo such as ``scheme.calib_bacthes`` fails before any model is built, with the
key and the schema named in the message.

Each group's dataclass is owned by the code that reads it, and defined once:

* the harness's own groups here: ``task`` (:class:`TaskConf`), ``scheme``
  (:class:`SchemeConf`), ``tracking`` (:class:`TrackingConf`), ``run`` (:class:`RunConf`);
* ``model``: :class:`quantbench.training.ModelConfig`;
* ``data`` and ``train``: the classes each task kind registers with
  :data:`quantbench.training.TASK_KINDS` (``base_<kind>``, ``base_<kind>_train``).
  The task packages are found through the ``_target_`` of ``conf/task/*.yaml``
  and imported by name, as Hydra would import them to build the task.

The scheme's per-tensor overrides are generated from the engine's own
:class:`~quantbench.engine.spec.QuantizationSpec` fields, so the schema can
never drift from what the engine accepts.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from quantbench.engine.machine import require_openvino
from quantbench.engine.spec import QuantizationSpec
from quantbench.errors import ConfigError, UnsafeConfigError
from quantbench.registry import close_matches
from quantbench.training import TASK_KINDS, ModelConfig

__all__ = [
    "HASH_EXCLUDE",
    "TARGET_PACKAGES",
    "EngineConf",
    "QuantbenchConf",
    "RUNTIME_CHOICES",
    "RunConf",
    "SchemeConf",
    "SpecOverride",
    "TaskConf",
    "TrackingConf",
    "check_runtime",
    "load_task_kinds",
    "register_configs",
]

#: The packages whose classes a config may name in ``task._target_``: the project's own.
TARGET_PACKAGES = ("tasks.", "quantbench.")

#: Config subtrees that do not change what a run computes (where it is logged,
#: whether to rerun it, how many threads or where checkpoints go, what a corrupt
#: image does); they are left out of the config hash that resume uses, so a
#: sweep rerun with another JOBS or launcher completes only what is missing.
HASH_EXCLUDE = ("tracking", "engine.venv", "engine.timeout_s", "engine.isolated", "engine.eval_inputs_max_mb",
                "run.force", "run.threads", "run.resume_root", "data.on_corrupt", "task.deploy_size",
                "run.deploy_size", "run.deploy_batches", "run.deploy_threads", "run.deploy_iters",
                "train.baseline.resume_dir", "train.baseline.checkpoint_steps",
                "train.qat.resume_dir", "train.qat.checkpoint_steps")


@dataclass
class TaskConf:
    """A task adapter, built by ``hydra.utils.instantiate`` from ``_target_`` (a registered task kind's adapter).

    The harness adds ``data``, ``model``, ``train`` (the baseline recipe) and
    ``qat`` (the QAT recipe) as plain-dict keyword arguments.
    ``pretrained_weights`` is the harness's: model files read it
    (``model.pretrained: ${task.pretrained_weights}``), so one model file
    serves a task with library weights (ImageNet) and one that trains its own
    float baseline (digits). ``deploy_size`` is the harness's too: the input size
    a quantized run's int8 speedup is timed at (``run.deploy_size`` overrides it;
    ``null``: the task's own input size).
    """

    _target_: str = MISSING
    name: str = MISSING
    cache_dir: str = ".cache/quantbench"
    device: str = "auto"
    pretrained_weights: bool = False
    deploy_size: int | None = None


def _spec_override_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(QuantizationSpec)
    return [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(QuantizationSpec)]


SpecOverride = dataclasses.make_dataclass(
    "SpecOverride",
    _spec_override_fields(),
    # __module__ makes the class importable by name, so a launcher that pickles the config
    # store into worker processes (joblib, submitit) sends a reference, not a second class.
    namespace={"__doc__": "QuantizationSpec fields to replace in a preset (None keeps the preset's value).",
               "__module__": __name__},
)


@dataclass
class SchemeConf:
    """A quantization scheme: an engine preset plus overrides, all data.

    Attributes:
        name: the scheme's file name; a run's label.
        method: how results tables describe it ("PTQ, float scale").
        preset: an engine preset (``quantbench.engine.presets``); ``None``
            keeps the model in float (the reference row).
        qat: train the fake-quant model with ``train.qat`` after calibration.
        calib_batches: calibration batches taken from the task's loader.
        weight, bias, input_tensors, output_tensors: spec fields replaced in
            every spec of that role (global, per op type, per node).
        fold_bn, exclude: ``Config`` fields replaced when set.
        algorithms: advanced PTQ steps, in order, each ``{name: <algorithm>, <option>: value}``
            (``quantbench.engine.spec.ALGORITHMS``: cle, mixed_precision, bias_correction,
            adaround, brecq); the engine checks names, options and order.
        algorithm_options: options laid over every entry of that algorithm, by name, so a sweep
            changes them for all its schemes at once
            (``scheme.algorithm_options={adaround:{iters:2000},brecq:{iters:5000}}``).
        qat_recipe: ``train.qat`` keys this scheme replaces, e.g. ``{epochs: 10, lr: 3e-4}`` for a
            4-bit QAT that the task's 8-bit recipe under-trains.
    """

    name: str = MISSING
    method: str = MISSING
    preset: str | None = None
    qat: bool = False
    calib_batches: int = 8
    weight: SpecOverride = field(default_factory=SpecOverride)  # type: ignore[valid-type]
    bias: SpecOverride = field(default_factory=SpecOverride)  # type: ignore[valid-type]
    input_tensors: SpecOverride = field(default_factory=SpecOverride)  # type: ignore[valid-type]
    output_tensors: SpecOverride = field(default_factory=SpecOverride)  # type: ignore[valid-type]
    fold_bn: bool | None = None
    exclude: List[str] | None = None
    algorithms: List[Any] = field(default_factory=list)  # names, or {name: ..., <option>: ...}
    algorithm_options: Any = None  # a mapping; typed Any so a command line can set it whole
    qat_recipe: Any = None  # a mapping of train.qat keys this scheme replaces (the task's recipe checks them)


@dataclass
class EngineConf:
    """Which toolkit quantizes the model (``conf/engine/*.yaml``; ``quantbench.peers``).

    ``quantbench`` is this project's engine. A peer (``ort``, ``torchao``, ``nncf``, ``quark``) runs
    through its own public API on the same float model and calibration batches, and its output is
    scored by the same task code; ``quantbench.peers.mapping`` turns the scheme into its options
    (or records why it cannot run the scheme), and ``options`` are laid over them.
    ``isolated`` runs it in its own virtualenv ``venv`` (``make engines``) as a subprocess,
    killed after ``timeout_s``; its torch-side model is scored on the validation inputs handed to it
    (``eval.pt``), up to ``eval_inputs_max_mb`` of them (a larger validation set: its ONNX model only).
    """

    name: str = "quantbench"
    isolated: bool = False
    venv: str | None = None
    timeout_s: float = 1800.0
    eval_inputs_max_mb: float = 2048.0
    options: Any = None  # a mapping of the engine's own option names, laid over the mapping table's


@dataclass
class TrackingConf:
    """Where runs are logged. ``None`` paths default to ``<project>/mlruns``.

    With an ``http(s)://`` server as ``uri`` and no ``artifact_root``, the
    server stores the artifacts (``make server``). A running run sets a
    ``heartbeat`` tag every ``heartbeat_s``; a RUNNING record whose process is
    gone (same host), or whose heartbeat is older than ``stale_after_s``
    (another host), is marked FAILED (killed) and redone by the next sweep.
    ``parent_run``: the id of the sweep's parent run, which ``quantbench sweep`` sets on every job; the
    run is tagged ``mlflow.parentRunId`` with it (``tracking`` is not hashed: it changes no run's hash).
    """

    uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "${task.name}"
    sweep_id: str = "adhoc-${now:%Y%m%d-%H%M%S}"
    heartbeat_s: float = 60.0
    stale_after_s: float = 600.0
    parent_run: str | None = None


@dataclass
class RunConf:
    """How one run executes: rerun policy, threads, measurement sizes.

    ``threads``: torch and onnxruntime threads of one run (0: every CPU this
    process may use; ``quantbench sweep --jobs N`` sets cores / N).
    ``fp32_onnx_cache`` keeps the fp32 export of each float graph for the
    next scheme of the same model (``null`` exports every time).
    ``resume_root`` keeps each QAT run's training checkpoints
    (``<resume_root>/<config hash>``), so an interrupted run resumes; they are
    deleted once the run is FINISHED (``null``: no QAT checkpoints).
    ``sensitivity`` adds the per-layer sensitivity stage (``quantbench analyze``) on
    ``sensitivity_batches`` calibration batches; ``sensitivity_metric`` also scores each
    layer on the task's metric (two evaluations per layer).
    ``runtime``: where the ONNX models are evaluated and timed (:data:`RUNTIME_CHOICES`): ``ort``
    (onnxruntime), ``openvino`` or ``both``; OpenVINO's metrics have names of their own
    (``onnx_ov/*``, ``latency/ov_*``, its agreement with onnxruntime ``runtime/ov_vs_ort_*``). The
    default leaves a run's config hash as it was before the setting existed.
    ``unsigned_weights``: the export's weight storage (:func:`quantbench.engine.export.export_onnx`):
    ``null`` (default) picks per machine, uint8 + 128 where onnxruntime's int8 kernels would saturate
    (an x86 CPU without VNNI: exact, slower) and int8 elsewhere; ``false`` forces int8 weights (the
    faster U8S8 kernels there, not exact); ``true`` forces uint8. The choice is the run's tag
    ``export.unsigned_weights``; ``null`` leaves the config hash as it was.
    ``deploy_size`` / ``deploy_batches`` / ``deploy_threads`` / ``deploy_iters``: the deploy-latency
    stage (:mod:`quantbench.harness.deploy`): a quantized run's int8 / fp32 speedup at the deploy
    input size (``null``: ``task.deploy_size``, else the task's own size), per batch x threads; empty
    batches or threads skip it. Measurement settings: out of the config hash.
    """

    force: bool = False
    seed: int = 0
    threads: int = 2
    parity_batches: int = 1
    latency_iters: int = 20
    latency_batch: int = 32
    fp32_onnx_cache: str | None = ".cache/quantbench/fp32_onnx"
    sqnr_plot_layers: int = 20
    resume_root: str | None = ".cache/quantbench/resume"
    sensitivity: bool = False
    sensitivity_metric: bool = False
    sensitivity_batches: int = 4
    runtime: str = "ort"
    unsigned_weights: bool | None = None
    deploy_size: int | None = None
    deploy_batches: List[int] = field(default_factory=lambda: [1, 8])
    deploy_threads: List[int] = field(default_factory=lambda: [1, 2])
    deploy_iters: int = 10


#: ``run.runtime``'s values: onnxruntime, OpenVINO, or both side by side.
RUNTIME_CHOICES = ("ort", "openvino", "both")


def check_runtime(value: str) -> None:
    """``run.runtime`` must be one of :data:`RUNTIME_CHOICES`, and OpenVINO installed when it is asked for.

    Raises:
        ConfigError: another value (one line, with the close match and the choices).
        RuntimeUnavailableError: OpenVINO asked for and not installed (one line: how to install it).
    """
    if value not in RUNTIME_CHOICES:
        close = close_matches(str(value), RUNTIME_CHOICES)
        raise ConfigError(f"run.runtime={value}: not a runtime" + (f"; did you mean {' or '.join(close)}?" if close
                                                                   else ";") + f" one of {', '.join(RUNTIME_CHOICES)}")
    if value != "ort":
        require_openvino(f"run.runtime={value}")


@dataclass
class QuantbenchConf:
    """The primary config. ``task``, ``data`` and ``train`` differ per task kind, so
    their files carry their own schema (``base_task``; ``base_<kind>``; ``base_<kind>_train``)."""

    task: Any = MISSING
    data: Any = MISSING
    model: ModelConfig = MISSING
    scheme: SchemeConf = MISSING
    train: Any = MISSING
    tracking: TrackingConf = MISSING
    run: RunConf = field(default_factory=RunConf)
    engine: EngineConf = field(default_factory=EngineConf)


_SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_config"): QuantbenchConf,
    ("task", "base_task"): TaskConf,
    ("model", "base_model"): ModelConfig,
    ("scheme", "base_scheme"): SchemeConf,
    ("tracking", "base_tracking"): TrackingConf,
    ("engine", "base_engine"): EngineConf,
}


def _task_packages(conf_dir: Path) -> list[str]:
    """The packages of the adapters that ``conf/task/*.yaml`` name in ``_target_`` (the project's own only)."""
    packages = []
    for path in sorted((conf_dir / "task").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if not isinstance(target, str) or not target:
            continue
        if not target.startswith(TARGET_PACKAGES):
            raise UnsafeConfigError(f"{path}: _target_={target!r} is not one of the project's classes "
                                    f"(allowed: {', '.join(p + '*' for p in TARGET_PACKAGES)})")
        packages.append(target.rsplit(".", 2)[0] if target.count(".") >= 2 else target.rsplit(".", 1)[0])
    return list(dict.fromkeys(packages))


def load_task_kinds(conf_dir: Path) -> list[str]:
    """Import the task packages that ``conf/task`` names, so their kinds register; the kinds, sorted."""
    for package in _task_packages(conf_dir):
        importlib.import_module(package)
    return TASK_KINDS.list()


def register_configs(conf_dir: Path | None = None) -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; call before composing).

    The harness's own groups, ``model``, and the ``data``/``train`` schemas of
    every task kind that ``conf_dir/task/*.yaml`` leads to.

    ``conf/hydra/launcher/basic.yaml`` names the launcher in conf/ and is
    validated against Hydra's own ``hydra/launcher/basic`` schema, as intended;
    Hydra 1.3 warns about that name match on every compose, so that one warning
    is silenced here.
    """
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/basic' is validated against ConfigStore schema")
    cs = ConfigStore.instance()
    for (group, name), node in _SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
    for kind in load_task_kinds(conf_dir or Path(__file__).resolve().parents[2] / "conf"):
        schemas = TASK_KINDS.get(kind)
        cs.store(group="data", name=f"base_{kind}", node=schemas.data)
        cs.store(group="train", name=f"base_{kind}_train", node=schemas.train)
