"""``DetectionTask``: the harness's view of a COCO-format detection task (COCO, the embedded shapes).

It implements :class:`quantbench.training.TaskAdapter`. Hydra builds it
from ``conf/task/{shapes,coco}.yaml`` with nested mappings, which become the
dataclasses of :mod:`tasks.detection.config` (every value comes from the
config; there are no per-task presets in code). Data sets open lazily: a missing COCO fails at first use with one line.

The float model is the YOLO-NAS-style detector, trained once per config and
cached (no pretrained weights exist for it), then re-parameterised: what the
harness captures and quantizes is the deploy form. Evaluation decodes the raw
outputs outside the graph (DFL, sigmoid, class-wise NMS) and scores them with
pycocotools' COCOeval, for the float model, the fake-quant graph and an
onnxruntime session alike.

Under torchrun every rank trains on its share of each epoch (a seeded
:class:`~quantbench.training.distributed.ShardSampler`, augmentation drawn per
sample from (seed, epoch, index)); rank 0 writes the generated data set and
the baseline cache. A float baseline being trained keeps a resumable
checkpoint next to its cache entry until it is cached.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from quantbench.progress import progress
from quantbench.training import (
    BaselineCache,
    CalibrationBatches,
    ModelConfig,
    PredictFn,
    TrainResult,
    WeightsNotFoundError,
    baseline_payload,
    calibration_subset,
    coerce,
    distributed,
    module_device,
    resolve_device,
    train_float,
    train_qat,
)
from tasks.detection import data as data_lib
from tasks.detection.config import DetDataConfig, DetQatConfig, DetTrainConfig
from tasks.detection.evaluate import CocoEvaluator
from tasks.detection.loss import DetectionLoss, DetectionObjective, LossConfig
from tasks.detection.model import DEFAULT_REG_MAX, YoloNASLike, build_detector
from tasks.detection.postprocess import Anchors, NmsConfig, make_anchors, postprocess

__all__ = ["DetectionTask"]

log = logging.getLogger(__name__)


class DetectionTask:
    """COCO-format object detection (COCO 2017, the embedded shapes set) for the harness.

    Args:
        name: Task name (``shapes``, ``coco``): the experiment and the cache entries' prefix.
        data: :class:`DetDataConfig` or a mapping (``conf/data/<task>.yaml``).
        model: :class:`~quantbench.training.ModelConfig` or a mapping (``conf/model/yolo_nas_*.yaml``).
        train: Float-baseline :class:`DetTrainConfig` or a mapping (``train.baseline``).
        qat: :class:`DetQatConfig` or a mapping (``train.qat``).
        cache_dir: Where trained float baselines are cached (``<cache_dir>/baselines``).
        device: ``auto``, ``cpu`` or ``cuda[:i]``; where training runs.
    """

    primary_metric = "map50_95"

    def __init__(
        self,
        name: str = "shapes",
        data: DetDataConfig | dict | None = None,
        model: ModelConfig | dict | None = None,
        train: DetTrainConfig | dict | None = None,
        qat: DetQatConfig | dict | None = None,
        cache_dir: str | os.PathLike = ".cache/quantbench",
        device: str = "auto",
    ) -> None:
        self.name = name
        self.data_config = coerce(DetDataConfig, data)
        self.model_config = coerce(ModelConfig, model, ModelConfig(name="yolo_nas_nano"))
        self.train_config = coerce(DetTrainConfig, train)
        self.qat_config = coerce(DetQatConfig, qat)
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

    def load_data(self) -> None:
        """Open the data set now (writing the generated shapes set if missing).

        Raises:
            DataNotFoundError: The data set is missing and cannot be generated.
        """
        self._val_set  # noqa: B018 - the cached property does the work

    @property
    def class_names(self) -> list[str]:
        return list(self._val_set.class_names)

    def _num_classes(self, cfg: ModelConfig) -> int:
        return cfg.num_classes if cfg.num_classes is not None else len(self.class_names)

    def _loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
        """A seeded loader (:func:`quantbench.training.make_loader`); a shuffled one is sharded per rank.

        Call ``sampler.set_epoch``: a training loader draws this rank's share of
        a per-epoch permutation and each sample's augmentation from (seed,
        epoch, index), so a resumed or data-parallel run sees the same images
        transformed the same way. Validation is not sharded: rank 0 scores it.
        """
        return data_lib.make_loader(dataset, batch_size, shuffle=shuffle, seed=seed,
                                    num_workers=self.data_config.num_workers, pin_memory=self.device.type == "cuda")

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
        subset = calibration_subset(self._train_eval_set, cfg.calib_size, cfg.seed)
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
        device = module_device(predict)
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
    def build_model(self, model: ModelConfig | dict | None = None) -> nn.Module:
        """The deploy-form (re-parameterised) float detector on the CPU in eval mode.

        Weights: a local checkpoint (training form), else the cached float
        baseline of this exact config (trained now on a cache miss;
        ``train.epochs=0`` keeps the seeded random init).

        Raises:
            ValueError: ``pretrained=true``: no library weights exist for this detector.
        """
        cfg = coerce(ModelConfig, model, self.model_config)
        self.load_data()  # a missing data set is the first thing to report
        if cfg.pretrained:
            raise WeightsNotFoundError(f"model.pretrained=true: there are no published weights for {cfg.name}; "
                             "set model.checkpoint=PATH or let the task train its float baseline")
        if cfg.checkpoint:
            net = build_detector(cfg.name, self._num_classes(cfg), cfg.checkpoint, **cfg.kwargs)
        else:
            net = self._float_baseline(cfg)
        return net.eval().reparameterize()

    def _fresh_model(self, cfg: ModelConfig) -> YoloNASLike:
        torch.manual_seed(self.train_config.seed)
        return build_detector(cfg.name, self._num_classes(cfg), **cfg.kwargs)

    def _float_baseline(self, cfg: ModelConfig) -> YoloNASLike:
        recipe = self.train_config
        if recipe.steps is None and recipe.epochs == 0:
            return self._fresh_model(cfg)
        cache = BaselineCache(self.cache_dir / "baselines", self.name, cfg.name, self.baseline_key(cfg))
        return cache.load_or_train(lambda: self._fresh_model(cfg), lambda m, r: self.train(m, r, qat=False),
                                   recipe, "val_map50_95")  # type: ignore[return-value]

    def baseline_key(self, cfg: ModelConfig | None = None) -> dict[str, Any]:
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
        """Float-baseline (``qat=False``) or QAT training through the training layer's one loop.

        ``recipe`` (a dataclass or a mapping) replaces the task's recipe.
        Validation inside training uses the recipe's NMS settings, runs on rank
        0 (pycocotools' state does not shard) and keeps the best mAP@0.5:0.95
        checkpoint on every rank.
        """
        cfg: DetTrainConfig | DetQatConfig = (coerce(DetQatConfig, recipe, self.qat_config) if qat
                                              else coerce(DetTrainConfig, recipe, self.train_config))
        nms = self._nms(cfg)

        def validate(m: nn.Module) -> dict[str, float]:
            return distributed.main_rank_result(lambda: self._evaluate(m, nms, "val"))

        trainer = train_qat if qat else train_float
        return trainer(model, self.train_loader(cfg), cfg, objective=DetectionObjective(self.loss()),  # type: ignore[arg-type]
                       validate=validate, monitor=self.primary_metric, device=self.device)
