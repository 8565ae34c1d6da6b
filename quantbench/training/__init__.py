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

Names load on first use, so that importing a light module of the package (its config
dataclasses, the task-kind registry) does not import torch: the CLI checks a config in well
under a second.
"""

from __future__ import annotations

from quantbench.lazy import lazy_exports

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
    "WeightsError",
    "WeightsNotFoundError",
    "baseline_payload",
    "calibration_subset",
    "coerce",
    "fit",
    "fraction_subset",
    "load_weights",
    "make_loader",
    "module_device",
    "resolve_device",
    "start_epoch",
    "train_float",
    "train_qat",
]

#: exported name -> the module that defines it (imported on first use: PEP 562)
_WHERE = {
    "BadInputError": "quantbench.errors",
    "ConfigError": "quantbench.errors",
    "CorruptDataError": "quantbench.errors",
    "DataError": "quantbench.errors",
    "DataNotFoundError": "quantbench.errors",
    "DeviceUnavailableError": "quantbench.errors",
    "WeightsError": "quantbench.errors",
    "WeightsNotFoundError": "quantbench.errors",
    "BaselineCache": "quantbench.training.cache",
    "baseline_payload": "quantbench.training.cache",
    "BestCheckpoint": "quantbench.training.checkpoint",
    "TrainingCheckpoint": "quantbench.training.checkpoint",
    "load_weights": "quantbench.training.checkpoint",
    "LoopConfig": "quantbench.training.config",
    "ModelConfig": "quantbench.training.config",
    "QatConfig": "quantbench.training.config",
    "TrainConfig": "quantbench.training.config",
    "coerce": "quantbench.training.config",
    "CalibrationBatches": "quantbench.training.data",
    "calibration_subset": "quantbench.training.data",
    "fraction_subset": "quantbench.training.data",
    "make_loader": "quantbench.training.data",
    "start_epoch": "quantbench.training.data",
    "module_device": "quantbench.training.device",
    "resolve_device": "quantbench.training.device",
    "ModelEMA": "quantbench.training.ema",
    "EpochSums": "quantbench.training.loop",
    "Objective": "quantbench.training.loop",
    "Validate": "quantbench.training.loop",
    "fit": "quantbench.training.loop",
    "OPTIMIZERS": "quantbench.training.optim",
    "SCHEDULERS": "quantbench.training.optim",
    "PredictFn": "quantbench.training.protocol",
    "TaskAdapter": "quantbench.training.protocol",
    "TrainResult": "quantbench.training.protocol",
    "FloatMode": "quantbench.training.qat_schedule",
    "QatMode": "quantbench.training.qat_schedule",
    "TrainMode": "quantbench.training.qat_schedule",
    "train_float": "quantbench.training.recipes",
    "train_qat": "quantbench.training.recipes",
    "TASK_KINDS": "quantbench.training.tasks",
    "TaskKind": "quantbench.training.tasks",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
