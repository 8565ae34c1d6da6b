"""Export-side coverage: the nodes onnxruntime runs in float, read from the graph it deploys.

The first tests hold for good: a CNN of ops that onnxruntime has integer kernels
for runs on integers only; attention's two matmuls of activations and its
softmax run as QLinearMatMul / QLinearSoftmax; the classification rules hold on
hand-built graphs. The tests under "today's float nodes" record what the engine
exports *today* for SiLU, LayerNorm, GELU, a linear on tokens (its bias Add
after a MatMulIntegerToFloat) and a residual Add followed by ReLU with a global
mean: onnxruntime runs them in float. Making those ops integer is work in
progress, so when one of them starts failing the engine got better: flip it
(assert the float node is gone) rather than fix it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_models import batches, reestimate_bn
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from quantbench.engine import ModelQuantizer, capture, export_onnx, presets
from quantbench.engine.onnx_coverage import OnnxCoverage, classify, onnx_float_nodes


def _export(model: nn.Module, shape: tuple[int, ...], tmp_path, preset: str = "int8_float"):
    """Capture, quantize (2 calibration batches), freeze, export: the ONNX path and the annotated coverage."""
    x = torch.randn(2, *shape[1:])
    gm = capture(model.eval(), (x,))
    quantizer = ModelQuantizer(presets.get(preset))
    qmodel = quantizer.quantize_model(gm, batches(2, shape, seed=1))
    frozen = quantizer.freeze(qmodel)
    return export_onnx(frozen, (x,), tmp_path / "model.onnx"), quantizer.coverage(qmodel)


def _float_ops(cov: OnnxCoverage) -> list[str]:
    return [op for _, op, _ in cov.float_nodes]


class SmallCNN(nn.Module):
    """conv-bn-relu, a residual add, average and max pooling, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + F.relu(self.bn2(self.conv2(y)))
        y = F.max_pool2d(F.avg_pool2d(y, 2), 2)
        return self.fc(y.flatten(1))


