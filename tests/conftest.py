"""Shared fixtures: a throwaway MLflow store per test (real sqlite, real artifact folder)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch spins up its thread pool

import pytest  # noqa: E402


@pytest.fixture
def tracking_overrides(tmp_path) -> list[str]:
    """Hydra overrides that point tracking at a fresh sqlite store under ``tmp_path``."""
    root = tmp_path / "mlruns"
    return [f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/artifacts"]
