"""Local parallel sweeps: launcher choice, threads per job, dispatch order (the end-to-end runs are slow tests)."""

from __future__ import annotations

import pytest

from quantbench.harness.config import compose_config
from quantbench.harness.run import resolve_threads
from quantbench.harness.sweep import UsageError, launcher_overrides
from quantbench.harness.warmup import longest_first, sweep_values


def test_jobs_pick_the_parallel_launcher_and_share_the_cores():
    assert launcher_overrides(1) == ["hydra/launcher=basic"]
    cores = resolve_threads(0)
    assert launcher_overrides(2) == ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                                     f"run.threads={max(1, cores // 2)}"]
    assert launcher_overrides(2, overrides=["run.threads=3"])[-1] == "hydra.launcher.n_jobs=2", "user's threads win"
    assert launcher_overrides(1, "slurm") == ["hydra/launcher=slurm"]
    with pytest.raises(UsageError, match="unknown"):
        launcher_overrides(1, "kubernetes")
    with pytest.raises(UsageError, match="one job at a time"):
        launcher_overrides(2, "basic")
    cfg = compose_config(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 3
    slurm = compose_config(["hydra/launcher=slurm"], hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_task == 1 and slurm.timeout_min > 0


def test_swept_values_follow_hydra_and_qat_goes_first():
    params = {"model": "resnet18,mobilenet_v2", "scheme": "float,ptq_pow2,qat_lsq,qat_tqt"}
    assert sweep_values(params, []) == {"model": ["resnet18", "mobilenet_v2"],
                                        "scheme": ["float", "ptq_pow2", "qat_lsq", "qat_tqt"]}
    values = sweep_values(params, ["model=resnet18", "scheme=float,qat_pow2", "run.seed=1"])
    assert values == {"model": ["resnet18"], "scheme": ["float", "qat_pow2"]}, "the command line replaces params"
    base = ["sweep=digits", "model=resnet18", "scheme=float"]
    assert longest_first(values, base) == ["scheme=qat_pow2,float"]
    assert longest_first({"scheme": ["qat_lsq", "float"]}, base) == [], "already longest first"
