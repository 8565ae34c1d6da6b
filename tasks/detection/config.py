"""Plain dataclasses that configure the detection adapter.

As in classification, Hydra (or a test) passes nested mappings and
:func:`tasks.classification.config.coerce` turns them into these frozen
dataclasses at the boundary, so an unknown key fails with its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.classification.config import ModelConfig, QatConfig, TrainConfig, coerce

__all__ = ["DetDataConfig", "DetModelConfig", "DetQatConfig", "DetTrainConfig", "coerce"]


@dataclass(frozen=True)
class DetDataConfig:
    """Where the COCO-format data set is and how images become tensors.

    Attributes:
        root: Directory with ``annotations/instances_<split>.json`` and
            ``<split>/`` image folders. ``None`` reads ``root_env``.
        root_env: Environment variable that supplies ``root`` (``COCO_ROOT``).
        generate: ``"shapes"`` writes the embedded shapes set into ``root``
            when it is missing; ``None``: the data must be supplied.
        train_split: Split name of the training images (``train2017``).
        val_split: Split name of the validation images (``val2017``).
        image_size: Letterbox size fed to the model (square).
        scale_min: Scale jitter of training images: the long side is resized
            to ``image_size * U(scale_min, 1)`` (1.0 disables it).
        flip: Random horizontal flips while training.
        eval_batch_size: Batch size of evaluation.
        calib_size: Images in the seeded calibration subset (from train).
        calib_batch_size: Batch size of calibration batches.
        train_fraction: Seeded fraction of the training images used (quick runs).
        val_fraction: Seeded fraction of the validation images evaluated (quick runs).
        num_workers: DataLoader workers.
        seed: Seed of subsets and shuffling.
        n_train: Images the shapes generator writes for train.
        n_val: Images the shapes generator writes for val.
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

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"data.image_size must be a multiple of 32 (the detector's stride), got {self.image_size}")
        for name in ("train_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"data.{name} must be in (0, 1], got {value}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"data.scale_min must be in (0, 1], got {self.scale_min}")
        if self.calib_size < 1:
            raise ValueError(f"data.calib_size must be >= 1, got {self.calib_size}")


@dataclass(frozen=True)
class DetModelConfig(ModelConfig):
    """A detector of :func:`tasks.detection.model.build_detector` (``yolo_nas_nano``, ``yolo_nas_small``)."""

    name: str = "yolo_nas_nano"


@dataclass(frozen=True)
class _DetectionLoop:
    """What detection training adds to the shared loop settings.

    Attributes:
        ema: Keep an exponential moving average of the weights and evaluate,
            keep and return it (the usual detector recipe).
        ema_decay: Its decay; ramped up as ``decay * (1 - exp(-updates / ema_tau))``.
        ema_tau: Ramp length in optimizer steps.
        grad_clip: Clip the gradient norm (``None``: no clipping).
        eval_every: Evaluate mAP every this many epochs (and always after the last).
        score_threshold: Post-processing score threshold for evaluation.
        iou_threshold: NMS IoU threshold.
        max_detections: Detections kept per image.
    """

    ema: bool = True
    ema_decay: float = 0.9998
    ema_tau: float = 2000.0
    grad_clip: float | None = 10.0
    eval_every: int = 1
    score_threshold: float = 0.001
    iou_threshold: float = 0.65
    max_detections: int = 100


@dataclass(frozen=True)
class DetTrainConfig(TrainConfig, _DetectionLoop):
    """Float-baseline recipe of the detector (trained once per config, then cached)."""

    epochs: int = 300
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 3.0


@dataclass(frozen=True)
class DetQatConfig(QatConfig, _DetectionLoop):
    """QAT recipe of the detector: the REFERENCES.md recipe, EMA off (the quantizers must see the weights they train)."""

    ema: bool = False

