"""Image classification task adapter: ImageFolder data (ImageNet, digits), models, loops.

``ClassificationTask`` is what ``conf/task/*.yaml`` instantiates. The pieces are
usable on their own: ``write_digits_imagefolder`` backs ``quantbench data
digits``, ``build_model`` names torchvision/timm/test models, ``evaluate``
scores any predict function with the same top-1/top-5 code.
"""

from tasks.classification.adapter import (
    PRESETS,
    ClassificationTask,
    DeviceNotAvailableError,
    TaskPreset,
    resolve_device,
)
from tasks.classification.config import DataConfig, ModelConfig, QatConfig, TrainConfig
from tasks.classification.data import DataNotFoundError, write_digits_imagefolder
from tasks.classification.loops import evaluate, topk_correct
from tasks.classification.models import WeightsNotFoundError, build_model, list_models

__all__ = [
    "PRESETS",
    "ClassificationTask",
    "DataConfig",
    "DataNotFoundError",
    "DeviceNotAvailableError",
    "ModelConfig",
    "QatConfig",
    "TaskPreset",
    "TrainConfig",
    "WeightsNotFoundError",
    "build_model",
    "evaluate",
    "list_models",
    "resolve_device",
    "topk_correct",
    "write_digits_imagefolder",
]
