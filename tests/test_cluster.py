"""Beyond one process, and nothing lost: end to end, as a user runs it (slow tier: make test-slow).

* torchrun: 2 CPU ranks of a tiny QAT agree on every quantizer, log one run, and land
  within noise of the single-process run;
* a sweep SIGKILLed during QAT, run again: only the missing run is redone, it resumes from
  its checkpoint to the uninterrupted result, the stale record is marked FAILED (killed),
  and the store stays readable by ``mlflow`` and ``quantbench report``;
* parallel sweeps on Hydra's joblib and submitit (local executor) launchers;
* a tracking server (``quantbench server``) that two processes and a parallel sweep log to;
* a full disk under the artifact store (a tmpfs in a user namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from harness_overrides import DEPLOY_FAST
from test_faults import check_concurrent_logging

from quantbench.harness.tracking import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # each runs sweeps in subprocesses (900 s each at most)

QB = [sys.executable, "-m", "quantbench.cli"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _env() -> dict[str, str]:
    return {**os.environ, "CI": "true", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _store_args(where: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{where}/mlflow.db", f"tracking.artifact_root={where}/artifacts"]


def _common(digits_root: Path, cache: Path, tmp: Path) -> list[str]:
    return ["model=test_resnet", f"data.root={digits_root}", "data.generate=null", "data.calib_size=64",
            f"task.cache_dir={cache}", "task.device=cpu", "train.baseline.epochs=2", "scheme.calib_batches=2",
            "run.latency_iters=2", *DEPLOY_FAST, "run.latency_batch=8", "run.threads=1", f"run.fp32_onnx_cache={cache}/fp32",
            f"run.resume_root={tmp}/resume", f"hydra.sweep.dir={tmp}/multirun", f"hydra.run.dir={tmp}/outputs"]


def _qb(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*QB, *args], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def _runs(where: Path) -> list:
    return Store(f"sqlite:///{where}/mlflow.db", f"{where}/artifacts").search("")


def _metric_history(store: Store, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(store.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_torchrun_two_ranks_agree_and_match_one_process(digits_root, cache, tmp_path):
    args = _common(digits_root, cache, tmp_path)
    float_run = _qb("run", *args, *_store_args(tmp_path / "float"), "scheme=float", "train.baseline.epochs=8")
    assert float_run.returncode == 0, float_run.stderr[-3000:]
    (baseline,) = (cache / "baselines").glob("digits_test_resnet_*.pt")  # both QAT runs start from it
    qat = [*args, "scheme=qat_pow2", f"model.checkpoint={baseline}", "train.qat.steps=null",
           "train.qat.epochs=2", "train.qat.lr=1e-4"]
    single = _qb("run", *qat, *_store_args(tmp_path / "one"), "train.qat.batch_size=64")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _qb("run", "--nproc", "2", *qat, *_store_args(tmp_path / "ddp"),
              "train.qat.batch_size=32")  # 2 ranks x 32: the single run's global batch and step count
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    (one,) = _runs(tmp_path / "one")
    runs = _runs(tmp_path / "ddp")
    assert len(runs) == 1, "only rank 0 logs to MLflow"
    (two,) = runs
    assert two.data.tags["status"] == "FINISHED"
    assert "joined a gloo process group: rank 0 of 2" in ddp.stdout + ddp.stderr
    store = Store(f"sqlite:///{tmp_path}/ddp/mlflow.db", f"{tmp_path}/ddp/artifacts")
    spread = _metric_history(store, two.info.run_id, "qat/ddp_quantizer_spread")
    assert spread == [0.0, 0.0], "after every epoch both ranks hold identical scales, zero points, ranges"
    assert two.data.metrics["qat/step"] == one.data.metrics["qat/step"]
    for key in ("quant/top1", "onnx/top1"):  # 360 val images: one image is 0.28 points
        assert abs(two.data.metrics[key] - one.data.metrics[key]) <= 3.0, (key, two.data.metrics[key],
                                                                          one.data.metrics[key])
    assert one.data.metrics["quant/top1"] > 50.0, "a model that learned something, or the comparison is empty"


def _sweep_cmd(digits_root: Path, cache: Path, tmp: Path, sweep_id: str) -> list[str]:
    return [*QB, "sweep", "digits", "--id", sweep_id, *_common(digits_root, cache, tmp), *_store_args(tmp),
            "scheme=float,ptq_float,qat_pow2", "train.qat.steps=null", "train.qat.epochs=3",
            "train.qat.checkpoint_steps=4", "train.qat.lr=1e-4"]


def test_sigkilled_sweep_redoes_only_what_is_missing_and_qat_resumes(digits_root, cache, tmp_path):
    cmd = _sweep_cmd(digits_root, cache, tmp_path, "killed")
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "resume").glob("*/last.pt")):  # QAT has written a checkpoint
        assert proc.poll() is None, "the sweep ended before QAT checkpointed"
        assert time.monotonic() < deadline, "no QAT checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    before = {r.data.tags["scheme"]: r for r in _runs(tmp_path)}
    assert {s: r.data.tags["status"] for s, r in before.items()} == {
        "float": "FINISHED", "ptq_float": "FINISHED", "qat_pow2": "RUNNING"}

    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 jobs: 1 FINISHED, 0 FAILED, 2 skipped" in again.stdout
    assert "resuming from" in again.stdout + again.stderr
    after = _runs(tmp_path)
    assert len(after) == 4, "float and ptq_float are not redone"
    stale = next(r for r in after if r.info.run_id == before["qat_pow2"].info.run_id)
    assert stale.info.status == "FAILED" and stale.data.tags["error"].startswith("killed: its process")
    resumed = next(r for r in after if r.data.tags["scheme"] == "qat_pow2" and r.data.tags["status"] == "FINISHED")
    assert not list((tmp_path / "resume").glob("*/last.pt")), "the finished run's checkpoint is gone"

    reference = tmp_path / "reference"  # the same QAT, never interrupted
    straight = _qb("run", *_common(digits_root, cache, reference), *_store_args(reference), "scheme=qat_pow2",
                   "train.qat.steps=null", "train.qat.epochs=3", "train.qat.checkpoint_steps=4",
                   "train.qat.lr=1e-4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    (ref,) = _runs(reference)
    stores = (Store(f"sqlite:///{tmp_path}/mlflow.db", f"{tmp_path}/artifacts"),
              Store(f"sqlite:///{reference}/mlflow.db", f"{reference}/artifacts"))
    for key in ("qat/val_top1", "qat/train_loss", "qat/train_top1"):
        assert _metric_history(stores[0], resumed.info.run_id, key) == _metric_history(stores[1], ref.info.run_id, key)
    for key in ("quant/top1", "onnx/top1", "quant/sqnr_db"):
        assert resumed.data.metrics[key] == ref.data.metrics[key], key

    sweep_args = cmd[cmd.index("killed") + 1:]  # a report reads the sweep of exactly these overrides
    report = _qb("report", "digits", "--sweep", "killed", "--out", str(tmp_path / "reports"), *sweep_args)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.count("| Test-ResNet |") == 3
    exp = stores[0].experiment_id("digits", create=False)
    listed = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "runs", "list", "--experiment-id", exp],
                            capture_output=True, text=True, timeout=300,
                            env={**_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert all(r.info.run_id in listed.stdout for r in after)


EXPECTED = {"float/top1", "onnx/top1", "onnx/parity_top1", "latency/ort_fp32_ms", "time/total_s"}


def _check_sweep(where: Path, sweep_id: str, schemes: set[str], models: int = 1) -> None:
    store = Store(f"sqlite:///{where}/mlflow.db", f"{where}/artifacts")
    runs = store.sweep_runs(sweep_id)
    assert {r.data.tags["scheme"] for r in runs} == schemes and len(runs) == models * len(schemes)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "FINISHED"
        assert EXPECTED <= set(run.data.metrics), EXPECTED - set(run.data.metrics)
        if run.data.tags["scheme"] != "float":
            assert {"quant/top1", "quant/sqnr_db", "latency/ort_int8_ms"} <= set(run.data.metrics)
        assert "config.yaml" in {a.path for a in store.client.list_artifacts(run.info.run_id)}
        assert store.download_model(run.info.run_id, where / "downloads" / run.info.run_id).is_file()


def test_parallel_sweeps_on_joblib_and_submitit_launchers(digits_root, cache, tmp_path):
    args = [*_common(digits_root, cache, tmp_path), "data.val_fraction=0.25"]
    args.remove("run.threads=1")  # the parallel launcher picks cores / jobs
    # a cache of its own: both float baselines are missing, so they train side by side before the jobs start
    own = [f"task.cache_dir={tmp_path}/cache" if a.startswith("task.cache_dir=") else a
           for a in args if a != "model=test_resnet"]
    joblib = _qb("sweep", "digits", "--jobs", "2", "--id", "par", *own, *_store_args(tmp_path / "joblib"),
                 "model=test_resnet,test_mobilenet", "scheme=float,ptq_pow2")
    assert joblib.returncode == 0, joblib.stderr[-3000:]
    out = joblib.stdout + joblib.stderr
    assert "Joblib.Parallel(n_jobs=2" in out
    assert "float baselines of test_resnet, test_mobilenet before the parallel jobs start (2 at a time" in out
    assert "training the test_mobilenet float baseline" in out, "the workers' progress is shown"
    assert len(list((tmp_path / "cache" / "baselines").glob("digits_test_*.pt"))) == 2
    _check_sweep(tmp_path / "joblib", "par", {"float", "ptq_pow2"}, models=2)
    threads = {r.data.params["run.threads"] for r in _runs(tmp_path / "joblib")}
    assert threads == {str(max(1, len(os.sched_getaffinity(0)) // 2))}

    submitit = _qb("sweep", "digits", "--launcher", "slurm_local", "--id", "sub", *args, "run.threads=1",
                   *_store_args(tmp_path / "submitit"), "scheme=float,ptq_pow2")
    assert submitit.returncode == 0, submitit.stderr[-3000:]
    assert "Submitit 'local' sweep" in submitit.stdout + submitit.stderr
    _check_sweep(tmp_path / "submitit", "sub", {"float", "ptq_pow2"})
    assert list((tmp_path / "multirun").glob(".submitit/*/*_result.pkl")), "submitit ran the jobs"


def _wait_healthy(uri: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, "the tracking server exited"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the tracking server did not come up"
        time.sleep(0.5)


def test_tracking_server_takes_concurrent_runs_over_http(digits_root, cache, tmp_path, free_port):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*QB, "server", "--port", str(port), "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server/mlflow.db", "--artifacts-destination",
                               str(tmp_path / "server" / "artifacts")], env=_env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(uri, server)
        check_concurrent_logging(uri, None, tmp_path)
        args = [*_common(digits_root, cache, tmp_path), "data.val_fraction=0.25"]
        swept = _qb("sweep", "digits", "--jobs", "2", "--id", "http", *args, f"tracking.uri={uri}",
                    "scheme=float,ptq_float")
        assert swept.returncode == 0, swept.stderr[-3000:]
        store = Store(uri, None)
        runs = store.sweep_runs("http")
        assert sorted(r.data.tags["scheme"] for r in runs) == ["float", "ptq_float"]
        for run in runs:
            assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
            onnx = store.download_model(run.info.run_id, tmp_path / run.info.run_id)
            assert Path(onnx).stat().st_size > 1000
        assert list((tmp_path / "server" / "artifacts").rglob("model.onnx")), "the server stored them"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_fails_that_run_only_and_a_rerun_completes_it(digits_root, cache, tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    if not _can_mount_tmpfs(artifacts):
        pytest.skip("cannot mount a tmpfs here (no user namespaces)")
    sweep = [*QB, "sweep", "digits", "--id", "disk", *_common(digits_root, cache, tmp_path),
             *_store_args(tmp_path), "data.val_fraction=0.25", "scheme=float,ptq_float"]
    quoted = " ".join(f"'{a}'" for a in sweep)
    # 96 KiB holds the float run's artifacts (config, a 44 KB fp32 ONNX) but not ptq_float's next to them
    # (its 64 KB int8 ONNX). Then more room, and the same sweep again.
    script = (f"mount -t tmpfs -o size=96k tmpfs {artifacts} && "
              f"{quoted} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc; "
              f"mount -o remount,size=8m {artifacts} && {quoted} > {tmp_path}/again.out 2>&1")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), cwd=ROOT, timeout=900)
    assert done.returncode == 0, (tmp_path / "again.out").read_text()[-3000:]
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    out = (tmp_path / "full.out").read_text()
    failed = [line for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert len(failed) == 1 and "ptq_float: no space left on the device writing artifact" in failed[0], out
    assert "Traceback" not in out + (tmp_path / "full.err").read_text()
    assert "2 jobs: 1 FINISHED, 1 FAILED" in out
    assert "2 jobs: 1 FINISHED, 0 FAILED, 1 skipped" in (tmp_path / "again.out").read_text()
    runs = {(r.data.tags["scheme"], r.data.tags["status"]) for r in _runs(tmp_path)}
    assert runs == {("float", "FINISHED"), ("ptq_float", "FAILED"), ("ptq_float", "FINISHED")}