class Attention(nn.Module):
    """LayerNorm, q/k/v linear, ``q @ k.transpose``, scale, softmax, ``attn @ v``, GELU MLP."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.fc2(F.gelu(self.fc1(attn @ v)))


@pytest.fixture(scope="module")
def attention_coverage(tmp_path_factory) -> OnnxCoverage:
    torch.manual_seed(0)
    path, _ = _export(Attention(), (8, 6, 16), tmp_path_factory.mktemp("attention"))
    return onnx_float_nodes(path)


@pytest.mark.parametrize("preset", ["int8_float", "int8_pow2"])
def test_cnn_runs_on_integers_only(tmp_path, preset):
    path, _ = _export(reestimate_bn(SmallCNN(), (8, 3, 8, 8)), (8, 3, 8, 8), tmp_path, preset)
    cov = onnx_float_nodes(path)
    assert cov.float_nodes == [] and cov.float_movement == [], str(cov)
    assert cov.integer_ops == cov.total_ops >= 5 and cov.fraction == 1.0  # 2 conv, add, avg pool, gemm (+ clips)
    assert cov.boundary_ops >= 2  # the input's QuantizeLinear and the output's DequantizeLinear
    assert str(cov).splitlines() == [f"export coverage: {cov.total_ops}/{cov.total_ops} compute nodes integer"]


def test_unoptimized_graph_computes_in_float(tmp_path):
    """The file as written: every op between a DequantizeLinear and a QuantizeLinear is float (only the
    ReLU clamps, which the engine writes as a Clip on the quantized tensor, are integer)."""
    path, _ = _export(reestimate_bn(SmallCNN(), (8, 3, 8, 8)), (8, 3, 8, 8), tmp_path)
    cov = onnx_float_nodes(path, optimized=False)
    assert {"Conv", "Add", "AveragePool", "Gemm"} <= set(_float_ops(cov)), str(cov)
    assert cov.integer_ops < cov.total_ops - 4
    conv = next(reason for _, op, reason in cov.float_nodes if op == "Conv")
    assert "DequantizeLinear" in conv and "QLinearConv" in conv


def test_attention_matmuls_and_softmax_run_on_integers(attention_coverage):
    """``q @ k.T`` and ``attn @ v`` fuse to QLinearMatMul, the softmax to QLinearSoftmax."""
    assert not {"MatMul", "Softmax"} & set(_float_ops(attention_coverage)), str(attention_coverage)


# -- the rules, on hand-built graphs ---------------------------------------------------------------


def _model(nodes, initializers, *, contrib: bool = False):
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "y")]
    opsets = [helper.make_opsetid("", 19), *([helper.make_opsetid("com.microsoft", 1)] if contrib else [])]
    return helper.make_model(helper.make_graph(nodes, "g", info[:1], info[1:], initializers), opset_imports=opsets)


def _scale_zp(extra=()):
    return [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"), *extra]


def test_rules_boundary_movement_integer_and_float():
    shape = numpy_helper.from_array(np.array([2, -1], np.int64), "shape")
    node = helper.make_node
    model = _model([
        node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
        node("Reshape", ["xq", "shape"], ["xr"], name="reshape_int"),     # integer movement
        node("Max", ["xr", "xr"], ["xm"], name="max_int"),                 # integer compute
        node("DequantizeLinear", ["xm", "s", "z"], ["xd"], name="dq"),
        node("Sigmoid", ["xd"], ["sig"], name="sigmoid"),                  # float compute
        node("Mul", ["xd", "sig"], ["silu"], name="mul"),                  # float compute
        node("Transpose", ["silu"], ["silu_t"], name="transpose_float"),   # float movement
        node("QuantizeLinear", ["silu_t", "s", "z"], ["yq"], name="q"),
        node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq_out"),
    ], _scale_zp([shape]))
    cov = classify(model)
    assert (cov.integer_ops, cov.total_ops, cov.boundary_ops, cov.movement_ops) == (1, 3, 4, 1)
    assert [(n, op) for n, op, _ in cov.float_nodes] == [("sigmoid", "Sigmoid"), ("mul", "Mul")]
    mul = cov.float_nodes[1][2]
    assert mul.startswith("Mul: float inputs from DequantizeLinear 'dq' and Sigmoid 'sigmoid'")
    assert "QLinearMul" in mul and "not a DequantizeLinear" in mul
    assert "QLinearSigmoid" in cov.float_nodes[0][2] and "feeds Mul 'mul'" in cov.float_nodes[0][2]
    assert [(n, op) for n, op, _ in cov.float_movement] == [("transpose_float", "Transpose")]
    assert cov.summary() == "Sigmoid×1, Mul×1"
    assert str(cov).splitlines()[0] == "export coverage: 1/3 compute nodes integer"


def test_rules_static_subgraph_and_mixed_storage():
    """A constant's DequantizeLinear -> Transpose carries no activation (static, not a float path); an Add
    of a uint8 activation and an int8 constant is float, and the reason names the mix."""
    weights = [numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(np.ones((4, 4), np.int8), "w")]
    node = helper.make_node
    model = _model([
        node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
        node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
        node("DequantizeLinear", ["w", "s", "wz"], ["wd"], name="dq_w"),
        node("Transpose", ["wd"], ["wt"], name="transpose_w"),
        node("Add", ["xd", "wd"], ["a"], name="add"),
        node("Mul", ["a", "wt"], ["m"], name="mul"),
        node("QuantizeLinear", ["m", "s", "z"], ["mq"], name="q"),
        node("DequantizeLinear", ["mq", "s", "z"], ["y"], name="dq_out"),
    ], _scale_zp(weights))
    cov = classify(model)
    assert (cov.static_ops, cov.boundary_ops, cov.float_movement) == (2, 4, [])
    (add, add_reason), (mul, mul_reason) = [(n, r) for n, _, r in cov.float_nodes]
    assert (add, mul) == ("add", "mul")
    assert add_reason.startswith("Add: float input from DequantizeLinear 'dq_x';") and "mix int8 and uint8" in add_reason
    assert mul_reason.startswith("Mul: float input from Add 'add';") and "input from Add 'add' is not a" in mul_reason


def test_rules_type_contrib_kernels():
    """A QGemm without an output scale writes float; the integer kernel itself counts as integer."""
    weights = [numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(np.ones((4, 4), np.int8), "w")]
    model = _model([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
        helper.make_node("QGemm", ["xq", "s", "z", "w", "s", "wz"], ["g"], name="qgemm", domain="com.microsoft",
                         transB=1),
        helper.make_node("Relu", ["g"], ["y"], name="relu_float"),
    ], _scale_zp(weights), contrib=True)
    cov = classify(model)
    assert (cov.integer_ops, cov.total_ops) == (1, 2)
    name, op, reason = cov.float_nodes[0]
    assert (name, op) == ("relu_float", "Relu")
    assert "QGemm 'qgemm'" in reason and "no integer kernel" in reason


# -- ops that once ran in float in onnxruntime, now integer kernels -------------------------------------


class SiLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.bn(self.conv(x))))


def test_silu_runs_on_integers(tmp_path):
    """SiLU (exported by torch as Sigmoid + Mul, the Mul of two activations) is one integer table."""
    path, annotated = _export(reestimate_bn(SiLUNet(), (8, 3, 8, 8)), (8, 3, 8, 8), tmp_path)
    cov = onnx_float_nodes(path)
    assert annotated.float_nodes == [] and cov.float_nodes == [], str(cov)
    assert cov.integer_ops == cov.total_ops


def test_layernorm_runs_on_integers(attention_coverage):
    """LayerNorm: integer statistics, an integer square root and a fixed-point affine (qnorm_int)."""
    assert attention_coverage.float_nodes == [], str(attention_coverage)
    assert "LayerNormalization" not in _float_ops(attention_coverage)


def test_gelu_runs_on_integers(attention_coverage):
    assert not {"Gelu", "Erf", "Tanh"} & set(_float_ops(attention_coverage)), str(attention_coverage)


def test_linear_on_tokens_is_one_integer_gemm(attention_coverage):
    """A linear on a [B, N, C] input is exported as a 2-D Gemm, which onnxruntime runs as QGemm
    (a 3-D MatMul + Add would be MatMulIntegerToFloat and a float bias Add)."""
    reasons = " ".join(reason for _, _, reason in attention_coverage.float_nodes)
    assert "MatMulIntegerToFloat" not in reasons, str(attention_coverage)


def test_residual_add_relu_and_global_mean_run_on_integers(tmp_path):
    """A ResNet block: the add feeds a relu (an integer clamp after QLinearAdd), and the global average
    pool, a ReduceMean to the exporter, is the engine's integer mean."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.conv(x) + x).mean((2, 3)))

    path, _ = _export(Block(), (8, 3, 8, 8), tmp_path)
    cov = onnx_float_nodes(path)
    assert cov.float_nodes == [], str(cov)
