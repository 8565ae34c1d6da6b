"""Round trip per preset: quantize -> freeze -> export -> onnxruntime, exact to <= 1 LSB.

Parity is between the frozen torch graph and the optimised onnxruntime
session (the integer kernels that deploy), on fresh random inputs, with
random-init torchvision models whose BN statistics were re-estimated.
"""

from __future__ import annotations

import pytest
import torch
from engine_models import batches, torchvision_model

from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets

# The fast tier keeps float and pow2 scales (about 5 s each); per-channel, the other observers and
# grids run in the slow tier (per-channel 4-bit weights stay in the fast tier through test_qat.py's
# w4a8 freeze-and-export).
PTQ_PRESETS = ["int8_float", "int8_pow2",
               *(pytest.param(p, marks=pytest.mark.slow) for p in (
                   "int8_float_perchannel", "int8_pow2_mse", "int8_percentile", "int8_mse", "uint8_asym", "w4a8_float", "w4a8_pow2", "w4a8_mse"))]


def _roundtrip(model, preset, tmp_path, size):
    x = torch.randn(2, 3, size, size)
    gm = capture(model, (x,))
    quantizer = ModelQuantizer(presets.get(preset))
    qmodel = quantizer.quantize_model(gm, batches(2, (8, 3, size, size), seed=1))
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (x,), tmp_path / f"{preset}.onnx")
    return gm, qmodel, frozen, path


@pytest.fixture(scope="module")
def resnet18():
    return torchvision_model("resnet18", size=16)


@pytest.mark.parametrize("preset", PTQ_PRESETS)
def test_resnet18_roundtrip(resnet18, preset, tmp_path):
    gm, qmodel, frozen, path = _roundtrip(resnet18, preset, tmp_path, 16)
    inputs = batches(3, (16, 3, 16, 16), seed=2)
    report = check.compare(path, frozen, inputs, float_model=gm)
    assert report.max_lsb_err <= 1.0, report
    assert report.top1_agreement == 100.0, report
    # The frozen graph computes what the fake-quant graph simulates. With power-of-two scales
    # every product is exact, so they are identical; with float scales the float simulation
    # and the integer kernels may round a rare tie differently (and a random-init network
    # amplifies such a flip), so they agree closely rather than bit for bit.
    x = inputs[0]
    with torch.no_grad():
        sim, real = qmodel(x), frozen(x)
    if "pow2" in preset:
        torch.testing.assert_close(real, sim, rtol=0, atol=0)
    else:
        assert check.sqnr_db(sim, real) > 15


@pytest.mark.parametrize("preset", [
    "int8_pow2",
    pytest.param("int8_float", marks=pytest.mark.slow),  # ~9 s each: one stays in the fast tier
    pytest.param("uint8_asym", marks=pytest.mark.slow),
    pytest.param("w4a8_float", marks=pytest.mark.slow),
])
def test_mobilenet_v2_roundtrip(preset, tmp_path):
    model = torchvision_model("mobilenet_v2", size=32)
    gm, _, frozen, path = _roundtrip(model, preset, tmp_path, 32)
    report = check.compare(path, frozen, batches(2, (16, 3, 32, 32), seed=3), float_model=gm)
    assert report.max_lsb_err <= 1.0, report
    assert report.top1_agreement == 100.0, report


@pytest.fixture(scope="module")
def int8_float_onnx(resnet18, tmp_path_factory):
    """ResNet-18 with float scales, exported once for the module's checks of the ONNX file."""
    return _roundtrip(resnet18, "int8_float", tmp_path_factory.mktemp("int8_float"), 16)[3]


def test_onnx_is_qdq_with_integer_weights(int8_float_onnx):
    import onnx
    from onnx import numpy_helper

    from quantbench.engine.storage import default_unsigned_weights

    path = int8_float_onnx
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    assert convs
    for conv in convs:
        w_dq = producers[conv.input[1]]
        b_dq = producers[conv.input[2]]
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        # uint8 + 128 where this CPU's onnxruntime kernels could saturate on int8 weights (no VNNI); a conv
        # reading a ReLU's output (0..127) cannot, and keeps int8
        assert str(inits[w_dq.input[0]].dtype) in (("uint8", "int8") if default_unsigned_weights() else ("int8",))
        assert str(inits[b_dq.input[0]].dtype) == "int32"
    stem = producers[convs[0].input[1]]  # reads the network input, which spans the whole grid
    assert str(inits[stem.input[0]].dtype) == ("uint8" if default_unsigned_weights() else "int8")
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]


