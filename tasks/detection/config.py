"""The detection task's config: the schemas of ``conf/data/{shapes,coco}.yaml`` and ``conf/train/{shapes,coco}.yaml``.

Importing this module registers the ``detection`` task kind
(:data:`quantbench.training.TASK_KINDS`) with the dataclasses it owns. The
recipes are the training layer's (:class:`~quantbench.training.LoopConfig`,
:class:`~quantbench.training.QatConfig`) plus the non-maximum suppression
that validation during training uses. The values live in ``conf/*.yaml`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantbench.errors import ConfigError
from quantbench.training.config import LoopConfig, QatConfig
from quantbench.training.tasks import TASK_KINDS, TaskKind

__all__ = ["DetDataConfig", "DetQatConfig", "DetTrainConfig", "DetectionTrainConfig"]


@dataclass
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
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"data.image_size must be a positive multiple of 32 (the detector's stride), "
                              f"got {self.image_size}")
        for name in ("train_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"data.{name} must be in (0, 1], got {value}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"data.scale_min must be in (0, 1], got {self.scale_min}")
        for name in ("calib_size", "calib_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class _Nms:
    """Post-processing of validation during training (and of :meth:`DetectionTask.evaluate`).

    Attributes:
        score_threshold: Post-processing score threshold for evaluation.
        iou_threshold: NMS IoU threshold.
        max_detections: Detections kept per image.
    """

    score_threshold: float = 0.001
    iou_threshold: float = 0.65
    max_detections: int = 100


@dataclass
class DetTrainConfig(LoopConfig, _Nms):
    """The detector's float-baseline recipe (``train.baseline``)."""


@dataclass
class DetQatConfig(QatConfig, _Nms):
    """The detector's QAT recipe (``train.qat``)."""


@dataclass
class DetectionTrainConfig:
    """The schema of ``conf/train/{shapes,coco}.yaml``: the two recipes."""

    baseline: DetTrainConfig = field(default_factory=DetTrainConfig)
    qat: DetQatConfig = field(default_factory=DetQatConfig)


TASK_KINDS.add("detection", TaskKind(adapter="tasks.detection.adapter.DetectionTask", data=DetDataConfig,
                                     train=DetectionTrainConfig))


