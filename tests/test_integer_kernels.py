"""The frozen graph's integer kernels equal onnxruntime's, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantbench.engine.passes.integer import qadd


def qdq_binary_session(sa, sb, sc, za, zb, zc, op="Add"):
    """DQ(a), DQ(b) -> op -> Q on uint8 tensors: onnxruntime fuses it into its QLinear kernel."""
    t = TensorProto.UINT8
    inputs = [helper.make_tensor_value_info(n, t, [None]) for n in ("a", "b")]
    out = helper.make_tensor_value_info("c", t, [None])
    init = [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for v, n in ((sa, "sa"), (sb, "sb"), (sc, "sc"))]
    init += [numpy_helper.from_array(np.array(v, dtype=np.uint8), n) for v, n in ((za, "za"), (zb, "zb"), (zc, "zc"))]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node(op, ["fa", "fb"], ["fc"]),
             helper.make_node("QuantizeLinear", ["fc", "sc", "zc"], ["c"])]
    model = helper.make_model(helper.make_graph(nodes, op.lower(), inputs, [out], init),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seed", range(6))
def test_qadd_matches_onnxruntime_on_every_pair(seed):
    """All 65536 (a, b) pairs of int8 activations (exported as uint8 + 128), random float scales."""
    rng = np.random.default_rng(seed)
    sa, sb, sc = (np.float32(rng.uniform(0.004, 0.06)) for _ in range(3))
    za, zb, zc = (int(rng.integers(-20, 20)) for _ in range(3))
    a, b = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128))
    a, b = a.ravel().astype(np.int8), b.ravel().astype(np.int8)
    sess = qdq_binary_session(sa, sb, sc, za + 128, zb + 128, zc + 128)
    expected = sess.run(None, {"a": (a.astype(np.int16) + 128).astype(np.uint8),
                               "b": (b.astype(np.int16) + 128).astype(np.uint8)})[0].astype(np.int64) - 128

    def qp(s, z):
        return (float(s), z, None, -128, 127, "int8", "half_even")

    got = qadd(torch.from_numpy(a), qp(sa, za), torch.from_numpy(b), qp(sb, zb), qp(sc, zc))
    assert np.array_equal(got.numpy().astype(np.int64), expected)
    assert onnx  # keeps the import meaningful for readers: the model above is plain ONNX


@pytest.mark.parametrize("preset", ["int8_float", "uint8_asym"])
def test_residual_adds_are_integer_kernels(preset, tmp_path):
    """MobileNet-V2 blocks: the frozen graph's adds are onnxruntime's QLinearAdd, exactly."""
    from engine_models import reestimate_bn
    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual

    from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets
    from quantbench.engine.passes.integer import qlinear

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = InvertedResidual(16, 16, 1, 6)
            self.b = InvertedResidual(16, 16, 1, 6)

        def forward(self, x):
            return torch.relu(self.b(self.a(x)) + x)

    model = reestimate_bn(Blocks(), (16, 16, 12, 12))
    x = torch.randn(32, 16, 12, 12)
    quantizer = ModelQuantizer(presets.get(preset))
    frozen = quantizer.freeze(quantizer.quantize_model(capture(model, (x,)), [x]))
    targets = [n.target for n in frozen.graph.nodes if n.op == "call_function"]
    assert targets.count(qlinear) == 6
    assert targets.count(qadd) == 3  # add + relu too: an integer clamp after the add when the zero point is not the minimum
    path = export_onnx(frozen, (x,), tmp_path / "blocks.onnx")
    report = check.compare(path, frozen, [torch.randn(32, 16, 12, 12) * 2 for _ in range(3)])
    assert report.max_lsb_err == 0.0, report
