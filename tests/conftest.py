"""Shared fixtures: data sets written once per session, configs composed from ``conf/`` as ``make sweep`` does,
and a throwaway MLflow store per test (real sqlite, real artifact folder).

Tests that build a task do it through :func:`compose` / :func:`make_task`: the
config is the one Hydra composes from ``conf/`` (the same YAML that ``make
sweep`` runs), with the test's overrides on top, so what a test trains is what
the sweep trains unless the test says otherwise.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch spins up its thread pool

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
from harness_overrides import DEPLOY_FAST

#: The test files with the most test time (seconds on two cores, from ``pytest --durations=0``), longest
#: first. ``make test`` hands whole files to its pytest-xdist workers (``--dist loadfile``, so a module's
#: fixtures run once) in collection order (``--no-loadscope-reorder``): starting with the longest files
#: leaves only short ones for the end, so the workers finish together (longest-processing-time-first).
#: Order only: a file missing here runs after these, a stale entry costs a few seconds, never a test.
LONGEST_FILES = ("test_harness.py", "test_engine_kernels.py", "test_configs.py", "test_report_record.py",
                 "test_report.py", "test_cli_surface.py", "test_parity.py", "test_faults.py",
                 "test_detection_sweep.py", "test_classification.py", "test_engines.py", "test_hard_grid.py",
                 "test_peers_torchao.py", "test_detection_resume.py", "test_tracking_mlflow.py", "test_compat.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def _no_stray_child_processes():
    """Kill the child processes a test leaves running (one that timed out while its spawned ranks or
    forked writers still ran): the session would otherwise wait for them at exit, and share the CPU
    with them until then. A test that passes has joined its children; this finds none."""
    yield
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=30)


def compose(*overrides: str) -> dict[str, Any]:
    """The resolved config tree (plain containers) of ``overrides``, exactly as a run sees it."""
    from quantbench.harness.config import compose_config
    from quantbench.harness.run import resolve_tree

    return resolve_tree(compose_config(list(overrides)))


def make_task(*overrides: str) -> Any:
    """The task adapter that a run of ``overrides`` builds (``task._target_`` with data, model and recipes)."""
    from quantbench.harness.run import build_task

    return build_task(compose(*overrides))


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store whose schema is created: a copy is a fresh store without the
    second or two of migrations that creating one costs. (Creating stores, concurrently too, is
    tested with stores of their own in test_faults.py.)"""
    from quantbench.harness.tracking import Store

    root = tmp_path_factory.mktemp("empty_store")
    Store(f"sqlite:///{root}/mlflow.db", str(root / "artifacts"))
    return root / "mlflow.db"


