"""``ClassificationTask``: the harness's view of an ImageFolder classification task.

It implements :class:`quantbench.harness.protocol.TaskAdapter`. Hydra builds it
from ``conf/task/*.yaml`` (``_target_: tasks.classification.adapter.ClassificationTask``)
with nested mappings, which are converted to the plain dataclasses of
:mod:`tasks.classification.config` here, on top of the named task's preset.
Data sets are opened lazily, so constructing a task is cheap and a missing
data set fails at first use with one line (:class:`DataNotFoundError`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from quantbench.harness import distributed
from quantbench.harness.protocol import PredictFn, TrainResult
from tasks.classification import data as data_lib
from tasks.classification.cache import BaselineCache, baseline_payload
from tasks.classification.config import DataConfig, LoopConfig, ModelConfig, QatConfig, TrainConfig, coerce
from tasks.classification.loops import CalibrationBatches, evaluate
from tasks.classification.models import build_model
from tasks.classification.recipes import train_float, train_qat

__all__ = ["PRESETS", "ClassificationTask", "DeviceNotAvailableError", "TaskPreset", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskPreset:
    """Defaults of a named task; the config passed to the task overrides them key by key."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qat: QatConfig = field(default_factory=QatConfig)


PRESETS: dict[str, TaskPreset] = {
    # ImageNet: torchvision's transforms and its SGD baseline recipe (used only without pretrained weights).
    "imagenet": TaskPreset(
        data=DataConfig(root_env="IMAGENET_ROOT", num_workers=8),
        model=ModelConfig(num_classes=1000, pretrained=True),
        train=TrainConfig(
            epochs=90, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=0.0
        ),
    ),
    # digits: sklearn's 8x8 digits written as a 32x32 ImageFolder tree on first use (data/digits).
    "digits": TaskPreset(
        data=DataConfig(
            root="data/digits",
            root_env=None,
            generate="digits",
            resize_size=32,
            image_size=32,
            train_augment="pad_crop",
            pad=4,
        ),
        qat=QatConfig(batch_size=64, lr=1e-4, quant_lr=1e-3),
    ),
}


class DeviceNotAvailableError(RuntimeError):
    """The requested device does not exist on this machine (one-line message)."""


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda[:i]"`` as given, checked."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceNotAvailableError(
            f"device={str(spec)!r} was requested but this torch ({torch.__version__}) sees no CUDA device; "
            "use device=cpu or device=auto"
        )
    return device


def _module_device(obj: Any) -> torch.device:
    """Where a model's tensors live (CPU for plain callables such as an onnxruntime predict)."""
    if isinstance(obj, nn.Module):
        for tensor in (*obj.parameters(), *obj.buffers()):
            return tensor.device
    return torch.device("cpu")


@dataclass
class _Splits:
    train: Dataset
    val: Dataset
    calib: Dataset
    classes: list[str]


