"""Bad inputs get one clear line and exit status 2, and nothing already recorded is lost.

Real stores, real processes: a port nobody listens on, a process that SIGKILLs itself
with its run RUNNING, two processes logging into one sqlite store at once, a PNG that
is not a PNG. The slow end-to-end faults (a sweep killed mid-run, a full disk, the
tracking server under load) are in test_cluster.py.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness_overrides import DEPLOY_FAST
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.errors import UnsafeConfigError
from quantbench.harness.config import compose_config
from quantbench.harness.liveness import HOST, stale_reason
from quantbench.harness.tracking import Store, safe_artifact_path


@pytest.fixture
def small(digits_overrides, run_overrides) -> list[str]:
    """A float run of conftest's digits task on a tenth of val, into a fresh store."""
    return [*digits_overrides, *run_overrides, "scheme=float", "data.val_fraction=0.1", "data.calib_size=16",
            "data.calib_batch_size=16", "run.latency_iters=1", *DEPLOY_FAST, "run.latency_batch=2"]


def _store(overrides: list[str]) -> Store:
    return Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("quantbench")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unreachable_tracking_server_fails_fast_naming_it(small, capsys, free_port):
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (["sweep", "digits", *small, f"tracking.uri={uri}"], ["run", *small, f"tracking.uri={uri}"]):
        start = time.monotonic()
        assert main(command) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert uri in line and "unreachable" in line and "make server" in line
        assert time.monotonic() - start < 30, "no retry loop"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_and_nothing_recorded(small, capsys):
    for command in (["sweep", "digits", *small, "task.device=cuda"], ["run", *small, "task.device=cuda:0"]):
        assert main(command) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "no CUDA device" in line and "task.device=cpu" in line
    assert _store(small).search("") == []


def test_config_cannot_name_foreign_code(small, tmp_path, capsys):
    marker = tmp_path / "pwned"
    attempts = [
        [f"+model.kwargs.hook={{_target_: pathlib.Path.touch, self: {marker}}}"],
        ["task._target_=subprocess.call"],
    ]
    for extra in attempts:
        assert main(["run", *small, *extra]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "_target_" in line
    assert not marker.exists()
    from quantbench.harness.run import check_config

    with pytest.raises(UnsafeConfigError, match=r"data\[0\]._target_"):
        check_config({"task": {"_target_": "tasks.classification.adapter.ClassificationTask"},
                      "data": [{"_target_": "os.system"}]})


def _location(tracking_overrides: list[str]) -> tuple[str, str]:
    """(uri, artifact root) of conftest's fresh store."""
    uri, root = (o.split("=", 1)[1] for o in tracking_overrides)
    return uri, root


def test_artifact_paths_stay_inside_the_run(tmp_path, tracking_overrides):
    store = Store(*_location(tracking_overrides))
    recorder = store.start_run("e", "r", {})
    for bad in ("../escape.txt", "/etc/passwd", "a/../../b", "~/x"):
        with pytest.raises(ValueError, match="inside the run"):
            recorder.log_text("x", bad)
        with pytest.raises(ValueError, match="inside the run"):
            recorder.log_artifact(tmp_path / "mlruns" / "mlflow.db", bad)
    recorder.log_text("fine", "sub/ok.txt")
    assert safe_artifact_path("plots/a.png") == "plots/a.png"
    assert not list(tmp_path.rglob("escape*")), "nothing written outside the run's folder"
    recorder.finish()


def _die_with_a_running_run(uri: str, root: str, conn) -> None:
    store = Store(uri, root)
    recorder = store.start_run("digits", "m-s", {"config_hash": "c0ffee", "model": "m", "scheme": "s"})
    conn.send(recorder.run_id)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_runs_record_is_marked_failed_and_a_live_one_is_left_alone(tracking_overrides):
    uri, root = _location(tracking_overrides)
    ctx = multiprocessing.get_context("fork")  # see check_concurrent_logging
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_die_with_a_running_run, args=(uri, root, send))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    dead = receive.recv()
    store = Store(uri, root)
    live = store.start_run("digits", "live", {"config_hash": "c0ffee"})
    assert store.client.get_run(dead).data.tags["status"] == "RUNNING"
    assert store.reap_stale("digits") == [dead]
    run = store.client.get_run(dead)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "FAILED"
    assert run.data.tags["error"].startswith("killed: its process") and run.data.tags["error_kind"] == "killed"
    assert store.client.get_run(live.run_id).data.tags["status"] == "RUNNING"
    assert store.reap_stale("digits") == []
    live.finish()