def _fresh_store(empty_store_db: Path, tmp: Path) -> list[str]:
    root = tmp / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store_db, root / "mlflow.db")
    return [f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/artifacts"]


@pytest.fixture
def tracking_overrides(tmp_path, empty_store_db) -> list[str]:
    """Hydra overrides that point tracking at a fresh sqlite store under ``tmp_path``."""
    return _fresh_store(empty_store_db, tmp_path)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The digits ImageFolder tree at 32x32 (what the digits task writes on first use), once per session."""
    from tasks.classification.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", size=32, seed=0)


@pytest.fixture(scope="session")
def digits16_root(tmp_path_factory) -> Path:
    """The digits tree at 16x16: the same images, a quarter of the pixels (fast end-to-end runs)."""
    from tasks.classification.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits16", size=16, seed=0)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small shapes set in the COCO layout (40 train, 12 val images of 56-80 px), once per session."""
    from tasks.detection.shapes import write_shapes_coco

    return write_shapes_coco(tmp_path_factory.mktemp("data") / "shapes", n_train=40, n_val=12, min_size=56,
                             max_size=80, seed=3)


@pytest.fixture(scope="session")
def shapes_tiny_root(tmp_path_factory) -> Path:
    """A tiny shapes set (16 train, 4 val images of 48-64 px) for training-loop tests."""
    from tasks.detection.shapes import write_shapes_coco

    return write_shapes_coco(tmp_path_factory.mktemp("data") / "shapes_tiny", n_train=16, n_val=4, min_size=48,
                             max_size=64, seed=3)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One cache for the session: ``task.cache_dir`` (float baselines) of the override fixtures and
    ``run.fp32_onnx_cache`` of :func:`run_overrides`.

    Entries are keyed by everything that determines them, so tests that run the same tiny
    baseline train (and export) it once; a test that checks a cache itself passes a
    ``task.cache_dir`` or ``run.fp32_onnx_cache`` of its own.
    """
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def digits_overrides(digits16_root, session_cache) -> tuple[str, ...]:
    """A seconds-long digits run: the tiny Test-ResNet on the 16x16 tree, a few baseline steps, the
    session's cache. A tuple (shared by the session): spread it, ``[*digits_overrides, "scheme=float"]``.
    """
    return ("task=digits", "model=test_resnet", f"data.root={digits16_root}", "data.generate=null",
            "data.image_size=16", "data.resize_size=16", f"task.cache_dir={session_cache}", "task.device=cpu",
            "train.baseline.steps=10")


@pytest.fixture(scope="session")
def shapes_overrides(shapes_root, session_cache) -> tuple[str, ...]:
    """A seconds-long shapes run: the tiny detector at 64 px, a few baseline steps, the session's cache."""
    return ("task=shapes", "model=yolo_nas_test", f"data.root={shapes_root}", "data.generate=null",
            "data.image_size=64", "data.calib_size=16", "data.calib_batch_size=8", "data.eval_batch_size=12",
            f"task.cache_dir={session_cache}", "task.device=cpu", "train.baseline.steps=6",
            "train.baseline.batch_size=8")


@pytest.fixture(scope="session")
def shapes_tiny_overrides(shapes_tiny_root, session_cache) -> tuple[str, ...]:
    """The tiny detector on :func:`shapes_tiny_root` (16 train images: 4 steps of 4 per epoch) for training tests."""
    return ("task=shapes", "model=yolo_nas_test", f"data.root={shapes_tiny_root}", "data.generate=null",
            "data.image_size=64", "data.calib_size=8", "data.calib_batch_size=4", "data.eval_batch_size=4",
            f"task.cache_dir={session_cache}", "task.device=cpu", "train.baseline.steps=2",
            "train.baseline.batch_size=4")


def _run_overrides(empty_store_db: Path, tmp: Path, fp32_cache: Path) -> list[str]:
    return [*_fresh_store(empty_store_db, tmp), "run.latency_iters=2", *DEPLOY_FAST, "run.latency_batch=4",
            f"run.fp32_onnx_cache={fp32_cache}", f"run.resume_root={tmp}/resume", f"hydra.sweep.dir={tmp}/multirun",
            f"hydra.run.dir={tmp}/outputs"]


@pytest.fixture(scope="session")
def run_overrides_in(empty_store_db) -> Callable[[Path], list[str]]:
    """``tmp -> overrides`` of :func:`run_overrides`, everything under ``tmp`` (the fp32 ONNX cache too),
    for module-scoped fixtures that run once."""
    return lambda tmp: _run_overrides(empty_store_db, tmp, tmp / "fp32_onnx")


@pytest.fixture
def run_overrides(tmp_path, empty_store_db, session_cache, monkeypatch) -> list[str]:
    """What a test run or sweep adds to a task's overrides: a fresh store (as :func:`tracking_overrides`),
    Hydra's output dirs and QAT checkpoints under ``tmp_path``, the session's fp32 ONNX cache, short
    latency loops, no progress bars. Nothing is written into the checkout."""
    monkeypatch.setenv("CI", "true")
    return _run_overrides(empty_store_db, tmp_path, session_cache / "fp32_onnx")


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function that returns a TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def task_factory() -> Callable[..., Any]:
    """:func:`make_task` as a fixture, for tests that build several tasks."""
    return make_task


@pytest.fixture(scope="session")
def compose_tree() -> Callable[..., dict[str, Any]]:
    """:func:`compose` as a fixture: the resolved config tree of some overrides."""
    return compose