def test_unsigned_weights_are_the_same_integers_and_exact_on_any_cpu(resnet18, tmp_path):
    """uint8 weights (zero point + 128) are the int8 ones shifted: the same QDQ graph in value, and
    onnxruntime's U8U8 kernels cannot saturate, so the export is exact on a CPU without VNNI too."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from quantbench.engine.storage import signed_weights

    x = torch.randn(2, 3, 16, 16)
    gm = capture(resnet18, (x,))
    quantizer = ModelQuantizer(presets.get("int8_float_perchannel"))
    frozen = quantizer.freeze(quantizer.quantize_model(gm, batches(2, (8, 3, 16, 16), seed=1)))
    paths = {flag: export_onnx(frozen, (x,), tmp_path / f"u{int(flag)}.onnx", unsigned_weights=flag)
             for flag in (False, True)}
    weights = {}
    for flag, path in paths.items():
        proto = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        producers = {o: n for n in proto.graph.node for o in n.output}
        dqs = [producers[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
        weights[flag] = [(inits[d.input[0]], inits[d.input[2]]) for d in dqs]
    assert weights[False] and len(weights[False]) == len(weights[True])
    shifted = 0
    for (w8, z8), (wu, zu) in zip(weights[False], weights[True]):
        assert w8.dtype == np.int8
        if wu.dtype == np.int8:  # a conv reading a ReLU's output (0..127): U8S8 cannot saturate there
            np.testing.assert_array_equal(wu, w8)
            continue
        assert wu.dtype == np.uint8 and zu.dtype == np.uint8
        np.testing.assert_array_equal(wu.astype(np.int16) - 128, w8)
        np.testing.assert_array_equal(zu.astype(np.int16) - 128, z8)
        shifted += 1
    assert 0 < shifted < len(weights[True])  # the stem and the convs after a residual add; not the rest
    feed = batches(1, (4, 3, 16, 16), seed=5)[0]
    reference = [check.ort_predict_fn(check.ort_session(p, optimize=False))(feed) for p in paths.values()]
    torch.testing.assert_close(reference[0], reference[1], rtol=0, atol=0)  # the same graph, in value
    report = check.compare(paths[True], frozen, [feed], float_model=gm)
    assert report.max_lsb_err == 0 and report.top1_agreement == 100.0, report
    # signed_weights (what OpenVINO reads) is the exact inverse: int8 weights again, the same values
    proto = onnx.load(str(paths[True]))
    assert signed_weights(proto) == shifted
    onnx.checker.check_model(proto)
    assert not [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 4]
    signed = tmp_path / "signed.onnx"
    onnx.save(proto, str(signed))
    again = check.ort_predict_fn(check.ort_session(signed, optimize=False))(feed)
    torch.testing.assert_close(again, reference[0], rtol=0, atol=0)


def test_every_conv_runs_as_an_integer_kernel(int8_float_onnx, tmp_path):
    import onnx

    path = int8_float_onnx
    optimized = tmp_path / "optimized.onnx"
    check.ort_session(path, optimized_model_path=str(optimized))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 20 and "Conv" not in ops and "FusedConv" not in ops


def test_float_scale_ties_match_onnxruntime(tmp_path):
    """Values exactly halfway between two steps: x / s (not x * (1/s)) decides, as in onnxruntime."""
    from torch import nn

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    s = 0.1  # not a power of two: 1/s is inexact in float32
    k = torch.arange(-120, 120, dtype=torch.float32)
    x = ((k + 0.5) * torch.tensor(s)).reshape(2, -1)
    gm = capture(Identity(), (x,))
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(gm, [x])
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (x,), tmp_path / "ties.onnx")
    out = check.ort_predict_fn(check.ort_session(path))(x)
    torch.testing.assert_close(out, frozen(x), rtol=0, atol=0)


def test_per_node_sqnr_table(resnet18):
    x = torch.randn(4, 3, 16, 16)
    qmodel = ModelQuantizer(presets.get("int8_float")).quantize_model(capture(resnet18, (x,)), [x])
    rows = check.per_node_sqnr(qmodel, [x])
    assert rows and rows == sorted(rows, key=lambda r: r["sqnr_db"])
    assert {"node", "op", "sqnr_db"} <= set(rows[0])
    first = next(r for r in rows if r["node"] == "x")
    assert first["sqnr_db"] > 30  # the input alone: one 8-bit rounding


def test_int8_bias_option_and_fixed_batch(tmp_path):
    """int8 bias (own pow2 scale) for targets that want it; batch fixed in the ONNX graph."""
    import onnx

    from quantbench.engine import QuantizationSpec

    model = torchvision_model("resnet18", size=16)
    config = presets.get("int8_pow2")
    config = config.replace(global_quant_config=config.global_quant_config.replace(
        bias=QuantizationSpec(dtype="int8", scale_type="pow2")))
    x = torch.randn(4, 3, 16, 16)
    gm = capture(model, (x,))
    quantizer = ModelQuantizer(config)
    frozen = quantizer.freeze(quantizer.quantize_model(gm, [x]))
    path = export_onnx(frozen, (x,), tmp_path / "int8_bias.onnx", dynamic_batch=False)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    bias_types = {i.data_type for i in proto.graph.initializer if len(i.dims) == 1 and i.dims[0] in (64, 128)}
    assert onnx.TensorProto.INT8 in bias_types and onnx.TensorProto.INT32 not in bias_types
    report = check.compare(path, frozen, [torch.randn(4, 3, 16, 16)], float_model=gm)
    assert report.max_lsb_err <= 1.0 and report.top1_agreement == 100.0, report


@pytest.mark.slow  # 7 s
def test_latencies_are_measured_interleaved(resnet18, tmp_path, monkeypatch):
    gm, _, _, q_path = _roundtrip(resnet18, "int8_pow2", tmp_path, 16)
    f_path = export_onnx(gm, (torch.randn(2, 3, 16, 16),), tmp_path / "fp32.onnx")
    order: list[int] = []
    real_run = check.ort.InferenceSession.run

    def recording_run(session, *args, **kwargs):
        order.append(id(session))
        return real_run(session, *args, **kwargs)

    monkeypatch.setattr(check.ort.InferenceSession, "run", recording_run)
    fp32, int8 = check.ort_latencies([f_path, q_path], torch.randn(4, 3, 16, 16), threads=1, warmup=1, iters=3)
    assert fp32 > 0 and int8 > 0
    # every round runs each model once, so drift of a shared machine lands on both alike
    assert order[0] != order[1] and order == order[:2] * 4
    assert check.ort_latency(q_path, torch.randn(4, 3, 16, 16), threads=1, warmup=0, iters=2) > 0


def test_a_second_export_of_the_same_structure_reuses_the_traced_nodes_and_writes_the_same_file(tmp_path,
                                                                                                 monkeypatch):
    """The nodes the exporter's traces would rewrite (here a global mean's table lookup and a flatten) are
    traced once per structure: another calibration of the same model exports byte for byte what a fresh
    trace writes, without tracing; another input size is another structure, traced anew."""
    from quantbench.engine import retrace

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()

    def frozen(size: int, seed: int):
        x = torch.randn(2, 3, size, size)
        quantizer = ModelQuantizer(presets.get("int8_float"))
        return quantizer.freeze(quantizer.quantize_model(capture(model, (x,)), batches(1, (4, 3, size, size), seed))), x

    (a, x), (b, _), (c, y) = frozen(12, 0), frozen(12, 1), frozen(10, 0)
    traced = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traced.append(1) or export(*a, **k))
    retrace._PROGRAMS.clear()
    fresh = export_onnx(b, (x,), tmp_path / "fresh.onnx").read_bytes()
    assert len(traced) == 1 and len(retrace._PROGRAMS) == 1
    export_onnx(a, (x,), tmp_path / "a.onnx")
    reused = export_onnx(b, (x,), tmp_path / "reused.onnx").read_bytes()
    assert len(traced) == 1, "the same structure: no second trace"
    assert reused == fresh and (tmp_path / "a.onnx").read_bytes() != fresh
    export_onnx(c, (y,), tmp_path / "c.onnx")
    assert len(traced) == 2 and len(retrace._PROGRAMS) == 2
    for graph, path, z in ((b, "reused.onnx", x), (c, "c.onnx", y)):
        assert check.compare(tmp_path / path, graph, batches(2, tuple(z.shape), 5)).max_lsb_err == 0
