"""The structured-config schema: one dataclass per config group, in Hydra's ConfigStore.

Every YAML file under ``conf/`` starts from one of these schemas (its defaults
list names ``base_<group>``), and the primary config is typed by
:class:`QuantbenchConf`. OmegaConf then refuses unknown keys and wrong types
while Hydra composes, so a typo such as ``scheme.calib_bacthes`` fails before
any model is built, with the key and the schema named in the message.

The scheme's per-tensor overrides are generated from the engine's own
:class:`~quantbench.engine.spec.QuantizationSpec` fields, so the schema can
never drift from what the engine accepts.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from quantbench.engine.spec import QuantizationSpec

__all__ = [
    "BaselineConf",
    "ClassificationDataConf",
    "DetectionDataConf",
    "DetectionTrainConf",
    "HASH_EXCLUDE",
    "LoopConf",
    "ModelConf",
    "QatRecipeConf",
    "QuantbenchConf",
    "RunConf",
    "SchemeConf",
    "SpecOverride",
    "TaskConf",
    "TrackingConf",
    "TrainConf",
    "register_configs",
]

#: Config subtrees that do not change what a run computes (where it is logged,
#: whether to rerun it, how many threads or where checkpoints go, what a corrupt
#: image does); they are left out of the config hash that resume uses, so a
#: sweep rerun with another JOBS or launcher completes only what is missing.
HASH_EXCLUDE = ("tracking", "run.force", "run.threads", "run.resume_root", "data.on_corrupt",
                "train.baseline.resume_dir", "train.baseline.checkpoint_steps",
                "train.qat.resume_dir", "train.qat.checkpoint_steps")


@dataclass
class TaskConf:
    """A task adapter, built by ``hydra.utils.instantiate`` from ``_target_``.

    The harness adds ``data``, ``model``, ``train`` (the baseline recipe) and
    ``qat`` (the QAT recipe) as plain-dict keyword arguments.
    ``pretrained_weights`` is the harness's: model files read it
    (``model.pretrained: ${task.pretrained_weights}``), so one model file
    serves a task with library weights (ImageNet) and one that trains its own
    float baseline (digits).
    """

    _target_: str = MISSING
    name: str = MISSING
    cache_dir: str = ".cache/quantbench"
    device: str = "auto"
    pretrained_weights: bool = False


@dataclass
class ClassificationDataConf:
    """An ImageFolder tree (``root/train/<class>``, ``root/val/<class>``) and its transforms.

    Mirrors ``tasks.classification.config.DataConfig`` (a test keeps the two in step).
    """

    root: str | None = None
    root_env: str | None = "IMAGENET_ROOT"
    generate: str | None = None
    resize_size: int = 256
    image_size: int = 224
    train_augment: str = "random_resized_crop"
    pad: int = 4
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    eval_batch_size: int = 256
    calib_size: int = 256
    calib_batch_size: int = 32
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    num_workers: int = 0
    seed: int = 0
    on_corrupt: str = "fail"


@dataclass
class ModelConf:
    """A model of the task's registry; ``display_name`` (harness only) is what tables show."""

    name: str = MISSING
    display_name: str = ""
    num_classes: int | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopConf:
    """What float and QAT training share (torchvision references style)."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay: float = 1.0
    lr_decay_steps: int = 1000
    label_smoothing: float = 0.0
    keep_best: str = "memory"
    checkpoint_dir: str | None = None
    resume_dir: str | None = None
    checkpoint_steps: int | None = None
    channels_last: bool = False
    seed: int = 0


@dataclass
class BaselineConf(LoopConf):
    """The float-baseline recipe (trained once per config and cached by the task)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 4e-3
    warmup_epochs: float = 2.0


@dataclass
class QatRecipeConf(LoopConf):
    """The QAT recipe (REFERENCES.md, after Quark's ImageNet results).

    ``quant_*`` drive the learnable scales (LSQ steps, TQT log2 thresholds).
    Observers and BN statistics freeze after ``freeze_observers_after`` /
    ``freeze_bn_after`` epochs (Jacob et al., arXiv 1712.05877;
    Krishnamoorthi, arXiv 1806.08342).
    """

    epochs: int = 3
    batch_size: int = 24
    optimizer: str = "adam"
    lr: float = 1e-5
    weight_decay: float = 1e-4
    scheduler: str = "step"
    lr_decay: float = 0.94
    lr_decay_steps: int = 2000
    quant_lr: float = 1e-5
    quant_weight_decay: float = 0.0
    quant_lr_decay: float = 0.5
    quant_lr_decay_steps: int = 1000
    freeze_observers_after: float | None = 1.0
    freeze_bn_after: float | None = 2.0


