"""A shrunk shapes sweep end to end: a real Hydra multirun of the tiny detector over float, PTQ and
QAT schemes into a throwaway sqlite MLflow store, COCOeval on the real generated shapes set,
QDQ ONNX models scored in onnxruntime, the report and the gate."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.harness.config import compose_config
from quantbench.harness.sweep import sweep
from quantbench.harness.tracking import Store
from quantbench.report import write_report
from quantbench.report.gate import GateCheck, GateFile, evaluate_gates
from quantbench.report.runs import load_runs

DET_METRICS = ("float/map50_95", "float/map50", "quant/map50_95", "quant/map50", "onnx/map50_95", "onnx/map50",
               "onnx/parity_top1", "onnx/max_lsb_err", "quant/sqnr_db", "latency/ort_fp32_ms",
               "latency/ort_int8_ms", "coverage/quantized_ops", "coverage/fraction")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from tasks.detection.shapes import write_shapes_coco

    return write_shapes_coco(tmp_path_factory.mktemp("data") / "shapes", n_train=40, n_val=12, min_size=56,
                             max_size=80, seed=3)


@pytest.fixture
def small(shapes_root, tmp_path, tracking_overrides, monkeypatch) -> list[str]:
    monkeypatch.setenv("CI", "true")
    cache = tmp_path / "cache"
    return [*tracking_overrides, "model=yolo_nas_test", f"data.root={shapes_root}", "data.generate=null",
            "data.image_size=64", "data.calib_size=16", "data.calib_batch_size=8", "data.eval_batch_size=12",
            f"task.cache_dir={cache}", "task.device=cpu", "train.baseline.steps=6", "train.baseline.batch_size=8",
            "train.qat.steps=2", "train.qat.batch_size=8", "scheme.calib_batches=2", "run.latency_iters=2",
            "run.latency_batch=4", f"run.fp32_onnx_cache={cache}/fp32_onnx",
            f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.run.dir={tmp_path}/outputs"]


def test_shapes_sweep_end_to_end(small, tmp_path):
    outcome = sweep("shapes", [*small, "scheme=float,ptq_float,qat_pow2"], sweep_id="det-1")
    assert outcome.ok, outcome
    assert sorted(outcome.finished) == [f"yolo_nas_test x {s}" for s in ("float", "ptq_float", "qat_pow2")]

    tracking = OmegaConf.to_container(compose_config(["task=shapes", *small]).tracking, resolve=True)
    store = Store.from_config(tracking)
    runs = {r.data.tags["scheme"]: r for r in store.sweep_runs("det-1")}
    for scheme in ("ptq_float", "qat_pow2"):
        metrics = runs[scheme].data.metrics
        assert not set(DET_METRICS) - set(metrics), set(DET_METRICS) - set(metrics)
        assert metrics["onnx/max_lsb_err"] <= 1.0
        assert metrics["coverage/fraction"] == 1.0  # the whole detector, head included
        assert 0.0 <= metrics["onnx/map50_95"] <= metrics["onnx/map50"] <= 1.0
    assert "qat/val_map50_95" in runs["qat_pow2"].data.metrics
    assert runs["float"].data.tags["primary_metric"] == "map50_95"

    # the ONNX artifact: two raw outputs (class logits, box distributions), QDQ all through
    onnx_path = store.client.download_artifacts(runs["ptq_float"].info.run_id, "model.onnx", str(tmp_path))
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    cls, reg = session.run(None, {session.get_inputs()[0].name: torch.rand(2, 3, 64, 64).numpy()})
    assert cls.shape[:2] == (2, 5) and reg.shape[:2] == (2, 36) and cls.shape[2] == reg.shape[2] == 64 + 16 + 4

    report = write_report("shapes", small, out_dir=tmp_path / "reports", readme=tmp_path / "README.md")
    lines = report.table.splitlines()
    assert lines[0].startswith("| Model | Method | mAP@0.5:0.95 |")
    m = runs["ptq_float"].data.metrics
    assert any(f"| {m['quant/map50_95']:.4f} | {m['onnx/map50_95']:.4f} |" in line for line in lines[2:])

    runs_frame = load_runs(store, "shapes")
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
