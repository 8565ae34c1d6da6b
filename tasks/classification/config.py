"""The classification task's config: the schema of ``conf/data/{digits,imagenet}.yaml``, and its kind.

Importing this module registers the ``classification`` task kind
(:data:`quantbench.training.TASK_KINDS`) with the dataclasses it owns:
:class:`DataConfig` for ``conf/data`` and the training layer's
:class:`~quantbench.training.TrainConfig` for ``conf/train``. The harness
stores them in Hydra's ConfigStore, so the YAML is checked against exactly the
classes the adapter builds (:func:`~quantbench.training.coerce`, at the
boundary). The values live in ``conf/*.yaml`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantbench.errors import ConfigError
from quantbench.training.config import (
    TrainConfig,
    check_fields,
    checked,
    fraction,
    non_negative_int,
    one_of,
    positive,
    positive_int,
)
from quantbench.training.tasks import TASK_KINDS, TaskKind

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
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

    config_key: ClassVar[str] = "data"

    root: str | None = None
    root_env: str | None = "IMAGENET_ROOT"
    generate: str | None = None
    resize_size: int = checked(256, positive_int)
    image_size: int = checked(224, positive_int)
    train_augment: str = "random_resized_crop"
    pad: int = checked(4, non_negative_int)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    eval_batch_size: int = checked(256, positive_int)
    calib_size: int = checked(256, positive_int)
    calib_batch_size: int = checked(32, positive_int)
    train_fraction: float = checked(1.0, fraction)
    val_fraction: float = checked(1.0, fraction)
    num_workers: int = checked(0, non_negative_int)
    seed: int = 0
    on_corrupt: str = checked("fail", one_of("fail", "skip"))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_size > self.resize_size:
            raise ConfigError(f"data.image_size={self.image_size}: must be <= data.resize_size "
                              f"({self.resize_size}), the crop is taken from the resized image")
        if len(self.mean) != len(self.std) or not all(positive.ok(s) for s in self.std):
            raise ConfigError(f"data.std={list(self.std)}: must be positive numbers, one per entry of "
                              f"data.mean ({len(self.mean)})")


TASK_KINDS.add("classification", TaskKind(adapter="tasks.classification.adapter.ClassificationTask",
                                          data=DataConfig, train=TrainConfig))


