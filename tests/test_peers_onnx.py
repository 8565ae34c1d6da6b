"""The ONNX peer engines (onnxruntime's quantize_static, NNCF's ONNX backend) on a real job directory.

One small float CNN (conv-BN-ReLU, a residual add, max pool, a depthwise conv with ReLU6, global
average pool, linear; BN statistics re-estimated so activations are not degenerate) is written as
the harness writes a job: ``fp32.onnx`` by quantbench's exporter, ``float.pt2``, ``state_dict.pt``
and ``calib.pt``. Each engine runs through :func:`quantbench.peers.worker.run_job`; its QDQ model
must open in onnxruntime, hold QuantizeLinear / DequantizeLinear, and track the fp32 export on
held-out inputs (SQNR).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from engine_models import batches, reestimate_bn
from onnx import numpy_helper
from torch import nn

from quantbench.engine import export_onnx
from quantbench.peers import ort_engine
from quantbench.peers.protocol import PeerJob, PeerRecord, save_tensors
from quantbench.peers.worker import run_job

SHAPE = (8, 3, 16, 16)
FILES = ("fp32.onnx", "float.pt2", "state_dict.pt", "calib.pt")


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.relu(x + self.conv2(self.conv1(x)))
        x = self.pw(self.dw(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def float_job(tmp_path_factory):
    """(the float model, the folder with the job's files, the fp32.onnx input name, held-out inputs)."""
    torch.manual_seed(0)
    model = reestimate_bn(SmallCNN(), SHAPE)
    root = tmp_path_factory.mktemp("float_job")
    example = torch.randn(*SHAPE)
    export_onnx(model, (example,), root / "fp32.onnx")
    torch.export.save(torch.export.export(model, (example,)), root / "float.pt2")
    torch.save(model.state_dict(), root / "state_dict.pt")
    save_tensors(batches(4, SHAPE, seed=1), root / "calib.pt")
    input_name = onnx.load(str(root / "fp32.onnx")).graph.input[0].name
    return model, root, input_name, torch.cat(batches(2, SHAPE, seed=2)).numpy()


def make_job(float_job, tmp_path: Path, engine: str, options: dict | None = None) -> Path:
    _, src, input_name, _ = float_job
    root = tmp_path / engine
    root.mkdir()
    for name in FILES:
        shutil.copy(src / name, root / name)
    PeerJob(engine, "ptq_float", options=dict(options or {}), threads=2, input_names=[input_name]).save(root)
    return root


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sqnr_db(root: Path, float_job, model_name: str = "model.onnx") -> float:
    _, _, input_name, held_out = float_job
    ref = session(root / "fp32.onnx").run(None, {input_name: held_out})[0]
    out = session(root / model_name).run(None, {input_name: held_out})[0]
    assert np.isfinite(out).all()
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


def qdq_ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def weight_scales(path) -> list[np.ndarray]:
    """The scales of the DequantizeLinear nodes that read an initializer (the weights)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits
            and numpy_helper.to_array(inits[n.input[0]]).dtype != np.int32]


def input_scale(root: Path) -> float:
    """The scale of the QuantizeLinear of the model's input."""
    model = onnx.load(str(root / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    name = model.graph.input[0].name
    return float(next(inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name))


def check_ok(root: Path, record: PeerRecord, distribution: str) -> None:
    assert record.status == "ok", record.reason
    assert record.version and record.version == __import__(distribution).__version__
    assert PeerRecord.load(root).status == "ok" and record.onnx == "model.onnx"
    ops = qdq_ops(root / "model.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert record.quantize_s > 0


# ---------------------------------------------------------------- onnxruntime


def test_ort_default_is_int8_per_tensor_symmetric(float_job, tmp_path):
    root = make_job(float_job, tmp_path, "ort")
    record, output = run_job(root, float_job[0])
    check_ok(root, record, "onnxruntime")
    assert output.torch_model is None
    assert record.options == {**{k: v for k, v in ort_engine.DEFAULTS.items() if k != "percentile"}}
    assert not any("pre_process failed" in n for n in record.notes)
    model = onnx.load(str(root / "model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded by the pre-processing
    # per-tensor int8 weights, symmetric (zero point 0)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].dtype == np.int8]
    assert len(weight_dq) >= 6 and all(inits[n.input[1]].size == 1 for n in weight_dq)
    assert all(not inits[n.input[2]].any() for n in weight_dq if len(n.input) > 2)
    # MinMax calibration on exactly the job's batches: the input's symmetric int8 scale is max|calib| / 127
    calib = torch.cat(torch.load(root / "calib.pt"))
    assert input_scale(root) == pytest.approx(calib.abs().max().item() / 127, rel=1e-5)
    assert sqnr_db(root, float_job) > 10


@pytest.mark.parametrize("options", [
    {"calibrate_method": "Entropy"},
    {"calibrate_method": "Percentile", "percentile": 99.99},
    {"per_channel": True, "activation_type": "QUInt8", "symmetric_activation": False},
    {"per_channel": True, "preprocess": False},
], ids=["entropy", "percentile", "perchannel_u8_asym", "no_preprocess"])
def test_ort_options(float_job, tmp_path, options):
    root = make_job(float_job, tmp_path, "ort", options)
    record, _ = run_job(root, float_job[0])
    check_ok(root, record, "onnxruntime")
    for key, value in options.items():
        assert record.options[key] == value
    if options.get("per_channel"):
        assert any(s.size > 1 for s in weight_scales(root / "model.onnx"))
    if options.get("activation_type") == "QUInt8":
        model = onnx.load(str(root / "model.onnx"))
        zps = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        assert any(zps[n.input[2]].dtype == np.uint8 for n in model.graph.node if n.op_type == "QuantizeLinear")
    if options.get("preprocess") is False:
        assert qdq_ops(root / "model.onnx").get("BatchNormalization", 0) > 0
    if options.get("calibrate_method") == "Percentile":  # the input's range clips the calibration maximum
        assert input_scale(root) < torch.cat(torch.load(root / "calib.pt")).abs().max().item() / 127 * 0.99
    assert sqnr_db(root, float_job) > 10


def test_ort_int4_weights(float_job, tmp_path):
    root = make_job(float_job, tmp_path, "ort", {"weight_type": "QInt4", "per_channel": True})
    record, _ = run_job(root, float_job[0])
    check_ok(root, record, "onnxruntime")
    model = onnx.load(str(root / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)
    assert sqnr_db(root, float_job) > 0  # 4-bit weights on a random network: finite, and still correlated


def test_ort_unsupported_combination(float_job, tmp_path):
    root = make_job(float_job, tmp_path, "ort", {"activation_type": "QInt8", "weight_type": "QUInt8"})
    record, output = run_job(root, float_job[0])
    assert output is None and record.status == "unsupported" and "uint8 weights" in record.reason
    assert not (root / "model.onnx").exists()


@pytest.mark.parametrize(("options", "key"), [
    ({"calib_method": "MinMax"}, "calib_method"),
    ({"calibrate_method": "Histogram"}, "calibrate_method"),
    ({"per_channel": "yes"}, "per_channel"),
    ({"calibrate_method": "Percentile", "percentile": 101}, "percentile"),
])
def test_ort_bad_option(float_job, tmp_path, options, key):
    root = make_job(float_job, tmp_path, "ort", options)
    with pytest.raises(ValueError, match=key):
        run_job(root, float_job[0])


def test_ort_reader_feeds_the_batches_in_order():
    calib = batches(3, (2, 3, 4, 4), seed=3)
    reader = ort_engine._Batches(calib, ["x"])
    fed = list(iter(reader.get_next, None))
    assert len(fed) == 3 and all(np.array_equal(f["x"], c.numpy()) for f, c in zip(fed, calib))


# ---------------------------------------------------------------- NNCF


def test_nncf_default(float_job, tmp_path):
    pytest.importorskip("nncf")
    root = make_job(float_job, tmp_path, "nncf")
    record, _ = run_job(root, float_job[0])
    check_ok(root, record, "nncf")
    images = sum(len(b) for b in torch.load(root / "calib.pt"))
    assert record.options["subset_size"] == images
    assert record.options["preset"] == "performance" and record.options["fast_bias_correction"] is True
    assert record.options["per_channel"] is True  # NNCF's default for convolutions
    assert qdq_ops(root / "model.onnx").get("BatchNormalization", 0) == 0
    assert sqnr_db(root, float_job) > 10


def test_nncf_per_tensor_mixed(float_job, tmp_path):
    pytest.importorskip("nncf")
    options = {"per_channel": False, "preset": "mixed", "fast_bias_correction": False, "subset_size": 16}
    root = make_job(float_job, tmp_path, "nncf", options)
    record, _ = run_job(root, float_job[0])
    check_ok(root, record, "nncf")
    assert {k: record.options[k] for k in options} == options
    scales = weight_scales(root / "model.onnx")
    assert scales and all(s.size == 1 for s in scales)
    # mixed: asymmetric activations, so some activation zero point is not 0 / 128
    model = onnx.load(str(root / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert any(int(z) not in (0, 128) for z in zps)
    assert sqnr_db(root, float_job) > 10


@pytest.mark.parametrize(("options", "key"), [
    ({"preset": "accuracy"}, "preset"),
    ({"bias_corection": True}, "bias_corection"),
    ({"subset_size": 0}, "subset_size"),
])
def test_nncf_bad_option(float_job, tmp_path, options, key):
    root = make_job(float_job, tmp_path, "nncf", options)
    with pytest.raises(ValueError, match=key):
        run_job(root, float_job[0])


def test_nncf_telemetry_off(tmp_path):
    """Outside pytest (where NNCF stubs its telemetry by itself), the engine's import leaves NNCF's telemetry
    a stub and writes no consent / client-id file under HOME."""
    pytest.importorskip("nncf")
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV", "CI")}
    env["HOME"] = str(tmp_path)
    code = ("from quantbench.peers.nncf_engine import _import_nncf; _import_nncf(); "
            "import nncf.telemetry.decorator as d, nncf.telemetry.wrapper as w; "
            "print(isinstance(w.telemetry, w.NNCFTelemetryStub) and isinstance(d.telemetry, w.NNCFTelemetryStub))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
    assert not (tmp_path / "intel").exists()
