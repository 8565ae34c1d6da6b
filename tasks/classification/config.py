"""Plain dataclasses that configure the classification adapter.

The adapter never sees a Hydra ``DictConfig``: Hydra (or a test) passes nested
mappings, and :func:`coerce` turns them into these frozen dataclasses at the
boundary. An unknown key fails there, with the key named, instead of being
silently ignored deep inside a training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataConfig",
    "LoopConfig",
    "ModelConfig",
    "QatConfig",
    "TrainConfig",
    "coerce",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """Where the ImageFolder tree is and how images become tensors.

    Attributes:
        root: Tree with ``train/<class>/*`` and ``val/<class>/*``. ``None`` reads
            the environment variable named by ``root_env``.
        root_env: Environment variable that supplies ``root`` when it is unset
            (``IMAGENET_ROOT`` for ImageNet), named in the not-found error.
        generate: Name of a generator in ``data.GENERATORS`` (``"digits"``) that
            writes the tree when ``root`` does not exist; ``None`` means the
            data must be supplied by the user.
        resize_size: Shorter side after resizing (256 for ImageNet, 32 for digits).
        image_size: Center/random crop size fed to the model (224 / 32).
        train_augment: Name in ``data.TRAIN_AUGMENTS``: ``random_resized_crop``
            (ImageNet), ``pad_crop`` (small images; no flip, digits are not
            mirror-symmetric), ``affine`` (small rotations/shifts/scalings)
            or ``none``.
        pad: Padding for ``pad_crop``, shift in pixels for ``affine``.
        mean: Normalization mean (ImageNet's, so pretrained weights fit).
        std: Normalization std.
        eval_batch_size: Batch size for evaluation.
        calib_size: Images in the seeded calibration subset drawn from train.
        calib_batch_size: Batch size of calibration batches.
        train_fraction: Seeded fraction of train images used (quick runs).
        val_fraction: Seeded fraction of val images used (quick runs).
        num_workers: DataLoader workers (0 suits small data and shared CPUs).
        seed: Seed of the fractions, the calibration subset and shuffling.
        on_corrupt: What an image that does not decode does: ``fail`` (the run
            stops, naming the file) or ``skip`` (a warning names it; the
            batch goes on without it).
    """

    root: str | None = None
    root_env: str | None = "IMAGENET_ROOT"
    generate: str | None = None
    resize_size: int = 256
    image_size: int = 224
    train_augment: str = "random_resized_crop"
    pad: int = 4
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    eval_batch_size: int = 256
    calib_size: int = 256
    calib_batch_size: int = 32
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    num_workers: int = 0
    seed: int = 0
    on_corrupt: str = "fail"

    def __post_init__(self) -> None:
        if self.on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be fail or skip, got {self.on_corrupt!r}")
        for name in ("train_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"data.{name} must be in (0, 1], got {value}")
        if self.image_size > self.resize_size:
            raise ValueError(
                f"data.image_size ({self.image_size}) exceeds data.resize_size ({self.resize_size})"
            )
        if self.calib_size < 1:
            raise ValueError(f"data.calib_size must be >= 1, got {self.calib_size}")


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and where its weights come from.

    Attributes:
        name: ``resnet18``, any ``torchvision.models.get_model`` name,
            ``timm:<name>``, or a tiny ``test_*`` model.
        num_classes: Output classes; ``None`` takes the dataset's class count.
        pretrained: Load the library's own pretrained weights (its cache, or a
            download). A checkpoint wins over this.
        checkpoint: Path of a local ``state_dict`` to load.
        kwargs: Extra keyword arguments for the model constructor.
    """

    name: str = "resnet18"
    num_classes: int | None = None
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopConfig:
    """What float and QAT training share (torchvision ``references/`` style).

    Attributes:
        epochs: Passes over the train set (ignored when ``steps`` is set).
        steps: Total optimizer steps; overrides ``epochs`` for quick runs.
        batch_size: Training batch size.
        optimizer: Name in ``loops.OPTIMIZERS``: ``sgd``, ``adam``, ``adamw``.
        lr: Learning rate of the weights.
        weight_decay: Weight decay of the weights.
        momentum: SGD momentum (Nesterov).
        scheduler: Name in ``loops.SCHEDULERS``: ``cosine`` (linear warmup,
            then cosine to zero), ``step`` (x ``lr_decay`` every
            ``lr_decay_steps``), ``constant``.
        warmup_epochs: Linear warmup length for ``cosine``.
        lr_decay: Multiplicative decay for ``step``.
        lr_decay_steps: Period of that decay, in optimizer steps.
        label_smoothing: Cross-entropy label smoothing.
        keep_best: ``memory`` or ``disk`` (checkpoint of the best val top-1,
            restored at the end) or ``none`` (keep the last weights).
        checkpoint_dir: Where ``disk`` keeps it (default: a temporary dir).
        resume_dir: Where the loop keeps its resumable checkpoint
            (:class:`quantbench.harness.checkpoint.TrainingCheckpoint`); a
            rerun resumes from it. ``None``: no checkpoints. The harness sets
            it for QAT runs (``run.resume_root``).
        checkpoint_steps: Also checkpoint every this many optimizer steps
            (``None``: at the end of each epoch only).
        channels_last: Train in channels-last memory format (about halves a
            MobileNet-V2 step on CPU); the returned model is contiguous again.
            Opt-in: see :class:`TrainConfig` for a torch 2.13 CPU crash.
        seed: Seed of initialisation, shuffling and augmentation.
    """

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

    def __post_init__(self) -> None:
        if self.checkpoint_steps is not None and self.checkpoint_steps < 1:
            raise ValueError(f"train.checkpoint_steps must be >= 1 or null, got {self.checkpoint_steps}")
        if self.steps is None and self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.keep_best not in ("memory", "disk", "none"):
            raise ValueError(f"train.keep_best must be memory, disk or none, got {self.keep_best!r}")


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """Float-baseline recipe (trained once per config, then cached).

    The defaults are the measured digits recipe: AdamW 4e-3, two warmup epochs
    then cosine, 20 epochs of batch 32, random 4-pixel shifts (ResNet-18
    99.7 %, MobileNet-V2 99.2 % top-1; MobileNet-V2 from scratch at 32x32 is
    the harder one: 15 epochs of batch 64 gave 96.9 %, batch 32 98.1-98.3 %).
    ``channels_last`` stays off by
    default: torch 2.13's CPU backward of a channels-last 1x1 stride-2 conv
    crashed the process on some shapes (8->16 channels, batch 29).
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 4e-3
    warmup_epochs: float = 2.0


@dataclass(frozen=True)
class QatConfig(LoopConfig):
    """QAT recipe of REFERENCES.md (Quark FX-mode ImageNet results).

    Adam; weights at 1e-5 decayed x0.94 every 2000 steps, quantizer parameters
    (LSQ steps, TQT log2 thresholds) at their own 1e-5 decayed x0.5 every 1000
    steps and without weight decay; weight decay 1e-4; batch 24; 3 epochs;
    best checkpoint by val top-1. Observers freeze after
    ``freeze_observers_after`` epochs and BatchNorm statistics after
    ``freeze_bn_after`` epochs (fractions allowed; ``None`` never), as in
    Jacob et al. (arXiv 1712.05877) and Krishnamoorthi (arXiv 1806.08342).
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
        defaults: Instance whose values the mapping overrides (a task preset);
            ``cls()`` when omitted.

    Raises:
        TypeError: On a key that is not a field; the message lists the fields.
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(names)}")
    if "kwargs" in overrides:
        overrides["kwargs"] = dict(overrides["kwargs"] or {})
    return dataclasses.replace(base, **overrides)
