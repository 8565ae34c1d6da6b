"""The detection task's config: the schemas of ``conf/data/{shapes,coco}.yaml`` and ``conf/train/{shapes,coco}.yaml``.

Importing this module registers the ``detection`` task kind
(:data:`quantbench.training.TASK_KINDS`) with the dataclasses it owns. The
recipes are the training layer's (:class:`~quantbench.training.LoopConfig`,
:class:`~quantbench.training.QatConfig`) plus the non-maximum suppression
that validation during training uses. The values live in ``conf/*.yaml`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from quantbench.errors import ConfigError
from quantbench.training.config import (
    LoopConfig,
    QatConfig,
    check_fields,
    checked,
    fraction,
    non_negative_int,
    positive_int,
    unit_interval,
)
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

    config_key: ClassVar[str] = "data"

    root: str | None = None
    root_env: str | None = "COCO_ROOT"
    generate: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    image_size: int = checked(640, positive_int)
    scale_min: float = checked(0.6, fraction)
    flip: bool = True
    eval_batch_size: int = checked(32, positive_int)
    calib_size: int = checked(500, positive_int)
    calib_batch_size: int = checked(32, positive_int)
    train_fraction: float = checked(1.0, fraction)
    val_fraction: float = checked(1.0, fraction)
    num_workers: int = checked(0, non_negative_int)
    seed: int = 0
    n_train: int = checked(2000, positive_int)
    n_val: int = checked(300, positive_int)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"data.image_size={self.image_size}: must be a positive multiple of 32 (the "
                              "detector's stride)")


@dataclass
class _Nms:
    """Post-processing of validation during training (and of :meth:`DetectionTask.evaluate`).

    Attributes:
        score_threshold: Post-processing score threshold for evaluation.
        iou_threshold: NMS IoU threshold.
        max_detections: Detections kept per image.
    """

    score_threshold: float = checked(0.001, unit_interval)
    iou_threshold: float = checked(0.65, fraction)
    max_detections: int = checked(100, positive_int)


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


