"""4-bit activations (W4A4) export exactly: QuantizeLinear to 8 bits, then an integer Clip to the grid.

Each case quantizes a small model, freezes it, exports it and checks that onnxruntime (fully
optimised: the fused integer kernels) computes the frozen torch graph to the bit, and that neither
the engine's coverage nor the ONNX graph onnxruntime runs has a float compute node.
"""

from __future__ import annotations

import engine_models
import onnx
import pytest
import torch
from engine_models import batches, reestimate_bn
from onnx import numpy_helper
from torch import nn

from quantbench.engine import ModelQuantizer, capture, check, export_onnx
from quantbench.engine.errors import ExportError
from quantbench.engine.onnx_coverage import onnx_float_nodes, optimized_model
from quantbench.engine.spec import Config, QuantizationConfig, QuantizationSpec

SHAPE = (4, 3, 16, 16)
_W4 = QuantizationSpec(dtype="int4")
SCHEMES = {
    "int4": (_W4, QuantizationSpec(dtype="int4")),
    "int4_pow2": (_W4.replace(scale_type="pow2"), QuantizationSpec(dtype="int4", scale_type="pow2")),
    "uint4_asym": (_W4, QuantizationSpec(dtype="uint4", symmetric=False)),
}


def _config(scheme: str, **act_changes) -> Config:
    weight, act = SCHEMES[scheme]
    act = act.replace(**act_changes)
    return Config(global_quant_config=QuantizationConfig(
        weight=weight, bias=QuantizationSpec(dtype="int32"), input_tensors=act, output_tensors=act))


def _resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # torchvision's code, one block a stage


def _mobilenet() -> nn.Module:
    import torchvision

    # torchvision's MobileNetV2: depthwise / pointwise, ReLU6, inverted residuals; two stages only.
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25,
                                           inverted_residual_setting=[[1, 8, 1, 1], [4, 16, 2, 2]])


MODELS = {"resnet": _resnet, "mobilenet": _mobilenet, "TinyViT": engine_models.TinyViT,
          "TinyEfficientNet": engine_models.TinyEfficientNet}


def _quantize(model_name: str, config: Config):
    torch.manual_seed(0)
    model = reestimate_bn(MODELS[model_name](), (8, 3, 16, 16))
    calib = batches(2, SHAPE, 0)
    gm = capture(model, (calib[0],))
    quantizer = ModelQuantizer(config)
    qmodel = quantizer.quantize_model(gm, calib)
    return quantizer, qmodel, quantizer.freeze(qmodel), calib


@pytest.mark.parametrize("model_name,scheme", [
    ("resnet", "int4"), ("mobilenet", "int4"),
    pytest.param("TinyViT", "int4", marks=pytest.mark.slow),  # ~9 s each: the ViT cases run in the slow tier,
    ("TinyEfficientNet", "int4_pow2"), pytest.param("TinyViT", "uint4_asym", marks=pytest.mark.slow),  # a block in
    # test_engine_kernels.py::test_transformer_block_is_whole_graph_and_exact in the fast one
])
def test_w4a4_exports_exactly_on_integers(model_name, scheme, tmp_path):
    quantizer, qmodel, frozen, calib = _quantize(model_name, _config(scheme))
    path = export_onnx(frozen, (calib[0],), tmp_path / f"{model_name}_{scheme}.onnx")

    parity = check.compare(path, frozen, batches(2, SHAPE, 1))
    assert parity.max_lsb_err == 0.0 and parity.top1_agreement == 100.0, parity

    engine = quantizer.coverage(qmodel)
    assert engine.float_nodes == [], str(engine)
    onnx_cov = onnx_float_nodes(path)
    assert onnx_cov.float_nodes == [] and onnx_cov.float_movement == [], str(onnx_cov)
    assert onnx_cov.integer_ops == onnx_cov.total_ops > 0

    # QuantizeLinear writes 8 bits; a Clip on integers narrows to the 4-bit grid (int4 as uint8 + 128).
    grid = (0, 15) if scheme.startswith("uint4") else (120, 135)
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert any(tuple(int(consts[t]) for t in n.input[1:]) == grid for n in clips if n.input[1] in consts)
    # ... and onnxruntime still fuses every DQ -> op -> Q into its integer kernels around the Clips.
    ops = {n.op_type for n in optimized_model(path).graph.node}
    assert ops & {"QLinearConv", "QGemm"} and "Conv" not in ops and "Gemm" not in ops and "MatMul" not in ops


def test_activations_that_quantize_linear_cannot_express_are_refused(tmp_path):
    _, _, frozen, calib = _quantize("TinyEfficientNet", _config("int4", round_method="half_up"))
    with pytest.raises(ExportError, match="round_method='half_up'"):
        export_onnx(frozen, (calib[0],), tmp_path / "half_up.onnx")
    _, _, frozen, calib = _quantize("TinyEfficientNet", _config("int4", dtype="int16"))
    with pytest.raises(ExportError, match=r"int16 \[-32768, 32767\] cannot be expressed.*int4, int8, uint4, uint8"):
        export_onnx(frozen, (calib[0],), tmp_path / "int16.onnx")