class ClassificationTask:
    """ImageFolder classification (ImageNet, the embedded digits) for the harness.

    Args:
        name: Task name; selects a preset in :data:`PRESETS` (``digits``,
            ``imagenet``); other names start from the plain dataclass defaults.
        data: :class:`DataConfig` or a mapping of overrides.
        model: :class:`ModelConfig` or a mapping of overrides.
        train: Float-baseline :class:`TrainConfig` or a mapping of overrides.
        qat: :class:`QatConfig` or a mapping of overrides.
        cache_dir: Where trained float baselines are cached (``<cache_dir>/baselines``).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; where training runs. Under
            ``torchrun`` the task joins the process group (gloo on CPU, nccl
            on CUDA), trains with DDP on its share of the data and reduces
            metrics over all ranks; only rank 0 writes files.
    """

    primary_metric = "top1"

    def __init__(
        self,
        name: str = "digits",
        data: DataConfig | dict | None = None,
        model: ModelConfig | dict | None = None,
        train: TrainConfig | dict | None = None,
        qat: QatConfig | dict | None = None,
        cache_dir: str | os.PathLike = ".cache/quantbench",
        device: str = "auto",
    ) -> None:
        preset = PRESETS.get(name, TaskPreset())
        self.name = name
        self.data_config = coerce(DataConfig, data, preset.data)
        self.model_config = coerce(ModelConfig, model, preset.model)
        self.train_config = coerce(TrainConfig, train, preset.train)
        self.qat_config = coerce(QatConfig, qat, preset.qat)
        self.cache_dir = Path(cache_dir).expanduser()
        self.device = resolve_device(device)
        distributed.init_from_env(self.device)

    def __repr__(self) -> str:
        return (
            f"ClassificationTask(name={self.name!r}, model={self.model_config.name!r}, device={self.device})"
        )

    @cached_property
    def _splits(self) -> _Splits:
        cfg = self.data_config
        with distributed.main_process_first():  # rank 0 writes a generated tree, the others then read it
            root = data_lib.ensure_tree(cfg, self.name)
        train = data_lib.image_folder(root, "train", data_lib.train_transform(cfg), cfg.on_corrupt)
        val = data_lib.image_folder(root, "val", data_lib.eval_transform(cfg), cfg.on_corrupt)
        if train.classes != val.classes:
            raise ValueError(f"{root}: train/ and val/ have different class folders; labels would not match")
        calib_source = data_lib.with_transform(train, data_lib.eval_transform(cfg))
        splits = _Splits(
            train=data_lib.fraction_subset(train, cfg.train_fraction, cfg.seed),
            val=data_lib.fraction_subset(val, cfg.val_fraction, cfg.seed),
            calib=data_lib.calibration_subset(calib_source, cfg.calib_size, cfg.seed),
            classes=list(train.classes),
        )
        log.info(
            "%s: %d train, %d val, %d calibration images, %d classes from %s",
            self.name,
            len(splits.train),
            len(splits.val),
            len(splits.calib),
            len(splits.classes),
            root,
        )
        return splits

    def prepare(self) -> None:
        """Open the data set now (writing a generated tree such as digits if missing).

        Raises:
            DataNotFoundError: The tree is missing and cannot be generated.
        """
        self._splits  # noqa: B018 - the cached property does the work

    @property
    def classes(self) -> list[str]:
        """Class folder names, in label order."""
        return self._splits.classes

    def _num_classes(self, cfg: ModelConfig) -> int:
        return cfg.num_classes if cfg.num_classes is not None else len(self.classes)

    def _loader(
        self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, shard: bool = False
    ) -> DataLoader:
        return data_lib.make_loader(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            num_workers=self.data_config.num_workers,
            pin_memory=self.device.type == "cuda",
            shard=shard,
        )

    def train_loader(self, recipe: LoopConfig | None = None) -> DataLoader:
        """Shuffled, augmented training batches of ``recipe.batch_size`` (per rank under torchrun)."""
        recipe = recipe or self.train_config
        return self._loader(self._splits.train, recipe.batch_size, shuffle=True, seed=recipe.seed)

    def val_loader(self) -> DataLoader:
        """Validation batches in file order (eval transform); this rank's share under torchrun."""
        return self._loader(self._splits.val, self.data_config.eval_batch_size, shuffle=False, seed=0, shard=True)

    def calib_loader(self) -> CalibrationBatches:
        """Input batches of the seeded calibration subset of train (eval transform), re-iterable."""
        cfg = self.data_config
        return CalibrationBatches(
            self._loader(self._splits.calib, cfg.calib_batch_size, shuffle=False, seed=0)
        )

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """The first ``batch`` validation images (real data, so export checks see real ranges)."""
        val = self._splits.val
        images = (sample[0] for sample in (val[i] for i in range(len(val))) if sample is not None)
        return (torch.stack([image for image, _ in zip(images, range(batch))]),)

    def evaluate(self, predict: PredictFn, *, desc: str = "eval") -> dict[str, float]:
        """Top-1/top-5 (percent) of ``predict`` over the validation set.

        ``predict`` may be a model (inputs go to its device; put it in eval
        mode first), or any callable such as an onnxruntime predict function
        (CPU tensors in).
        """
        return evaluate(predict, self.val_loader(), device=_module_device(predict), desc=desc)

    def build_model(self, model: ModelConfig | dict | None = None) -> nn.Module:
        """The float model on the CPU in eval mode.

        Weights: a local checkpoint, else the library's pretrained weights,
        else the cached float baseline of this exact config (trained now on a
        cache miss; ``train.epochs=0`` keeps the seeded random init).
        """
        cfg = coerce(ModelConfig, model, self.model_config)
        self.prepare()  # a missing data set is the first thing to report, before weights or training
        if cfg.checkpoint or cfg.pretrained:
            return build_model(cfg.name, self._num_classes(cfg), cfg.pretrained, cfg.checkpoint, **cfg.kwargs)
        return self._float_baseline(cfg)

    def _fresh_model(self, cfg: ModelConfig) -> nn.Module:
        torch.manual_seed(self.train_config.seed)
        return build_model(cfg.name, self._num_classes(cfg), **cfg.kwargs)

    def _float_baseline(self, cfg: ModelConfig) -> nn.Module:
        recipe = self.train_config
        if recipe.steps is None and recipe.epochs == 0:
            return self._fresh_model(cfg)
        cache = BaselineCache(self.cache_dir / "baselines", self.name, cfg.name, self.baseline_key(cfg))
        return cache.load_or_train(lambda: self._fresh_model(cfg), lambda m, r: self.train(m, r, qat=False),
                                   recipe, "val_top1")

    def baseline_key(self, cfg: ModelConfig | None = None) -> dict[str, Any]:
        """What determines a trained baseline: model, data identity and preprocessing, recipe.

        Paths, workers and evaluation/calibration batch sizes are left out:
        they do not change the weights, and the same data under another root
        should reuse the baseline.
        """
        cfg = cfg or self.model_config
        skip_data = {
            "root",
            "root_env",
            "generate",
            "num_workers",
            "eval_batch_size",
            "calib_size",
            "calib_batch_size",
            "on_corrupt",
        }
        data = {k: v for k, v in dataclasses.asdict(self.data_config).items() if k not in skip_data}
        splits = self._splits
        return baseline_payload(
            self.name, {"name": cfg.name, "num_classes": self._num_classes(cfg), "kwargs": cfg.kwargs}, data,
            {"classes": splits.classes, "n_train": len(splits.train), "n_val": len(splits.val)}, self.train_config,
        )

    def train(self, model: nn.Module, recipe: Any = None, *, qat: bool) -> TrainResult:
        """Float-baseline (``qat=False``) or QAT training; ``recipe`` overrides the task's.

        Raises:
            NotImplementedError: ``qat=True`` before the engine has QAT support.
        """
        if qat:
            cfg = coerce(QatConfig, recipe, self.qat_config)
            return train_qat(model, self.train_loader(cfg), self.val_loader(), cfg, self.device)
        cfg = coerce(TrainConfig, recipe, self.train_config)
        return train_float(model, self.train_loader(cfg), self.val_loader(), cfg, self.device)
