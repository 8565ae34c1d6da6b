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

The value checks live in one place: a field declares what it accepts with
:func:`checked` (``positive_int``, ``fraction``, ``one_of(...)``, ...), and
:func:`check_fields`, called by each class's ``__post_init__``, refuses a
value with one line that names the full dotted key, the value and what it
accepts (``train.baseline.batch_size=-1: must be a positive integer``). The
key is the class's ``config_key`` (``train.baseline``, ``train.qat``,
``data``, ``model``): where the harness takes the group from. Hydra's
structured configs check the types at compose time; the ranges are checked
here, because that is where a test, a script or the harness builds them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from quantbench.errors import ConfigError
from quantbench.registry import close_matches

__all__ = [
    "Check",
    "LoopConfig",
    "ModelConfig",
    "QatConfig",
    "TrainConfig",
    "check_fields",
    "checked",
    "coerce",
    "fraction",
    "non_negative",
    "non_negative_int",
    "one_of",
    "positive",
    "positive_int",
    "unit_interval",
]

T = TypeVar("T")


# ------------------------------------------------------------------ value checks
@dataclass(frozen=True)
class Check:
    """What a config field accepts: a predicate on its value and the words that say so (``a positive integer``)."""

    accepts: str
    ok: Callable[[Any], bool]
    choices: tuple[str, ...] = ()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


positive_int = Check("a positive integer", lambda v: _is_int(v) and v >= 1)
non_negative_int = Check("an integer >= 0", lambda v: _is_int(v) and v >= 0)
positive = Check("a number > 0", lambda v: _is_number(v) and v > 0)
non_negative = Check("a number >= 0", lambda v: _is_number(v) and v >= 0)
fraction = Check("in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1)
unit_interval = Check("in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)


def one_of(*choices: str) -> Check:
    """A field that takes one of ``choices`` (a string); the message suggests the closest."""
    return Check("one of " + ", ".join(choices), lambda v: v in choices, tuple(choices))


def checked(default: Any, check: Check, *, nullable: bool = False) -> Any:
    """A dataclass field with ``default`` whose value :func:`check_fields` checks (``None`` passes if ``nullable``)."""
    return field(default=default, metadata={"check": check, "nullable": nullable})


def check_fields(obj: Any, key: str | None = None) -> None:
    """Check every :func:`checked` field of the dataclass ``obj``.

    Args:
        obj: A config dataclass instance.
        key: Dotted prefix of its fields in the composed config; default: the
            class's ``config_key``.

    Raises:
        ConfigError: One line: ``<key>.<field>=<value>: must be <what it accepts>``.
    """
    prefix = key if key is not None else getattr(obj, "config_key", "")
    for f in dataclasses.fields(obj):
        check: Check | None = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(obj, f.name)
        nullable = bool(f.metadata.get("nullable"))
        if value is None and nullable:
            continue
        if not check.ok(value):
            raise ConfigError(_message(f"{prefix}.{f.name}" if prefix else f.name, value, check, nullable))


def _message(key: str, value: Any, check: Check, nullable: bool) -> str:
    """``key=value: must be ...`` on one line, with the closest choice of a :func:`one_of` field."""
    shown = repr(value) if isinstance(value, str) else str(value)
    hint = ""
    if check.choices and isinstance(value, str):
        close = close_matches(value, check.choices, n=1) or close_matches(value.lower(), check.choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    accepts = check.accepts + (" or null" if nullable else "")
    return " ".join(f"{key}={shown}: must be {accepts}{hint}".split())


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

    config_key: ClassVar[str] = "model"

    name: str = ""
    display_name: str = ""
    num_classes: int | None = checked(None, positive_int, nullable=True)
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)


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

    #: where the harness takes this recipe from (the float baseline's); :class:`QatConfig`: ``train.qat``
    config_key: ClassVar[str] = "train.baseline"

    epochs: int = checked(1, non_negative_int)
    steps: int | None = checked(None, positive_int, nullable=True)
    batch_size: int = checked(64, positive_int)
    optimizer: str = "adamw"
    lr: float = checked(1e-3, positive)
    weight_decay: float = checked(5e-4, non_negative)
    decay_norm_and_bias: bool = True
    momentum: float = checked(0.9, unit_interval)
    scheduler: str = "cosine"
    warmup_epochs: float = checked(0.0, non_negative)
    lr_decay: float = checked(1.0, positive)
    lr_decay_steps: int = checked(1000, positive_int)
    label_smoothing: float = checked(0.0, unit_interval)
    grad_clip: float | None = checked(None, positive, nullable=True)
    ema: bool = False
    ema_decay: float = checked(0.9998, unit_interval)
    ema_tau: float = checked(2000.0, positive)
    eval_every: int = checked(1, positive_int)
    keep_best: str = checked("memory", one_of("memory", "disk", "none"))
    checkpoint_dir: str | None = None
    resume_dir: str | None = None
    checkpoint_steps: int | None = checked(None, positive_int, nullable=True)
    channels_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)


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

    config_key: ClassVar[str] = "train.qat"

    quant_lr: float = checked(1e-5, positive)
    quant_weight_decay: float = checked(0.0, non_negative)
    quant_lr_decay: float = checked(1.0, positive)
    quant_lr_decay_steps: int = checked(1000, positive_int)
    freeze_observers_after: float | None = checked(None, non_negative, nullable=True)
    freeze_bn_after: float | None = checked(None, non_negative, nullable=True)


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
