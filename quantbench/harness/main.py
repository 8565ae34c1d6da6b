"""The Hydra entry point: ``python -m quantbench.harness.main [--multirun] overrides...``.

It only wraps :func:`quantbench.harness.run.run`. A failed run is already
recorded in MLflow by ``run``; in a single run the process then exits 1 (2 if
a bad input such as a full disk failed it), in a multirun the sweep goes on
(``quantbench sweep`` reports the failures at the end). A bad input that stops
every run (missing or corrupt data, an unreachable tracking server, a missing
device, an unsafe config) stops everything with one line and exit status 2.

Under ``torchrun --nproc_per_node=N -m quantbench.harness.main ...`` ranks
other than 0 keep Hydra's outputs in a temporary directory and log errors only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from quantbench.errors import BadInputError, one_line
from quantbench.harness.config import CONF_DIR
from quantbench.harness.run import RunResult, run
from quantbench.harness.schema import register_configs
from quantbench.training import distributed

__all__ = ["main"]

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> RunResult:
    """One job of a run or a sweep."""
    try:
        result = run(cfg)
    except BadInputError as exc:
        if os.environ.get("QUANTBENCH_DEBUG") == "1":
            traceback.print_exception(exc)
        sys.stderr.write(f"quantbench: {one_line(exc)}\n")
        sys.exit(2)
    if result.status == "FAILED" and HydraConfig.get().mode == RunMode.RUN:
        sys.stderr.write(f"quantbench: {result.label} FAILED: {result.error} (MLflow run {result.run_id})\n")
        sys.exit(2 if result.error_kind == "input" else 1)
    return result


def _quiet_rank_overrides() -> list[str]:
    """Overrides for a torchrun rank other than 0: Hydra's files go to a temporary dir, errors only."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        return []
    where = os.path.join(tempfile.gettempdir(), f"quantbench-rank{rank}-{os.getpid()}")
    return [f"hydra.run.dir={where}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


if __name__ == "__main__":
    sys.argv += _quiet_rank_overrides()
    try:
        main()
    finally:
        distributed.shutdown()  # a torchrun job leaves its process group cleanly
