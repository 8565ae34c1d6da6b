"""The harness: one experiment = task x model x scheme, sequenced and recorded.

``run(cfg) -> RunResult`` does one run (see :mod:`quantbench.harness.run`);
:mod:`quantbench.harness.main` is its Hydra entry point and
:mod:`quantbench.harness.sweep` turns a ``--multirun`` into a verdict. Tasks
are reached only through config (``_target_`` in ``conf/task/*.yaml``) and the
protocol in :mod:`quantbench.harness.protocol`; MLflow only through
:mod:`quantbench.harness.tracking`. Data-parallel training helpers
(torchrun, DDP, sharded data, metric reductions) are in
:mod:`quantbench.harness.distributed`, resumable training checkpoints in
:mod:`quantbench.harness.checkpoint`.
"""

from quantbench.harness.errors import BadInputError
from quantbench.harness.protocol import (
    CorruptDataError,
    DataNotFoundError,
    PredictFn,
    TaskAdapter,
    TrainResult,
)
from quantbench.harness.run import DataError, DataMissingError, RunResult, run
from quantbench.harness.sweep import SweepOutcome, UsageError, sweep
from quantbench.harness.tracking import Store

__all__ = [
    "BadInputError",
    "CorruptDataError",
    "DataError",
    "DataMissingError",
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
