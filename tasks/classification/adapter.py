"""``ClassificationTask``: the harness's view of an ImageFolder classification task.

It implements :class:`quantbench.training.TaskAdapter`. Hydra builds it from
``conf/task/*.yaml`` (``_target_: tasks.classification.adapter.ClassificationTask``)
with the resolved ``data``, ``model`` and recipe groups as nested mappings,
which become the dataclasses of :mod:`tasks.classification.config` and
:mod:`quantbench.training.config` here. Every value comes from the config:
there are no per-task presets in code. Data sets are opened lazily, so
constructing a task is cheap and a missing data set fails at first use with
one line (:class:`~quantbench.errors.DataNotFoundError`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from quantbench.training import (
    BaselineCache,
    CalibrationBatches,
    DataError,
    LoopConfig,
    ModelConfig,
    PredictFn,
    QatConfig,
    TrainResult,
    baseline_payload,
    calibration_subset,
    coerce,
    distributed,
    fraction_subset,
    module_device,
    resolve_device,
    train_float,
    train_qat,
)
from tasks.classification import data as data_lib
from tasks.classification.config import DataConfig
from tasks.classification.metrics import CrossEntropyObjective, evaluate
from tasks.classification.models import build_model, check_name

__all__ = ["ClassificationTask"]

log = logging.getLogger(__name__)


@dataclass
class _Splits:
    train: Dataset
    val: Dataset
    calib: Dataset
    classes: list[str]


class ClassificationTask:
    """ImageFolder classification (ImageNet, the embedded digits) for the harness.

    Args:
        name: Task name (``digits``, ``imagenet``): the experiment and the cache entries' prefix.
        data: :class:`DataConfig` or a mapping (``conf/data/<task>.yaml``).
        model: :class:`~quantbench.training.ModelConfig` or a mapping (``conf/model/*.yaml``).
        train: Float-baseline :class:`~quantbench.training.LoopConfig` or a mapping
            (``train.baseline`` of ``conf/train/<task>.yaml``).
        qat: :class:`~quantbench.training.QatConfig` or a mapping (``train.qat``).
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
        train: LoopConfig | dict | None = None,
        qat: QatConfig | dict | None = None,
        cache_dir: str | os.PathLike = ".cache/quantbench",
        device: str = "auto",
    ) -> None:
        self.name = name
        self.data_config = coerce(DataConfig, data)
        self.model_config = coerce(ModelConfig, model)
        self.train_config = coerce(LoopConfig, train)
        self.qat_config = coerce(QatConfig, qat)
        if self.model_config.name:  # a typo stops here, before the harness records a run
            check_name(self.model_config.name)
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
            raise DataError(f"{root}: train/ and val/ have different class folders, so labels would not match; "
                            "give both splits the same class folders")
        calib_source = data_lib.with_transform(train, data_lib.eval_transform(cfg))
        splits = _Splits(
            train=fraction_subset(train, cfg.train_fraction, cfg.seed),
            val=fraction_subset(val, cfg.val_fraction, cfg.seed),
            calib=calibration_subset(calib_source, cfg.calib_size, cfg.seed),
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

    def load_data(self) -> None:
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
        return evaluate(predict, self.val_loader(), device=module_device(predict), desc=desc)

    def build_model(self, model: ModelConfig | dict | None = None) -> nn.Module:
        """The float model on the CPU in eval mode.

        Weights: a local checkpoint, else the library's pretrained weights,
        else the cached float baseline of this exact config (trained now on a
        cache miss; ``train.epochs=0`` keeps the seeded random init).
        """
        cfg = coerce(ModelConfig, model, self.model_config)
        self.load_data()  # a missing data set is the first thing to report, before weights or training
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

    def train_batches(self, recipe: Any = None, *, qat: bool) -> DataLoader:
        """One epoch of the (augmented, shuffled) batches ``train`` trains on with ``recipe``: what a peer
        engine that trains in its own process is handed (``harness/engines.py``)."""
        return self.train_loader(coerce(QatConfig, recipe, self.qat_config) if qat
                                 else coerce(LoopConfig, recipe, self.train_config))

    def train(self, model: nn.Module, recipe: Any = None, *, qat: bool) -> TrainResult:
        """Float-baseline (``qat=False``) or QAT training through the training layer's one loop.

        ``recipe`` (a dataclass or a mapping) replaces the task's recipe; the
        best validation top-1 checkpoint is kept.
        """
        cfg: LoopConfig = coerce(QatConfig, recipe, self.qat_config) if qat else coerce(LoopConfig, recipe,
                                                                                        self.train_config)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        desc = "qat" if qat else "float"

        def validate(m: nn.Module) -> dict[str, float]:
            return evaluate(lambda x: m(x.contiguous(memory_format=fmt)), self.val_loader(), device=self.device,
                            desc=f"{desc} val")

        trainer = train_qat if qat else train_float
        return trainer(model, self.train_loader(cfg), cfg, objective=CrossEntropyObjective(cfg.label_smoothing,
                       cfg.channels_last), validate=validate, monitor=self.primary_metric, device=self.device)
