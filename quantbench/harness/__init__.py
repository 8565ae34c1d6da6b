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
"""

from quantbench.errors import BadInputError, CorruptDataError, DataError, DataNotFoundError
from quantbench.harness.run import RunResult, run
from quantbench.harness.sweep import SweepOutcome, UsageError, sweep
from quantbench.harness.tracking import Store
from quantbench.training import PredictFn, TaskAdapter, TrainResult

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
