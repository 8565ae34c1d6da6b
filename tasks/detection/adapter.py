"""``DetectionTask``: the harness's view of a COCO-format detection task (COCO, the embedded shapes).

It implements :class:`quantbench.harness.protocol.TaskAdapter`. Hydra builds it
from ``conf/task/{shapes,coco}.yaml`` with nested mappings, which become the
dataclasses of :mod:`tasks.detection.config` on top of the named task's
preset. Data sets open lazily: a missing COCO fails at first use with one line.

The float model is the YOLO-NAS-style detector, trained once per config and
cached (no pretrained weights exist for it), then re-parameterised: what the
harness captures and quantizes is the deploy form. Evaluation decodes the raw
outputs outside the graph (DFL, sigmoid, class-wise NMS) and scores them with
pycocotools' COCOeval, for the float model, the fake-quant graph and an
onnxruntime session alike.

Under torchrun every rank trains on its share of each epoch (a seeded
:class:`~quantbench.harness.distributed.ShardSampler`, augmentation drawn per
sample from (seed, epoch, index)); rank 0 writes the generated data set and
the baseline cache. A float baseline being trained keeps a resumable
checkpoint next to its cache entry until it is cached.
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

from quantbench.engine.progress import progress
from quantbench.harness import distributed
from quantbench.harness.distributed import EpochSeeded, ShardSampler
from quantbench.harness.protocol import PredictFn, TrainResult
from tasks.classification.adapter import _module_device, resolve_device
from tasks.classification.cache import BaselineCache, baseline_payload
from tasks.classification.loops import CalibrationBatches
from tasks.detection import data as data_lib
from tasks.detection.config import DetDataConfig, DetModelConfig, DetQatConfig, DetTrainConfig, coerce
from tasks.detection.evaluate import CocoEvaluator
from tasks.detection.loss import DetectionLoss, LossConfig
from tasks.detection.model import DEFAULT_REG_MAX, YoloNASLike, build_detector
from tasks.detection.postprocess import Anchors, NmsConfig, make_anchors, postprocess
from tasks.detection.train import train_float, train_qat

__all__ = ["PRESETS", "DetectionTask", "TaskPreset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskPreset:
    """Defaults of a named task; the config passed to the task overrides them key by key."""

    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    qat: DetQatConfig = field(default_factory=DetQatConfig)


PRESETS: dict[str, TaskPreset] = {
    "coco": TaskPreset(
        data=DetDataConfig(root_env="COCO_ROOT", image_size=640, num_workers=8),
        model=DetModelConfig(name="yolo_nas_small", kwargs={"reg_max": 16}),
        qat=DetQatConfig(batch_size=24),
    ),
    # shapes: the measured recipe of conf/train/shapes.yaml (30 epochs reach mAP ~0.69 in ~8 min on 2 cores).
    "shapes": TaskPreset(
        data=DetDataConfig(root="data/shapes", root_env=None, generate="shapes", train_split="train",
                           val_split="val", image_size=128, eval_batch_size=64, calib_size=256),
        model=DetModelConfig(name="yolo_nas_nano"),
        train=DetTrainConfig(epochs=30, lr=3e-3, ema_tau=200.0, eval_every=5),
        qat=DetQatConfig(batch_size=32, lr=3e-5, quant_lr=1e-3),
    ),
}


class DetectionTask:
    """COCO-format object detection (COCO 2017, the embedded shapes set) for the harness.

    Args:
        name: Task name; selects a preset in :data:`PRESETS` (``shapes``, ``coco``).
        data: :class:`DetDataConfig` or a mapping of overrides.
        model: :class:`DetModelConfig` or a mapping of overrides.
        train: Float-baseline :class:`DetTrainConfig` or a mapping of overrides.
        qat: :class:`DetQatConfig` or a mapping of overrides.
        cache_dir: Where trained float baselines are cached (``<cache_dir>/baselines``).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; where training runs.
    """

    primary_metric = "map50_95"

    def __init__(
        self,
        name: str = "shapes",
        data: DetDataConfig | dict | None = None,
        model: DetModelConfig | dict | None = None,
        train: DetTrainConfig | dict | None = None,
        qat: DetQatConfig | dict | None = None,
        cache_dir: str | os.PathLike = ".cache/quantbench",
        device: str = "auto",
    ) -> None:
        preset = PRESETS.get(name, TaskPreset())
        self.name = name
        self.data_config = coerce(DetDataConfig, data, preset.data)
        self.model_config = coerce(DetModelConfig, model, preset.model)
        self.train_config = coerce(DetTrainConfig, train, preset.train)
        self.qat_config = coerce(DetQatConfig, qat, preset.qat)
        self.cache_dir = Path(cache_dir).expanduser()
        self.device = resolve_device(device)
        distributed.init_from_env(self.device)

    def __repr__(self) -> str:
        return f"DetectionTask(name={self.name!r}, model={self.model_config.name!r}, device={self.device})"

    # ----------------------------------------------------------------- data
    @cached_property
    def _root(self) -> Path:
        cfg = self.data_config
        with distributed.main_process_first():  # rank 0 writes a generated set, the others then read it
            return data_lib.ensure_coco(cfg.root, (cfg.train_split, cfg.val_split), task=self.name,
                                        generate=cfg.generate, root_env=cfg.root_env, seed=cfg.seed,
                                        n_train=cfg.n_train, n_val=cfg.n_val)

    @cached_property
    def _train_set(self) -> data_lib.CocoDetection:
        cfg = self.data_config
        return data_lib.CocoDetection(self._root, cfg.train_split, cfg.image_size, augment=True,
                                      scale_min=cfg.scale_min, flip_p=0.5 if cfg.flip else 0.0,
                                      fraction=cfg.train_fraction, seed=cfg.seed)

    @cached_property
    def _train_eval_set(self) -> data_lib.CocoDetection:
        return self._train_set.with_augment(False)

    @cached_property
    def _val_set(self) -> data_lib.CocoDetection:
        cfg = self.data_config
        val = data_lib.CocoDetection(self._root, cfg.val_split, cfg.image_size, augment=False,
                                     fraction=cfg.val_fraction, seed=cfg.seed)
        log.info("%s: %d train and %d val images, %d classes, from %s", self.name, len(self._train_set), len(val),
                 len(val.class_names), self._root)
        return val

    def prepare(self) -> None:
        """Open the data set now (writing the generated shapes set if missing).

        Raises:
            DataNotFoundError: The data set is missing and cannot be generated.
        """
        self._val_set  # noqa: B018 - the cached property does the work

    @property
    def class_names(self) -> list[str]:
        return list(self._val_set.class_names)

    def _num_classes(self, cfg: DetModelConfig) -> int:
        return cfg.num_classes if cfg.num_classes is not None else len(self.class_names)

    def _loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
        """A DataLoader with :func:`collate`; a shuffled one is sharded and seeded per epoch.

        A shuffled (training) loader takes this rank's share of a per-epoch
        permutation and draws each sample's augmentation from (seed, epoch,
        index), so a resumed or data-parallel run sees the same images
        transformed the same way (call ``sampler.set_epoch``). It drops the
        last partial batch when there is a full one: a trailing batch of one
        breaks BatchNorm in training mode.
        """
        sampler = None
        if shuffle:
            sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, even=True, with_epoch=True)
            dataset = EpochSeeded(dataset, seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          drop_last=sampler is not None and len(sampler) > batch_size,
                          num_workers=self.data_config.num_workers, collate_fn=data_lib.collate,
                          generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda",
                          persistent_workers=self.data_config.num_workers > 0)

    def train_loader(self, recipe: DetTrainConfig | DetQatConfig | None = None) -> DataLoader:
        """Shuffled, augmented training batches of ``recipe.batch_size`` (per rank under torchrun)."""
        recipe = recipe or self.train_config
        return self._loader(self._train_set, recipe.batch_size, shuffle=True, seed=recipe.seed)

    def val_loader(self) -> DataLoader:
        """Validation batches in file order (letterbox only)."""
        return self._loader(self._val_set, self.data_config.eval_batch_size, shuffle=False, seed=0)

    def calib_loader(self) -> CalibrationBatches:
        """Input batches of a seeded subset of train (letterbox only, no augmentation), re-iterable."""
        cfg = self.data_config
        n = len(self._train_eval_set)
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[: min(cfg.calib_size, n)]
        subset = torch.utils.data.Subset(self._train_eval_set, sorted(indices.tolist()))
        return CalibrationBatches(self._loader(subset, cfg.calib_batch_size, shuffle=False, seed=0))

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """The first ``batch`` validation images (real data, so export checks see real ranges)."""
        val = self._val_set
        return (torch.stack([val[i][0] for i in range(min(batch, len(val)))]),)

    # ----------------------------------------------------------- evaluation
    def anchors(self) -> Anchors:
        """Anchor points of the detector at ``data.image_size`` (the exported input size)."""
        return make_anchors(self.data_config.image_size, YoloNASLike.strides)

    @property
    def reg_max(self) -> int:
        """DFL bins - 1 of the configured detector (``model.kwargs.reg_max``)."""
        return int(self.model_config.kwargs.get("reg_max", DEFAULT_REG_MAX))

    def _nms(self, recipe: Any = None) -> NmsConfig:
        r = recipe or self.train_config
        return NmsConfig(score_threshold=r.score_threshold, iou_threshold=r.iou_threshold,
                         max_detections=r.max_detections)

    def evaluate(self, predict: PredictFn, *, desc: str = "eval") -> dict[str, float]:
        """COCO mAP@0.5:0.95 and mAP@0.5 (fractions) of ``predict`` on the validation set.

        ``predict`` maps an image batch to the raw ``(class logits, box
        distributions)``: the model itself (put it in eval mode first), the
        fake-quant graph or an onnxruntime predict function. Decoding and NMS
        are the same for all of them.
        """
        return self._evaluate(predict, self._nms(), desc)

    def _evaluate(self, predict: PredictFn, nms: NmsConfig, desc: str) -> dict[str, float]:
        device = _module_device(predict)
        anchors = self.anchors()
        evaluator = CocoEvaluator(self._val_set)
        loader = self.val_loader()
        with torch.no_grad():
            for images, targets in progress(loader, desc, total=len(loader)):
                outputs = predict(images.to(device))
                outputs = tuple(o.detach().float().cpu() for o in outputs)
                evaluator.update(postprocess(outputs, anchors, self.reg_max, nms), targets)
        return evaluator.compute()

    # --------------------------------------------------------------- models
    def build_model(self, model: DetModelConfig | dict | None = None) -> nn.Module:
        """The deploy-form (re-parameterised) float detector on the CPU in eval mode.

        Weights: a local checkpoint (training form), else the cached float
        baseline of this exact config (trained now on a cache miss;
        ``train.epochs=0`` keeps the seeded random init).

        Raises:
            ValueError: ``pretrained=true``: no library weights exist for this detector.
        """
        cfg = coerce(DetModelConfig, model, self.model_config)
        self.prepare()  # a missing data set is the first thing to report
        if cfg.pretrained:
            raise ValueError(f"model.pretrained=true: there are no published weights for {cfg.name}; "
                             "set model.checkpoint=PATH or let the task train its float baseline")
        if cfg.checkpoint:
            net = build_detector(cfg.name, self._num_classes(cfg), cfg.checkpoint, **cfg.kwargs)
        else:
            net = self._float_baseline(cfg)
        return net.eval().reparameterize()

    def _fresh_model(self, cfg: DetModelConfig) -> YoloNASLike:
        torch.manual_seed(self.train_config.seed)
        return build_detector(cfg.name, self._num_classes(cfg), **cfg.kwargs)

    def _float_baseline(self, cfg: DetModelConfig) -> YoloNASLike:
        recipe = self.train_config
        if recipe.steps is None and recipe.epochs == 0:
            return self._fresh_model(cfg)
        cache = BaselineCache(self.cache_dir / "baselines", self.name, cfg.name, self.baseline_key(cfg))
        return cache.load_or_train(lambda: self._fresh_model(cfg), lambda m, r: self.train(m, r, qat=False),
                                   recipe, "val_map50_95")  # type: ignore[return-value]

    def baseline_key(self, cfg: DetModelConfig | None = None) -> dict[str, Any]:
        """What determines a trained baseline: model, data identity and preprocessing, recipe."""
        cfg = cfg or self.model_config
        skip = {"root", "root_env", "generate", "num_workers", "eval_batch_size", "calib_size", "calib_batch_size",
                "val_fraction"}
        data = {k: v for k, v in dataclasses.asdict(self.data_config).items() if k not in skip}
        return baseline_payload(
            self.name, {"name": cfg.name, "num_classes": self._num_classes(cfg), "kwargs": cfg.kwargs}, data,
            {"classes": self.class_names, "n_train": len(self._train_set), "n_val": len(self._val_set)},
            self.train_config,
        )

    def loss(self, cfg: LossConfig | None = None) -> DetectionLoss:
        return DetectionLoss(self.anchors(), self.reg_max, cfg or LossConfig())

    def train(self, model: nn.Module, recipe: Any = None, *, qat: bool) -> TrainResult:
        """Float-baseline (``qat=False``) or QAT training; ``recipe`` overrides the task's.

        Validation inside training uses the NMS settings of the recipe and
        keeps the best mAP@0.5:0.95 checkpoint.
        """
        if qat:
            cfg = coerce(DetQatConfig, recipe, self.qat_config)
            trainer = train_qat
        else:
            cfg = coerce(DetTrainConfig, recipe, self.train_config)
            trainer = train_float
        nms = self._nms(cfg)

        def evaluate(m: nn.Module) -> dict[str, float]:
            return self._evaluate(m, nms, "val")

        return trainer(model, self.train_loader(cfg), evaluate, self.loss(), cfg, self.device)
