"""The training layer's config dataclasses: the schema of ``conf/train/*.yaml`` and ``conf/model/*.yaml``.

Each config group is one dataclass owned by the code that uses it. The
harness registers these (and each task's own, see
:mod:`quantbench.training.tasks`) in Hydra's ConfigStore, so a YAML file is
validated against exactly the class its values end up in. The recipe values
(epochs, learning rates, batch sizes) live only in ``conf/*.yaml``; the
defaults here are neutral fallbacks for code that builds a recipe by hand.

Code never sees a Hydra ``DictConfig``: Hydra (or a test) passes nested
mappings, and :func:`coerce` turns them into these dataclasses at the
boundary, where ``__post_init__`` checks the values and names the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from quantbench.errors import ConfigError

__all__ = ["LoopConfig", "ModelConfig", "QatConfig", "TrainConfig", "coerce"]

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Which network, and where its weights come from (``conf/model/*.yaml``).

    Attributes:
        name: A name of the task's model registry (``resnet18``, any
            torchvision name, ``timm:<name>``, ``yolo_nas_nano``, a tiny ``test_*`` model).
        display_name: What results tables show (``ResNet-18``); empty: ``name``.
        num_classes: Output classes; ``None`` takes the data set's class count.
        pretrained: Load the library's own pretrained weights. A checkpoint wins over this.
        checkpoint: Path of a local ``state_dict`` to load.
        kwargs: Extra keyword arguments for the model constructor.
    """

    name: str = ""
    display_name: str = ""
    num_classes: int | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopConfig:
    """One training recipe, as :func:`quantbench.training.loop.fit` runs it (torchvision ``references/`` style).

    Attributes:
        epochs: Passes over the train set (ignored when ``steps`` is set).
        steps: Total optimizer steps; overrides ``epochs`` for quick runs.
        batch_size: Training batch size (per rank under torchrun).
        optimizer: A name of :data:`quantbench.training.optim.OPTIMIZERS`.
        lr: Learning rate of the weights.
        weight_decay: Weight decay of the weights.
        decay_norm_and_bias: Decay every parameter; ``False`` exempts the
            one-dimensional ones (BatchNorm, biases, branch scales), as
            detector recipes do.
        momentum: SGD momentum (Nesterov when > 0).
        scheduler: A name of :data:`quantbench.training.optim.SCHEDULERS`:
            ``cosine`` (linear warmup, then cosine to zero), ``step``
            (x ``lr_decay`` every ``lr_decay_steps``), ``constant``.
        warmup_epochs: Linear warmup length for ``cosine``.
        lr_decay: Multiplicative decay for ``step``.
        lr_decay_steps: Period of that decay, in optimizer steps.
        label_smoothing: Cross-entropy label smoothing (classification).
        grad_clip: Clip the gradient norm to this (``None``: no clipping).
        ema: Keep an exponential moving average of the weights; validate,
            keep and return it (Polyak averaging, the usual detector recipe).
        ema_decay: Its decay, ramped up as ``decay * (1 - exp(-updates / ema_tau))``.
        ema_tau: That ramp's length in optimizer steps.
        eval_every: Validate every this many epochs (and always after the last).
        keep_best: ``memory`` or ``disk`` (the best validation score's
            weights, restored at the end) or ``none`` (keep the last weights).
        checkpoint_dir: Where ``disk`` keeps them (default: a temporary dir).
        resume_dir: Where the loop keeps its resumable checkpoint; a rerun
            resumes from it. ``None``: no checkpoints. The harness sets it for
            QAT runs (``run.resume_root``), the baseline cache for baselines.
        checkpoint_steps: Also checkpoint every this many optimizer steps
            (``None``: at the end of each epoch only).
        channels_last: Train in channels-last memory format (about halves a
            MobileNet-V2 step on CPU); the returned model is contiguous again.
            torch 2.13's CPU backward of a channels-last 1x1 stride-2 conv
            crashed the process on some shapes, so it is opt-in.
        seed: Seed of initialisation, shuffling and augmentation.
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    lr_decay: float = 1.0
    lr_decay_steps: int = 1000
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    ema_tau: float = 2000.0
    eval_every: int = 1
    keep_best: str = "memory"
    checkpoint_dir: str | None = None
    resume_dir: str | None = None
    checkpoint_steps: int | None = None
    channels_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint_steps is not None and self.checkpoint_steps < 1:
            raise ConfigError(f"train.checkpoint_steps must be >= 1 or null, got {self.checkpoint_steps}")
        if self.steps is None and self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.keep_best not in ("memory", "disk", "none"):
            raise ConfigError(f"train.keep_best must be memory, disk or none, got {self.keep_best!r}")
        if self.eval_every < 1:
            raise ConfigError(f"train.eval_every must be >= 1, got {self.eval_every}")


@dataclass
class QatConfig(LoopConfig):
    """A QAT recipe: :class:`LoopConfig` plus the quantizers' own optimisation and the freeze points.

    Quantizer parameters (LSQ step sizes, arXiv 1902.08153; TQT log2
    thresholds, arXiv 1903.08066) get their own learning rate and decay and no
    weight decay. Observers freeze after ``freeze_observers_after`` epochs and
    BatchNorm statistics after ``freeze_bn_after`` epochs (fractions allowed;
    ``None``: never), as in Jacob et al. (arXiv 1712.05877, sec. 3.2) and
    Krishnamoorthi (arXiv 1806.08342).
    """

    quant_lr: float = 1e-5
    quant_weight_decay: float = 0.0
    quant_lr_decay: float = 1.0
    quant_lr_decay_steps: int = 1000
    freeze_observers_after: float | None = None
    freeze_bn_after: float | None = None


@dataclass
class TrainConfig:
    """A task's two recipes (``conf/train/*.yaml``): the float baseline and QAT."""

    baseline: LoopConfig = field(default_factory=LoopConfig)
    qat: QatConfig = field(default_factory=QatConfig)


def _plain(value: Any) -> Any:
    """Mappings -> dict, non-string sequences -> tuple (DictConfig/ListConfig included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_plain(v) for v in value)
    return value


def coerce(cls: type[T], value: Any, defaults: T | None = None) -> T:
    """Build a ``cls`` from a dataclass instance, a mapping, or ``None``.

    Args:
        cls: The dataclass to build.
        value: An instance (returned as is), a mapping of field overrides, or
            ``None`` (the defaults).
        defaults: Instance whose values the mapping overrides; ``cls()`` when omitted.

    Raises:
        ConfigError: A key that is not a field (the message lists the fields),
            or a value that ``__post_init__`` refuses.
    """
    base = defaults if defaults is not None else cls()
    if value is None:
        return base
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
    overrides = _plain(value)
    overrides.pop("_target_", None)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(names)}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides and isinstance(overrides[f.name], dict):
            overrides[f.name] = dict(overrides[f.name])
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]
