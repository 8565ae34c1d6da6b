"""The Hydra entry point: ``python -m quantbench.harness.main [--multirun] overrides...``.

It only wraps :func:`quantbench.harness.run.run`. A failed run is already
recorded in MLflow by ``run``; in a single run the process then exits 1, in a
multirun the sweep goes on (``quantbench sweep`` reports the failures at the
end). A missing data set stops everything with one line and exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from quantbench.harness.config import CONF_DIR
from quantbench.harness.run import DataMissingError, RunResult, run
from quantbench.harness.schema import register_configs

__all__ = ["main"]

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> RunResult:
    """One job of a run or a sweep."""
    try:
        result = run(cfg)
    except DataMissingError as exc:
        sys.stderr.write(f"quantbench: {exc}\n")
        sys.exit(2)
    if result.status == "FAILED" and HydraConfig.get().mode == RunMode.RUN:
        sys.stderr.write(f"quantbench: {result.label} FAILED: {result.error} (MLflow run {result.run_id})\n")
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
