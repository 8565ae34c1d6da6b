"""End to end on a tiny model and a slice of the real digits data: real Hydra multiruns into a
throwaway sqlite MLflow store, real ONNX files checked in onnxruntime.

The small sweep runs once for the module (``e2e``); its tests check one thing each: what was
recorded, the artifacts, resuming, forcing, the report."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.harness import pipeline
from quantbench.harness.config import compose_config, first_job_overrides
from quantbench.harness.sweep import sweep
from quantbench.harness.tracking import Store, flatten
from quantbench.report import write_report

QUANT_METRICS = ("float/top1", "float/top5", "quant/top1", "quant/top5", "onnx/top1", "onnx/top5",
                 "onnx/parity_top1", "onnx/max_lsb_err", "quant/sqnr_db", "latency/ort_fp32_ms",
                 "latency/ort_int8_ms", "time/quantize_s", "coverage/quantized_ops")
FLOAT_METRICS = ("float/top1", "onnx/top1", "onnx/parity_top1", "latency/ort_fp32_ms")
#: On top of conftest's digits run: a slice of val, one calibration batch, two QAT steps.
SMALL = ("data.val_fraction=0.15", "data.calib_size=32", "data.calib_batch_size=16", "train.qat.steps=2",
         "scheme.calib_batches=1")


@pytest.fixture
def small(digits_overrides, run_overrides) -> list[str]:
    """Overrides that shrink a digits run to seconds, into a fresh store."""
    return [*digits_overrides, *run_overrides, *SMALL]


def _store(overrides: list[str]) -> Store:
    return Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))


def _by_scheme(runs) -> dict:
    return {r.data.tags["scheme"]: r for r in runs}


@pytest.fixture(scope="module")
def e2e(digits_overrides, run_overrides_in, tmp_path_factory) -> SimpleNamespace:
    """The small digits sweep (float, ptq_pow2), run once for the module's tests into a store of its own."""
    tmp = tmp_path_factory.mktemp("e2e")
    small = [*digits_overrides, *run_overrides_in(tmp), *SMALL]
    args = [*small, "scheme=float,ptq_pow2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        outcome = sweep("digits", args, sweep_id="e2e-1")
    store = _store(small)
    return SimpleNamespace(outcome=outcome, args=args, small=small, tmp=tmp, store=store,
                           runs=_by_scheme(store.sweep_runs("e2e-1")))


def test_sweep_finishes_every_run_with_its_metrics_tags_and_params(e2e):
    assert e2e.outcome.ok, e2e.outcome
    assert sorted(e2e.outcome.finished) == ["test_resnet x float", "test_resnet x ptq_pow2"]
    assert {s: r.info.status for s, r in e2e.runs.items()} == {"float": "FINISHED", "ptq_pow2": "FINISHED"}
    for scheme, keys in (("float", FLOAT_METRICS), ("ptq_pow2", QUANT_METRICS)):
        missing = set(keys) - set(e2e.runs[scheme].data.metrics)
        assert not missing, f"{scheme} lacks {missing}"
    ptq = e2e.runs["ptq_pow2"]
    assert ptq.data.metrics["onnx/parity_top1"] >= 90.0
    assert {"sweep", "git_sha", "config_hash", "status", "primary_metric"} <= set(ptq.data.tags)
    assert ptq.data.tags["status"] == "FINISHED" and ptq.data.tags["sweep"] == "e2e-1"
    assert ptq.data.tags["primary_metric"] == "top1"
    job = compose_config(first_job_overrides(["sweep=digits", "tracking.sweep_id=e2e-1", *e2e.small,
                                              "scheme=ptq_pow2",
                                              f"tracking.parent_run='{ptq.data.tags['mlflow.parentRunId']}'"]))
    tree = OmegaConf.to_container(job, resolve=True)
    assert ptq.data.params == flatten(tree)  # every resolved leaf, nothing else


def _check_artifacts(store: Store, run, tmp_path: Path, quantized: bool) -> None:
    names = {a.path for a in store.client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in names
    if quantized:
        assert {"node_sqnr.csv", "node_sqnr.png", "float_nodes.csv"} <= names
        csv = Path(store.client.download_artifacts(run.info.run_id, "node_sqnr.csv", str(tmp_path)))
        assert csv.read_text().startswith("node,op,sqnr_db\n") and len(csv.read_text().splitlines()) > 3
    onnx = store.download_model(run.info.run_id, tmp_path)  # an MLflow model (the UI's Models column)
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: torch.randn(3, 3, 16, 16).numpy()})[0]
    assert out.shape == (3, 10)
    ops = {n.op_type for n in __import__("onnx").load(onnx).graph.node}
    assert ("QuantizeLinear" in ops) == quantized


