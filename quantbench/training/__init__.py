"""The training layer: what every task shares, below the harness and free of Hydra and MLflow.

Tasks (``tasks/``) import this package and the engine, never the harness;
the harness imports it to build tasks and map their errors. It holds:

* the task protocol (:class:`TaskAdapter`, :class:`TrainResult`) and the
  error contract (:mod:`quantbench.errors`, re-exported here);
* the config dataclasses of the recipes and models (:mod:`.config`) and the
  registry of task kinds with the schemas they own (:mod:`.tasks`);
* data-parallel helpers (:mod:`.distributed`), resumable checkpoints and the
  best-checkpoint keeper (:mod:`.checkpoint`), the float-baseline cache
  (:mod:`.cache`), seeded loaders and calibration batches (:mod:`.data`);
* optimizer and schedule registries (:mod:`.optim`), the QAT freeze schedule
  (:mod:`.qat_schedule`), the weight EMA (:mod:`.ema`);
* the one training loop, :func:`fit` (:mod:`.loop`), and the float and QAT
  recipes on top of it (:func:`train_float`, :func:`train_qat`).
"""

from quantbench.errors import (
    BadInputError,
    ConfigError,
    CorruptDataError,
    DataError,
    DataNotFoundError,
    DeviceUnavailableError,
    WeightsNotFoundError,
)
from quantbench.training.cache import BaselineCache, baseline_payload
from quantbench.training.checkpoint import BestCheckpoint, TrainingCheckpoint
from quantbench.training.config import LoopConfig, ModelConfig, QatConfig, TrainConfig, coerce
from quantbench.training.data import (
    CalibrationBatches,
    calibration_subset,
    fraction_subset,
    make_loader,
    start_epoch,
)
from quantbench.training.device import module_device, resolve_device
from quantbench.training.ema import ModelEMA
from quantbench.training.loop import EpochSums, Objective, Validate, fit
from quantbench.training.optim import OPTIMIZERS, SCHEDULERS
from quantbench.training.protocol import PredictFn, TaskAdapter, TrainResult
from quantbench.training.qat_schedule import FloatMode, QatMode, TrainMode
from quantbench.training.recipes import train_float, train_qat
from quantbench.training.tasks import TASK_KINDS, TaskKind

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "TASK_KINDS",
    "BadInputError",
    "BaselineCache",
    "BestCheckpoint",
    "CalibrationBatches",
    "ConfigError",
    "CorruptDataError",
    "DataError",
    "DataNotFoundError",
    "DeviceUnavailableError",
    "EpochSums",
    "FloatMode",
    "LoopConfig",
    "ModelConfig",
    "ModelEMA",
    "Objective",
    "PredictFn",
    "QatConfig",
    "QatMode",
    "TaskAdapter",
    "TaskKind",
    "TrainConfig",
    "TrainMode",
    "TrainResult",
    "TrainingCheckpoint",
    "Validate",
    "WeightsNotFoundError",
    "baseline_payload",
    "calibration_subset",
    "coerce",
    "fit",
    "fraction_subset",
    "make_loader",
    "module_device",
    "resolve_device",
    "start_epoch",
    "train_float",
    "train_qat",
]
