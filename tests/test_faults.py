"""Bad inputs get one clear line and exit status 2, and nothing already recorded is lost.

Real stores, real processes: a port nobody listens on, a process that SIGKILLs itself
with its run RUNNING, two processes logging into one sqlite store at once, a PNG that
is not a PNG. The slow end-to-end faults (a sweep killed mid-run, a full disk, the
tracking server under load) are in test_cluster.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quantbench.cli import main
from quantbench.harness.errors import UnsafeConfigError
from quantbench.harness.liveness import HOST, stale_reason
from quantbench.harness.tracking import Store, safe_artifact_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "digits"
    assert main(["data", "digits", "--out", str(root), "--size", "16"]) == 0
    return root


@pytest.fixture
def small(digits_root, tmp_path, tracking_overrides, monkeypatch) -> list[str]:
    monkeypatch.setenv("CI", "true")
    return [*tracking_overrides, "model=test_resnet", "scheme=float", f"data.root={digits_root}",
            "data.generate=null", "data.image_size=16", "data.resize_size=16", "data.val_fraction=0.1",
            "data.calib_size=16", "data.calib_batch_size=16", f"task.cache_dir={tmp_path}/cache",
            "task.device=cpu", "train.baseline.steps=4", "run.latency_iters=1", "run.latency_batch=2",
            "run.fp32_onnx_cache=null", f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.run.dir={tmp_path}/out"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("quantbench")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unreachable_tracking_server_fails_fast_naming_it(small, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
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
    assert Store.from_config({"uri": small[0].split("=", 1)[1], "artifact_root": small[1].split("=", 1)[1]}
                             ).search("") == []


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


def test_artifact_paths_stay_inside_the_run(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    recorder = store.start_run("e", "r", {})
    for bad in ("../escape.txt", "/etc/passwd", "a/../../b", "~/x"):
        with pytest.raises(ValueError, match="inside the run"):
            recorder.log_text("x", bad)
        with pytest.raises(ValueError, match="inside the run"):
            recorder.log_artifact(tmp_path / "mlflow.db", bad)
    recorder.log_text("fine", "sub/ok.txt")
    assert safe_artifact_path("plots/a.png") == "plots/a.png"
    assert not list(tmp_path.glob("escape*")) and not (tmp_path / "artifacts" / "escape.txt").exists()
    recorder.finish()


_DIE_WITH_A_RUNNING_RUN = """
import os, signal, sys
from quantbench.harness.tracking import Store
store = Store(sys.argv[1], sys.argv[2])
recorder = store.start_run("digits", "m-s", {"config_hash": "c0ffee", "model": "m", "scheme": "s"})
print(recorder.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_record_is_marked_failed_and_a_live_one_is_left_alone(tmp_path):
    uri, root = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts")
    proc = subprocess.run([sys.executable, "-c", _DIE_WITH_A_RUNNING_RUN, uri, root], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = proc.stdout.split()[-1]
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


def test_heartbeat_keeps_a_live_run_fresh(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
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
    """Two processes log RUNS runs each into one store at the same time; every row must be there."""
    ctx = multiprocessing.get_context("spawn")
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


def _corrupt_copy(digits_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    bad = sorted((root / "val" / "3").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header and nothing else
    return root, bad


def test_corrupt_image_fails_naming_it_or_is_skipped_per_config(small, digits_root, tmp_path, capsys, caplog):
    root, bad = _corrupt_copy(digits_root, tmp_path)
    args = [*small, f"data.root={root}", "data.val_fraction=1.0"]
    assert main(["run", *args]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "data.on_corrupt=skip" in line
    store = Store.from_config({"uri": small[0].split("=", 1)[1], "artifact_root": small[1].split("=", 1)[1]})
    (failed,) = store.search("")
    assert failed.data.tags["status"] == "FAILED" and str(bad) in failed.data.tags["error"]

    assert main(["run", *args, "data.on_corrupt=skip"]) == 0
    assert f"skipping corrupt image {bad}" in capsys.readouterr().out + caplog.text
    finished = [r for r in store.search("") if r.data.tags["status"] == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.metrics["onnx/top1"] >= 0