def test_sweep_artifacts_are_onnx_models_that_onnxruntime_runs(e2e, tmp_path):
    for scheme, r in e2e.runs.items():
        _check_artifacts(e2e.store, r, tmp_path / scheme, quantized=scheme != "float")
    assert len(list((e2e.tmp / "fp32_onnx").glob("*.onnx"))) == 1  # one float graph, exported once


def test_a_rerun_skips_the_finished_runs(e2e):
    # both are FINISHED with the same config (the QAT recipe does not concern PTQ runs)
    again = sweep("digits", [*e2e.args, "train.qat.lr=0.5"], sweep_id="e2e-2")
    assert again.ok and again.finished == [] and again.skipped == 2
    assert e2e.store.sweep_runs("e2e-2") == []


def test_force_reruns_and_a_truncated_fp32_cache_entry_is_exported_again(e2e):
    (cached,) = (e2e.tmp / "fp32_onnx").glob("*.onnx")
    cached.write_bytes(cached.read_bytes()[:1000])
    forced = sweep("digits", [*e2e.small, "scheme=float", "run.force=true"], sweep_id="e2e-3")
    assert forced.finished == ["test_resnet x float"]
    __import__("onnx").checker.check_model(str(cached))
    (rerun,) = e2e.store.sweep_runs("e2e-3")
    assert rerun.data.tags["config_hash"] == e2e.runs["float"].data.tags["config_hash"]


def test_report_table_shows_the_runs(e2e, tmp_path):
    report = write_report("digits", e2e.args, out_dir=tmp_path / "reports")  # the runs of the sweep of e2e.args
    rows = [line for line in report.table.splitlines()[2:]]
    assert len(rows) == 2 and rows[0].startswith("| Test-ResNet | float |")
    m = e2e.runs["ptq_pow2"].data.metrics
    assert f"| {m['quant/top1']:.2f} / {m['quant/top5']:.2f} | {m['onnx/top1']:.2f} / {m['onnx/top5']:.2f} |" in rows[1]


def test_failed_run_is_recorded_and_the_sweep_goes_on(small, tmp_path, capsys, monkeypatch):
    """A run that breaks (a scheme that fails on a model: here quantize raises) is recorded FAILED with its
    type and traceback; the sweep runs the next job and exits 1."""

    def broken_quantize(ctx):
        if ctx.scheme["name"] == "ptq_float":
            raise RuntimeError("observer blew up on node conv1")
        real_quantize(ctx)

    real_quantize = pipeline.quantize
    monkeypatch.setattr(pipeline, "STAGES", tuple(broken_quantize if stage is real_quantize else stage
                                                  for stage in pipeline.STAGES))
    code = main(["sweep", "digits", "--id", "fail-1", *small, "scheme=ptq_float,float"])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 jobs: 1 FINISHED, 1 FAILED, 0 skipped" in out
    assert "FAILED test_resnet x ptq_float: RuntimeError: observer blew up on node conv1" in out
    runs = _by_scheme(_store(small).sweep_runs("fail-1"))
    failed, finished = runs["ptq_float"], runs["float"]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "FAILED"
    assert failed.data.tags["error"] == "RuntimeError: observer blew up on node conv1"
    assert "error_kind" not in failed.data.tags, "a bug, not a bad input"
    trace = Path(_store(small).client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path)))
    assert trace.read_text().startswith("Traceback") and "broken_quantize" in trace.read_text()
    assert finished.info.status == "FINISHED" and "onnx/top1" in finished.data.metrics


def test_a_scheme_override_that_cannot_work_fails_its_run_as_a_bad_input(small, capsys):
    # int32 is for bias only: the engine's spec refuses it (a ConfigError, naming the field), so the run is
    # recorded FAILED as a bad input and the command exits 2, after the summary
    code = main(["sweep", "digits", "--id", "bad-1", *small, "scheme=ptq_float", "scheme.weight.dtype=int32"])
    out = capsys.readouterr().out
    assert code == 2
    assert "1 jobs: 0 FINISHED, 1 FAILED" in out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert "test_resnet x ptq_float: " in line and "weight.dtype='int32'" in line and "bias" in line
    (failed,) = _store(small).sweep_runs("bad-1")
    assert failed.data.tags["status"] == "FAILED" and failed.data.tags["error_kind"] == "input"
    assert "\n" not in failed.data.tags["error"] and "int32" in failed.data.tags["error"]


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