@dataclass
class TrainConf:
    """The float-baseline recipe and the QAT recipe of a task."""

    baseline: BaselineConf = field(default_factory=BaselineConf)
    qat: QatRecipeConf = field(default_factory=QatRecipeConf)


@dataclass
class DetectionDataConf:
    """A COCO-format data set (``root/annotations/instances_<split>.json``, ``root/<split>/``) and its letterbox.

    Mirrors ``tasks.detection.config.DetDataConfig`` (a test keeps the two in step).
    """

    root: str | None = None
    root_env: str | None = "COCO_ROOT"
    generate: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    image_size: int = 640
    scale_min: float = 0.6
    flip: bool = True
    eval_batch_size: int = 32
    calib_size: int = 500
    calib_batch_size: int = 32
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    num_workers: int = 0
    seed: int = 0
    n_train: int = 2000
    n_val: int = 300


@dataclass
class _DetectionLoopConf:
    """Detection-only loop settings (weight EMA, clipping, evaluation period, NMS)."""

    ema: bool = True
    ema_decay: float = 0.9998
    ema_tau: float = 2000.0
    grad_clip: float | None = 10.0
    eval_every: int = 1
    score_threshold: float = 0.001
    iou_threshold: float = 0.65
    max_detections: int = 100


@dataclass
class DetectionBaselineConf(BaselineConf, _DetectionLoopConf):
    """The detector's float-baseline recipe (``tasks.detection.config.DetTrainConfig``)."""

    epochs: int = 300
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0


@dataclass
class DetectionQatConf(QatRecipeConf, _DetectionLoopConf):
    """The detector's QAT recipe (``tasks.detection.config.DetQatConfig``): EMA off."""

    ema: bool = False


@dataclass
class DetectionTrainConf:
    """The detector's float-baseline and QAT recipes."""

    baseline: DetectionBaselineConf = field(default_factory=DetectionBaselineConf)
    qat: DetectionQatConf = field(default_factory=DetectionQatConf)


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


@dataclass
class TrackingConf:
    """Where runs are logged. ``None`` paths default to ``<project>/mlruns``.

    With an ``http(s)://`` server as ``uri`` and no ``artifact_root``, the
    server stores the artifacts (``make server``). A running run sets a
    ``heartbeat`` tag every ``heartbeat_s``; a RUNNING record whose process is
    gone (same host), or whose heartbeat is older than ``stale_after_s``
    (another host), is marked FAILED (killed) and redone by the next sweep.
    """

    uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "${task.name}"
    sweep_id: str = "adhoc-${now:%Y%m%d-%H%M%S}"
    heartbeat_s: float = 60.0
    stale_after_s: float = 600.0


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


@dataclass
class QuantbenchConf:
    """The primary config. ``task``, ``data`` and ``train`` differ per task kind, so
    their files carry their own schema (``base_task``; ``base_classification`` or
    ``base_detection``; ``base_train`` or ``base_detection_train``)."""

    task: Any = MISSING
    data: Any = MISSING
    model: ModelConf = MISSING
    scheme: SchemeConf = MISSING
    train: Any = MISSING
    tracking: TrackingConf = MISSING
    run: RunConf = field(default_factory=RunConf)


_SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_config"): QuantbenchConf,
    ("task", "base_task"): TaskConf,
    ("data", "base_classification"): ClassificationDataConf,
    ("data", "base_detection"): DetectionDataConf,
    ("model", "base_model"): ModelConf,
    ("scheme", "base_scheme"): SchemeConf,
    ("train", "base_train"): TrainConf,
    ("train", "base_detection_train"): DetectionTrainConf,
    ("tracking", "base_tracking"): TrackingConf,
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; call before composing).

    ``conf/hydra/launcher/basic.yaml`` names the launcher in conf/ and is
    validated against Hydra's own ``hydra/launcher/basic`` schema, as intended;
    Hydra 1.3 warns about that name match on every compose, so that one warning
    is silenced here.
    """
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/basic' is validated against ConfigStore schema")
    cs = ConfigStore.instance()
    for (group, name), node in _SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
