"""Bad input gets one clear error naming the culprit and the fix."""

from __future__ import annotations

import pytest
import torch
from engine_models import TinyAllOps, reestimate_bn
from torch import nn

from quantbench.engine import (
    CalibrationError,
    CaptureError,
    ExportError,
    ModelQuantizer,
    NonFiniteError,
    QuantizationConfig,
    QuantizationSpec,
    SpecError,
    capture,
    export_onnx,
    presets,
)


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "int7"}, "dtype"),
    ({"qscheme": "per_row"}, "qscheme"),
    ({"scale_type": "pow3"}, "scale_type"),
    ({"round_method": "stochastic"}, "round_method"),
    ({"learnable": "tqt", "scale_type": "float"}, "learnable"),
    ({"learnable": "lsq", "scale_type": "pow2"}, "learnable"),
    ({"dtype": "uint8", "symmetric": True}, "symmetric"),
    ({"scale_type": "pow2", "symmetric": False, "dtype": "uint8"}, "scale_type"),
    ({"observer": "kl"}, "observer"),
    ({"is_dynamic": True}, "is_dynamic"),
])
def test_invalid_spec_names_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field):
        QuantizationSpec(**kwargs)


def test_invalid_config_combinations():
    with pytest.raises(SpecError, match="input_tensors.narrow_range"):
        QuantizationConfig(input_tensors=QuantizationSpec(narrow_range=True))
    with pytest.raises(SpecError, match="bias needs a weight"):
        QuantizationConfig(bias=QuantizationSpec(dtype="int32"))
    with pytest.raises(SpecError, match="per_channel activations"):
        QuantizationConfig(output_tensors=QuantizationSpec(qscheme="per_channel"))


@pytest.fixture(scope="module")
def tiny_gm():
    model = reestimate_bn(TinyAllOps(), (8, 3, 8, 8))
    return capture(model, (torch.randn(2, 3, 8, 8),))


def test_wrong_calibration_shape(tiny_gm):
    with pytest.raises(CalibrationError, match=r"input shape \(2, 3, 9, 9\).*captured with \(2, 3, 8, 8\)"):
        ModelQuantizer(presets.get("int8_float")).quantize_model(tiny_gm, [torch.randn(2, 3, 9, 9)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_names_the_node(tiny_gm, bad):
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = bad
    with pytest.raises(NonFiniteError, match="NaN/inf.*'x'"):
        ModelQuantizer(presets.get("int8_float")).quantize_model(tiny_gm, [x])


def test_unexportable_model():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match="torch.export could not capture.*usual fixes"):
        capture(DataDependent(), (torch.randn(2, 3),))


def test_batch_of_one_is_refused():
    with pytest.raises(CaptureError, match="batch of size >= 2"):
        capture(nn.Linear(3, 3), (torch.randn(1, 3),))


def test_calibration_batch_formats(tiny_gm):
    x = torch.randn(2, 3, 8, 8)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    for loader in ([x], [(x, torch.zeros(2))], [[x, torch.zeros(2)]]):
        qmodel = quantizer.quantize_model(tiny_gm, loader)
        assert qmodel.meta["qb_calibration_batches"] == 1


def test_empty_calibration_says_so(tiny_gm, caplog):
    with caplog.at_level("WARNING"):
        ModelQuantizer(presets.get("int8_float")).quantize_model(tiny_gm, [])
    assert "no calibration data" in caplog.text


def test_non_exportable_rounding(tmp_path, tiny_gm):
    config = presets.get("int8_float")
    act = QuantizationSpec(round_method="half_up")
    config = config.replace(global_quant_config=config.global_quant_config.replace(
        input_tensors=act, output_tensors=act))
    quantizer = ModelQuantizer(config)
    x = torch.randn(2, 3, 8, 8)
    frozen = quantizer.freeze(quantizer.quantize_model(tiny_gm, [x]))
    with pytest.raises(ExportError, match="round_method='half_up'.*half_even"):
        export_onnx(frozen, (x,), tmp_path / "m.onnx")
