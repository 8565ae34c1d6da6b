"""The harness: one experiment = task x model x scheme, sequenced and recorded.

``run(cfg) -> RunResult`` does one run (see :mod:`quantbench.harness.run`);
:mod:`quantbench.harness.main` is its Hydra entry point and
:mod:`quantbench.harness.sweep` turns a ``--multirun`` into a verdict. Tasks
are reached only through config (``_target_`` in ``conf/task/*.yaml``) and the
protocol in :mod:`quantbench.training.protocol`; MLflow only through
:mod:`quantbench.harness.tracking`. The harness holds Hydra, MLflow, sweeps,
tracking and reports' inputs; what tasks share (training, data-parallel
helpers, checkpoints, the baseline cache) is in :mod:`quantbench.training`,
below it.

Names load on first use: ``import quantbench.harness.<module>`` does not import torch or
MLflow unless that module does.
"""

from __future__ import annotations

from quantbench.lazy import lazy_exports

__all__ = [
    "BadInputError",
    "CorruptDataError",
    "DataError",
    "DataNotFoundError",
    "PredictFn",
    "RunResult",
    "Store",
    "SweepOutcome",
    "TaskAdapter",
    "TrainResult",
    "UsageError",
    "run",
    "sweep",
]

#: exported name -> the module that defines it (imported on first use: PEP 562)
_WHERE = {
    "BadInputError": "quantbench.errors",
    "CorruptDataError": "quantbench.errors",
    "DataError": "quantbench.errors",
    "DataNotFoundError": "quantbench.errors",
    "RunResult": "quantbench.harness.run",
    "run": "quantbench.harness.run",
    "SweepOutcome": "quantbench.harness.sweep",
    "UsageError": "quantbench.harness.sweep",
    "sweep": "quantbench.harness.sweep",
    "Store": "quantbench.harness.tracking",
    "PredictFn": "quantbench.training",
    "TaskAdapter": "quantbench.training",
    "TrainResult": "quantbench.training",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
