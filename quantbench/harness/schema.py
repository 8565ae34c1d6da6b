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
#: whether to rerun it); they are left out of the config hash that resume uses.
HASH_EXCLUDE = ("tracking", "run.force")


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


def _spec_override_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(QuantizationSpec)
    return [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(QuantizationSpec)]


SpecOverride = dataclasses.make_dataclass(
    "SpecOverride",
    _spec_override_fields(),
    namespace={"__doc__": "QuantizationSpec fields to replace in a preset (None keeps the preset's value)."},
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
    """Where runs are logged. ``None`` paths default to ``<project>/mlruns``."""

    uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "${task.name}"
    sweep_id: str = "adhoc-${now:%Y%m%d-%H%M%S}"


@dataclass
class RunConf:
    """How one run executes: rerun policy, threads, measurement sizes.

    ``fp32_onnx_cache`` keeps the fp32 export of each float graph for the
    next scheme of the same model (``null`` exports every time).
    """

    force: bool = False
    seed: int = 0
    threads: int = 2
    parity_batches: int = 1
    latency_iters: int = 20
    latency_batch: int = 32
    fp32_onnx_cache: str | None = ".cache/quantbench/fp32_onnx"
    sqnr_plot_layers: int = 20


@dataclass
class QuantbenchConf:
    """The primary config. ``task`` and ``data`` differ per task kind, so their
    files carry their own schema (``base_task``, ``base_classification``)."""

    task: Any = MISSING
    data: Any = MISSING
    model: ModelConf = MISSING
    scheme: SchemeConf = MISSING
    train: TrainConf = MISSING
    tracking: TrackingConf = MISSING
    run: RunConf = field(default_factory=RunConf)


_SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_config"): QuantbenchConf,
    ("task", "base_task"): TaskConf,
    ("data", "base_classification"): ClassificationDataConf,
    ("model", "base_model"): ModelConf,
    ("scheme", "base_scheme"): SchemeConf,
    ("train", "base_train"): TrainConf,
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
