"""Detection end to end: one run of the tiny detector through every stage (fast tier), and a shrunk
shapes sweep (slow tier): a real Hydra multirun over float, PTQ and QAT schemes into a throwaway
sqlite MLflow store, COCOeval on the real generated shapes set, QDQ ONNX models scored in
onnxruntime, the report and the gate. The sweep runs once for its module-scoped tests."""

from __future__ import annotations

from types import SimpleNamespace

import onnx
import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.harness.config import compose_config
from quantbench.harness.run import run
from quantbench.harness.sweep import sweep
from quantbench.harness.tracking import Store
from quantbench.report import write_report
from quantbench.report.gate import GateCheck, GateFile, evaluate_gates
from quantbench.report.runs import load_runs

DET_METRICS = ("float/map50_95", "float/map50", "quant/map50_95", "quant/map50", "onnx/map50_95", "onnx/map50",
               "onnx/parity_top1", "onnx/max_lsb_err", "quant/sqnr_db", "latency/ort_fp32_ms",
               "latency/ort_int8_ms", "coverage/quantized_ops", "coverage/fraction")


@pytest.mark.slow  # ~14 s (trains the tiny baseline): the slow tier's shapes sweep below and CI's shapes step cover it too
def test_one_detection_run_end_to_end(shapes_overrides, run_overrides, tmp_path):
    """The float scheme through every stage: baseline training, COCOeval, capture, export, ORT, report."""
    small = [*shapes_overrides, *run_overrides]
    result = run(compose_config([*small, "scheme=float", "tracking.sweep_id=det-0"]))  # a sweep's job: reported
    assert result.status == "FINISHED", result.error
    metrics = result.metrics
    assert {"float/map50_95", "float/map50", "onnx/map50_95", "onnx/map50", "onnx/parity_top1",
            "onnx/max_abs_err", "latency/ort_fp32_ms"} <= set(metrics), sorted(metrics)
    assert 0.0 <= metrics["onnx/map50_95"] <= metrics["onnx/map50"] <= 1.0
    assert metrics["onnx/max_abs_err"] < 1e-4, "the fp32 ONNX computes both outputs as the detector does"
    store = Store.from_config(OmegaConf.to_container(compose_config(small).tracking, resolve=True))
    recorded = store.client.get_run(result.run_id)
    assert recorded.data.tags["primary_metric"] == "map50_95" and recorded.data.tags["status"] == "FINISHED"
    path = store.download_model(result.run_id, tmp_path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    cls, reg = session.run(None, {session.get_inputs()[0].name: torch.rand(2, 3, 64, 64).numpy()})
    assert cls.shape == (2, 5, 64 + 16 + 4) and reg.shape == (2, 36, 64 + 16 + 4)  # raw outputs: NMS is outside
    report = write_report("shapes", [*small, "scheme=float"], out_dir=tmp_path / "reports")
    (row,) = report.table.splitlines()[2:]
    assert row.startswith("| YOLO-NAS-style Test | ") and f"{metrics['onnx/map50_95']:.4f}" in row


#: On top of conftest's shapes run: short QAT, two calibration batches.
SMALL = ("train.qat.steps=2", "train.qat.batch_size=8", "scheme.calib_batches=2")


@pytest.fixture(scope="module")
def det(shapes_overrides, run_overrides_in, tmp_path_factory) -> SimpleNamespace:
    """The shrunk shapes sweep (float, ptq_float, qat_pow2), run once for the module's tests."""
    tmp = tmp_path_factory.mktemp("det")
    small = [*shapes_overrides, *run_overrides_in(tmp), *SMALL]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        outcome = sweep("shapes", [*small, "scheme=float,ptq_float,qat_pow2"], sweep_id="det-1")
    store = Store.from_config(OmegaConf.to_container(compose_config(small).tracking, resolve=True))
    return SimpleNamespace(outcome=outcome, small=small, store=store,
                           runs={r.data.tags["scheme"]: r for r in store.sweep_runs("det-1")})


@pytest.mark.slow
def test_shapes_sweep_records_detection_metrics(det):
    assert det.outcome.ok, det.outcome
    assert sorted(det.outcome.finished) == [f"yolo_nas_test x {s}" for s in ("float", "ptq_float", "qat_pow2")]
    for scheme in ("ptq_float", "qat_pow2"):
        metrics = det.runs[scheme].data.metrics
        assert not set(DET_METRICS) - set(metrics), set(DET_METRICS) - set(metrics)
        assert metrics["onnx/max_lsb_err"] <= 1.0
        assert metrics["coverage/fraction"] == 1.0  # the whole detector, head included
        assert 0.0 <= metrics["onnx/map50_95"] <= metrics["onnx/map50"] <= 1.0
    assert "qat/val_map50_95" in det.runs["qat_pow2"].data.metrics
    assert {r.data.tags["primary_metric"] for r in det.runs.values()} == {"map50_95"}


@pytest.mark.slow
def test_onnx_artifact_has_the_two_raw_outputs_quantized_all_through(det, tmp_path):
    """Class logits and box distributions, QDQ all through: what a deployment runtime gets."""
    path = det.store.download_model(det.runs["ptq_float"].info.run_id, tmp_path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    cls, reg = session.run(None, {session.get_inputs()[0].name: torch.rand(2, 3, 64, 64).numpy()})
    assert cls.shape[:2] == (2, 5) and reg.shape[:2] == (2, 36) and cls.shape[2] == reg.shape[2] == 64 + 16 + 4
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(path).graph.node}


@pytest.mark.slow
def test_report_table_shows_map(det, tmp_path):
    report = write_report("shapes", [*det.small, "scheme=float,ptq_float,qat_pow2"], out_dir=tmp_path / "reports")
    lines = report.table.splitlines()
    assert lines[0].startswith("| Model | Method | mAP@0.5:0.95 |")
    m = det.runs["ptq_float"].data.metrics
    assert any(f"| {m['quant/map50_95']:.4f} | {m['onnx/map50_95']:.4f} |" in line for line in lines[2:])


@pytest.mark.slow
def test_gates_read_the_detection_runs(det):
    runs_frame = load_runs(det.store, "shapes")
    gates = GateFile(checks=[GateCheck(metric="onnx/max_lsb_err", schemes=["ptq_*", "qat_*"], max=1.0),
                             GateCheck(metric="quant/map50_95", schemes=["ptq_*"], max_drop=1.0)])
    results = evaluate_gates(gates, runs_frame, ["yolo_nas_test"], ["float", "ptq_float", "qat_pow2"])
    assert results and all(r.passed for r in results), results
    tight = GateFile(checks=[GateCheck(metric="float/map50_95", schemes=["float"], min=1.01)])
    assert not evaluate_gates(tight, runs_frame, ["yolo_nas_test"], ["float"])[0].passed


def test_missing_coco_is_one_line_and_exit_2(tmp_path, capsys, tracking_overrides):
    gone = [f"data.root={tmp_path / 'nowhere'}", "model=yolo_nas_test", "scheme=float", *tracking_overrides]
    for command in (["run", "task=coco", *gone], ["sweep", "coco", *gone]):
        assert main(command) == 2
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.startswith("quantbench:")]
        assert len(lines) == 1, captured.err
        assert "instances_train2017.json" in lines[0] and "COCO_ROOT" in lines[0] and "nowhere" in lines[0]
        assert "Traceback" not in captured.err + captured.out
