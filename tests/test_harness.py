"""End to end on a tiny model and a slice of the real digits data: real Hydra multiruns into a
throwaway sqlite MLflow store, real ONNX files checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.engine import presets
from quantbench.harness.config import compose_config, first_job_overrides
from quantbench.harness.run import run
from quantbench.harness.sweep import sweep
from quantbench.harness.tracking import Store, flatten
from quantbench.report import write_report

QUANT_METRICS = ("float/top1", "float/top5", "quant/top1", "quant/top5", "onnx/top1", "onnx/top5",
                 "onnx/parity_top1", "onnx/max_lsb_err", "quant/sqnr_db", "latency/ort_fp32_ms",
                 "latency/ort_int8_ms", "time/quantize_s", "coverage/quantized_ops")
FLOAT_METRICS = ("float/top1", "onnx/top1", "onnx/parity_top1", "latency/ort_fp32_ms")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """The real digits tree, written once through ``quantbench data digits``."""
    root = tmp_path_factory.mktemp("data") / "digits"
    assert main(["data", "digits", "--out", str(root)]) == 0
    assert {p.name for p in root.iterdir()} == {"train", "val"}
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One float-baseline cache for the module: the tiny baseline trains once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def small(digits_root, cache_dir, tmp_path, tracking_overrides, monkeypatch) -> list[str]:
    """Overrides that shrink a digits run to seconds: tiny model, a slice of val, short loops."""
    monkeypatch.setenv("CI", "true")
    return [*tracking_overrides, "model=test_resnet", f"data.root={digits_root}", "data.generate=null",
            "data.val_fraction=0.15", "data.calib_size=32", "data.calib_batch_size=16",
            f"task.cache_dir={cache_dir}", "task.device=cpu", "train.baseline.steps=10",
            "train.qat.steps=2", "scheme.calib_batches=1", "run.latency_iters=2", "run.latency_batch=4",
            f"run.fp32_onnx_cache={cache_dir}/fp32_onnx",
            f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.run.dir={tmp_path}/outputs"]


def _store(overrides: list[str]) -> Store:
    return Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))


def _by_scheme(runs) -> dict:
    return {r.data.tags["scheme"]: r for r in runs}


def _check_artifacts(store: Store, run, tmp_path: Path, quantized: bool) -> None:
    names = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert {"model.onnx", "config.yaml"} <= names
    if quantized:
        assert {"node_sqnr.csv", "node_sqnr.png", "float_nodes.csv"} <= names
        csv = Path(store.client.download_artifacts(run.info.run_id, "node_sqnr.csv", str(tmp_path)))
        assert csv.read_text().startswith("node,op,sqnr_db\n") and len(csv.read_text().splitlines()) > 3
    onnx = store.client.download_artifacts(run.info.run_id, "model.onnx", str(tmp_path))
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.randn(3, 3, 32, 32).numpy()})[0]
    assert out.shape == (3, 10)
    ops = {n.op_type for n in __import__("onnx").load(onnx).graph.node}
    assert ("QuantizeLinear" in ops) == quantized


def test_sweep_end_to_end_resume_and_report(small, tmp_path, cache_dir):
    args = [*small, "scheme=float,ptq_pow2"]
    outcome = sweep("digits", args, sweep_id="e2e-1")
    assert outcome.ok, outcome
    assert sorted(outcome.finished) == ["test_resnet x float", "test_resnet x ptq_pow2"]

    store = _store(small)
    runs = _by_scheme(store.sweep_runs("e2e-1"))
    assert runs["ptq_pow2"].info.status == "FINISHED"
    for scheme, keys in (("float", FLOAT_METRICS), ("ptq_pow2", QUANT_METRICS)):
        missing = set(keys) - set(runs[scheme].data.metrics)
        assert not missing, f"{scheme} lacks {missing}"
    ptq = runs["ptq_pow2"]
    assert ptq.data.metrics["onnx/parity_top1"] >= 90.0
    assert {"sweep", "git_sha", "config_hash", "status"} <= set(ptq.data.tags)
    assert ptq.data.tags["status"] == "FINISHED" and ptq.data.tags["sweep"] == "e2e-1"
    job = compose_config(first_job_overrides(["sweep=digits", "tracking.sweep_id=e2e-1", *small,
                                              "scheme=ptq_pow2"]))
    tree = OmegaConf.to_container(job, resolve=True)
    assert ptq.data.params == flatten(tree)  # every resolved leaf, nothing else
    for scheme, r in runs.items():
        _check_artifacts(store, r, tmp_path / scheme, quantized=scheme != "float")
    assert len(list((cache_dir / "fp32_onnx").glob("*.onnx"))) == 1  # one float graph, exported once

    # resume: both are FINISHED with the same config (the QAT recipe does not concern PTQ runs)
    again = sweep("digits", [*args, "train.qat.lr=0.5"], sweep_id="e2e-2")
    assert again.ok and again.finished == [] and store.sweep_runs("e2e-2") == [] and again.skipped == 2
    (cached,) = (cache_dir / "fp32_onnx").glob("*.onnx")
    cached.write_bytes(cached.read_bytes()[:1000])  # a truncated cache entry is exported again
    forced = sweep("digits", [*small, "scheme=float", "run.force=true"], sweep_id="e2e-3")
    assert forced.finished == ["test_resnet x float"]
    __import__("onnx").checker.check_model(str(cached))
    assert runs["float"].data.tags["config_hash"] == store.sweep_runs("e2e-3")[0].data.tags["config_hash"]

    report = write_report("digits", small, out_dir=tmp_path / "reports", readme=tmp_path / "README.md")
    rows = [line for line in report.table.splitlines()[2:]]
    assert len(rows) == 2 and rows[0].startswith("| Test-ResNet | float |")
    m = ptq.data.metrics
    assert f"| {m['quant/top1']:.2f} / {m['quant/top5']:.2f} | {m['onnx/top1']:.2f} / {m['onnx/top5']:.2f} |" in rows[1]


def test_failed_run_is_recorded_and_the_sweep_goes_on(small, tmp_path, capsys):
    # ptq_float with int32 weights is rejected by the engine's spec (int32 is for bias only); the
    # float scheme ignores weight overrides and finishes after it.
    code = main(["sweep", "digits", "--id", "fail-1", *small, "scheme=ptq_float,float", "scheme.weight.dtype=int32"])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 jobs: 1 FINISHED, 1 FAILED, 0 skipped" in out and "FAILED test_resnet x ptq_float: SpecError" in out
    runs = _by_scheme(_store(small).sweep_runs("fail-1"))
    failed, finished = runs["ptq_float"], runs["float"]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "FAILED"
    assert "int32" in failed.data.tags["error"] and "\n" not in failed.data.tags["error"]
    trace = Path(_store(small).client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path)))
    assert trace.read_text().startswith("Traceback")
    assert finished.info.status == "FINISHED" and "onnx/top1" in finished.data.metrics


def test_missing_data_is_one_line_and_exit_2(small, tmp_path, capsys):
    gone = [*small, f"data.root={tmp_path}/no-such-dir", "scheme=ptq_pow2"]
    for command in (["sweep", "digits", *gone], ["run", *gone]):
        assert main(command) == 2
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.startswith("quantbench:")]
        assert len(lines) == 1 and "data not found" in lines[0]
        assert "no-such-dir" in lines[0] and "data.root" in lines[0]
        assert "Traceback" not in captured.err + captured.out


def test_unknown_task_and_bad_override_exit_2(small, capsys):
    assert main(["sweep", "nosuch", *small]) == 2
    assert "no sweep for task 'nosuch'" in capsys.readouterr().err
    assert main(["sweep", "digits", *small, "scheme.calib_bacthes=2"]) == 2
    assert "calib_bacthes" in capsys.readouterr().err


def test_qat_scheme_runs_or_fails_clearly(small):
    cfg = compose_config([*small, "scheme=qat_lsq"])
    result = run(cfg)
    if "qat_lsq" not in presets.list():
        assert result.status == "FAILED"
        assert "needs the engine's QAT preset 'qat_lsq'" in result.error
        return
    assert result.status == "FINISHED", result.error
    assert {"time/qat_s", "quant/top1", "onnx/top1"} <= set(result.metrics)