def test_stale_verdict_for_other_hosts_goes_by_heartbeat():
    now = 1_000_000_000
    away = {"host": f"not-{HOST}", "pid": "1", "heartbeat": str(now - 30_000)}
    assert stale_reason(away, now - 60_000, stale_after_s=60, now_ms=now) is None
    reason = stale_reason({**away, "heartbeat": str(now - 600_000)}, now - 900_000, stale_after_s=60, now_ms=now)
    assert reason.startswith("killed: no heartbeat") and f"not-{HOST}" in reason
    here = {"host": HOST, "pid": str(os.getpid()), "heartbeat": "0"}
    assert stale_reason(here, 0, stale_after_s=1, now_ms=now) is None, "a live local process is never stale"


def test_heartbeat_keeps_a_live_run_fresh(tracking_overrides):
    store = Store(*_location(tracking_overrides))
    recorder = store.start_run("e", "r", {}, heartbeat_s=0.2)
    first = int(store.client.get_run(recorder.run_id).data.tags["heartbeat"])
    deadline = time.monotonic() + 30
    while int(store.client.get_run(recorder.run_id).data.tags["heartbeat"]) == first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.1)
    recorder.finish()
    assert store.client.get_run(recorder.run_id).data.tags["status"] == "FINISHED"


RUNS, METRICS, STEPS = 4, 12, 3


def _log_runs(uri: str, root: str | None, worker: int, out: Path) -> None:
    store = Store(uri, root)
    for i in range(RUNS):
        recorder = store.start_run("concurrent", f"w{worker}-{i}", {"worker": str(worker), "i": str(i)})
        recorder.log_params({f"p{k}": str(k) for k in range(30)})
        for step in range(STEPS):
            recorder.log_metrics({f"m/{k}": worker * 1000 + i * 100 + k + step for k in range(METRICS)}, step=step)
        recorder.log_text(f"worker {worker} run {i}\n", "notes/run.txt")
        path = out / f"blob-{worker}-{i}.bin"
        path.write_bytes(os.urandom(50_000))
        recorder.log_artifact(path)
        recorder.finish()


def check_concurrent_logging(uri: str, root: str | None, tmp_path: Path) -> None:
    """Two processes log RUNS runs each into one store at the same time; every row must be there.

    The processes are forked: they touch only MLflow and the store, and a spawned one would spend
    seconds importing torch and the harness again before its first write.
    """
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_log_runs, args=(uri, root, w, tmp_path)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0, f"a logging process failed (exit {p.exitcode})"
    store = Store(uri, root)
    runs = store.search("", ["concurrent"])
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{w}-{i}" for w in (1, 2) for i in range(RUNS))
    for run in runs:
        assert run.info.status == "FINISHED" and len(run.data.params) == 30
        w, i = int(run.data.tags["worker"]), int(run.data.tags["i"])
        assert len(run.data.metrics) == METRICS
        history = store.client.get_metric_history(run.info.run_id, "m/5")
        assert sorted((m.step, m.value) for m in history) == [(s, w * 1000 + i * 100 + 5 + s) for s in range(STEPS)]
        names = {a.path for a in store.client.list_artifacts(run.info.run_id)}
        assert names == {"notes", f"blob-{w}-{i}.bin"}
        blob = store.client.download_artifacts(run.info.run_id, f"blob-{w}-{i}.bin", str(tmp_path / "dl"))
        assert Path(blob).read_bytes() == (tmp_path / f"blob-{w}-{i}.bin").read_bytes()


def test_two_processes_logging_to_one_new_sqlite_store_lose_nothing(tmp_path):
    check_concurrent_logging(f"sqlite:///{tmp_path}/new/mlflow.db", str(tmp_path / "artifacts"), tmp_path)


@pytest.fixture
def corrupt(digits16_root, tmp_path, small) -> SimpleNamespace:
    """A copy of the digits tree with one val PNG that is a header and nothing else, and a run's overrides on it."""
    root = tmp_path / "digits"
    shutil.copytree(digits16_root, root)
    bad = sorted((root / "val" / "3").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return SimpleNamespace(bad=bad, args=[*small, f"data.root={root}", "data.val_fraction=1.0"])


def test_corrupt_image_fails_the_run_naming_it(corrupt, small, capsys):
    assert main(["run", *corrupt.args]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(corrupt.bad) in line and "data.on_corrupt=skip" in line
    (failed,) = _store(small).search("")
    assert failed.data.tags["status"] == "FAILED" and str(corrupt.bad) in failed.data.tags["error"]
    assert failed.data.tags["error_kind"] == "input"


@pytest.mark.slow  # ~6 s: a full run; the failing half (test_corrupt_image_fails_the_run_naming_it) is fast
def test_corrupt_image_is_skipped_when_the_config_says_so(corrupt, small, capsys, caplog):
    assert main(["run", *corrupt.args, "data.on_corrupt=skip"]) == 0
    assert f"skipping corrupt image {corrupt.bad}" in capsys.readouterr().out + caplog.text
    (finished,) = _store(small).search("")
    assert finished.data.tags["status"] == "FINISHED" and finished.data.metrics["onnx/top1"] >= 0
