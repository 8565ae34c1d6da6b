"""Graph tests: which nodes carry which quantizers, shared scales, coverage."""

from __future__ import annotations

import pytest
import torch
from engine_models import TinyAllOps, reestimate_bn
from torch import nn

from quantbench.engine import (
    Config,
    ModelQuantizer,
    QuantizationConfig,
    QuantizationSpec,
    capture,
    presets,
)
from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import op_name
from quantbench.registry import UnknownNameError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = reestimate_bn(TinyAllOps(), (8, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    return model, capture(model, (x,)), x


def _fq_users(qmodel, node):
    return [u for u in node.users if u.op == "call_module"
            and isinstance(qmodel.get_submodule(u.target), FakeQuantizeBase)]


def _quantizer_of(qmodel, name):
    node = next(n for n in qmodel.graph.nodes if n.name == name)
    users = _fq_users(qmodel, node)
    assert len(users) == 1, f"{name} should feed exactly one quantizer, feeds {[u.name for u in node.users]}"
    return users[0].target


def test_whole_graph_is_quantized(tiny):
    _, gm, x = tiny
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(gm, [x])
    report = quantizer.coverage(qmodel)
    # Coverage counts what runs on integers in the export: every op here has an integer kernel
    # (the bilinear resize too: two integer matrix products, passes/nonlinear.qresize).
    assert report.float_nodes == [], str(report)
    ops = {op_name(n) for n in qmodel.graph.nodes if n.op == "call_function"}
    assert {"conv2d", "add", "mul", "cat", "max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
            "sigmoid", "mean", "linear", "relu"} <= ops
    assert report.quantized_ops == report.total_ops > 10


def test_shared_and_fused_quantizers(tiny):
    _, gm, x = tiny
    qmodel = ModelQuantizer(presets.get("int8_pow2")).quantize_model(gm, [x])
    nodes = {n.name: n for n in qmodel.graph.nodes}
    # max pool and nearest upsample move integers: same quantizer as their input (the cat's).
    cat_q = _quantizer_of(qmodel, "cat")
    assert _quantizer_of(qmodel, "max_pool2d") == cat_q
    assert _quantizer_of(qmodel, "upsample_nearest2d") == cat_q
    # cat inputs share the cat's scale: the relu feeding it is quantized by the same module.
    relu_feeding_cat = nodes["cat"].args[0][0].args[0]
    assert _quantizer_of(qmodel, relu_feeding_cat.name) == cat_q
    # conv -> relu and add -> relu are fused: no quantizer on the conv / add output.
    for fused in ("conv2d", "add"):
        assert not _fq_users(qmodel, nodes[fused]), f"{fused} output should not be quantized"
    # The bilinear upsample computes new values: its own quantizer.
    assert _quantizer_of(qmodel, "upsample_bilinear2d") != _quantizer_of(qmodel, "sigmoid")


def test_weights_bias_constants(tiny):
    _, gm, x = tiny
    qmodel = ModelQuantizer(presets.get("int8_float_perchannel")).quantize_model(gm, [x])
    mods = dict(qmodel.named_modules())
    weights = [m for m in mods.values() if isinstance(m, FakeQuantizeBase) and m.role == "weight"]
    biases = [m for m in mods.values() if isinstance(m, DerivedBiasFakeQuantize)]
    consts = [m for m in mods.values() if isinstance(m, FakeQuantizeBase) and m.role == "const"]
    assert len(weights) == 4  # conv1, conv2, conv3, fc
    assert all(w.spec.per_channel and w.qparams()[0].numel() > 1 for w in weights)
    assert len(biases) == 4  # conv1's bias comes from the folded BN
    for b in biases:
        act, w = b.sources
        torch.testing.assert_close(b.qparams()[0], act.qparams()[0] * w.qparams()[0])
    assert len(consts) == 2  # the 0.5 and the 1 of `x * 0.5 + 1`


def test_relu_module_called_at_two_sites():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(self.relu(x)) + x)

    x = torch.randn(2, 4, 6, 6)
    gm = capture(Block().eval(), (x,))
    qmodel = ModelQuantizer(presets.get("int8_float")).quantize_model(gm, [x])
    assert ModelQuantizer(presets.get("int8_float")).coverage(qmodel).float_nodes == []
    assert sum(op_name(n) == "relu" for n in qmodel.graph.nodes) == 2


def test_exclude_and_overrides(tiny):
    _, gm, x = tiny
    base = presets.get("int8_float")
    int16 = QuantizationSpec(dtype="int16")
    config = base.replace(
        exclude=("conv3",),
        op_type_quant_config={"linear": base.global_quant_config.replace(
            weight=QuantizationSpec(dtype="int8", qscheme="per_channel"))},
        node_name_quant_config={"sigmoid": base.global_quant_config.replace(output_tensors=int16)},
    )
    quantizer = ModelQuantizer(config)
    qmodel = quantizer.quantize_model(gm, [x])
    report = quantizer.coverage(qmodel)
    # the int16 sigmoid output feeds the bilinear resize: its integer kernel would overflow int64 there
    assert [(n, r) for n, _, r in report.float_nodes if n != "upsample_bilinear2d"] == [
        ("conv2d_2", "excluded by config")]
    mods = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, FakeQuantizeBase)]
    assert [n for n, m in mods if m.spec.dtype == "int16"] == ["activation_fq_sigmoid"]
    assert [n for n, m in mods if m.spec.per_channel] == ["weight_fq_fc_weight"]


def test_unsupported_op_is_reported():
    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1) + 1

    x = torch.randn(2, 4)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    report = quantizer.coverage(quantizer.quantize_model(capture(M(), (x,)), [x]))
    assert ("cumsum", "no annotator for op 'cumsum'") in [(op, r) for _, op, r in report.float_nodes]


def test_presets_registry():
    names = presets.list()
    for required in ("int8_float", "int8_float_perchannel", "int8_pow2", "int8_pow2_mse", "int8_percentile",
                     "uint8_asym", "w4a8_float", "w4a8_pow2"):
        assert required in names
    assert presets.list("w4a8*") and all(n.startswith("w4a8") for n in presets.list("w4a8*"))
    with pytest.raises(UnknownNameError, match="unknown preset 'int8_flaot'; did you mean .*int8_float"):
        presets.get("int8_flaot")
    with pytest.raises(KeyError):  # an UnknownNameError is a KeyError (and a ConfigError)
        presets.get("nope")
    assert isinstance(presets.get("int8_pow2"), Config)


def test_capture_keeps_the_graph_untouched(tiny):
    _, gm, x = tiny
    before = [n.name for n in gm.graph.nodes]
    ModelQuantizer(presets.get("int8_float")).quantize_model(gm, [x])
    assert [n.name for n in gm.graph.nodes] == before


def test_qconfig_none_leaves_float(tiny):
    _, gm, x = tiny
    config = Config(global_quant_config=QuantizationConfig())
    quantizer = ModelQuantizer(config)
    qmodel = quantizer.quantize_model(gm, [x])
    assert not any(isinstance(m, FakeQuantizeBase) for m in qmodel.modules())
    assert quantizer.coverage(qmodel).quantized_ops == 0
