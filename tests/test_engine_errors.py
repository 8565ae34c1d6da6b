"""The engine's Python API: a wrong argument is one line naming it (a BadInputError), and a
capture, quantization and export of a model print nothing a user cannot act on."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from engine_models import TinyAllOps
from torch import nn

from quantbench.engine import (
    CalibrationError,
    CaptureError,
    Config,
    ModelQuantizer,
    QuantizationConfig,
    QuantizationSpec,
    SpecError,
    capture,
    export_onnx,
    presets,
    qat,
)
from quantbench.errors import BadInputError


def _one_line(exc: BaseException, *texts: str) -> None:
    message = str(exc)
    assert isinstance(exc, BadInputError) and "\n" not in message, message
    for text in texts:
        assert text in message, message


@pytest.mark.parametrize("kwargs, text", [
    ({"ch_axis": "x"}, "ch_axis='x' must be an int"),
    ({"ch_axis": 1.5}, "ch_axis=1.5 must be an int"),
    ({"symmetric": 1}, "symmetric=1 must be a bool"),
    ({"narrow_range": "yes"}, "narrow_range='yes' must be a bool"),
    ({"percentile": "99"}, "percentile='99' must be a float"),
    ({"observer": "minmx"}, "did you mean 'minmax'"),
    ({"dtype": "int3"}, "dtype='int3' is not one of"),
    ({"dtype": "INT8"}, "did you mean 'int8'"),
    ({"dtype": 8}, "dtype=8 must be a str, not int (one of ['int16'"),
    ({"learnable": True}, "learnable=True must be a str, not bool (one of ['none', 'lsq', 'tqt'])"),
    ({"qscheme": "perchannel"}, "did you mean 'per_channel'"),
    ({"percentile": 101.0}, "percentile=101.0 must be in (50, 100]"),
    ({"averaging_constant": 0.0}, "averaging_constant=0.0 must be in (0, 1]"),
])
def test_a_bad_spec_field_is_one_line_naming_it(kwargs, text):
    with pytest.raises(SpecError) as exc:
        QuantizationSpec(**kwargs)
    assert isinstance(exc.value, BadInputError) and text in str(exc.value) and "\n" not in str(exc.value)


def _qc() -> QuantizationConfig:
    return presets.get("int8_float").global_quant_config


@pytest.mark.parametrize("build, text", [
    (lambda: QuantizationConfig(weight={"dtype": "int8"}), "QuantizationConfig.weight={'dtype': 'int8'} must be a "
                                                           "QuantizationSpec or None, not dict"),
    (lambda: QuantizationConfig(input_tensors="int8"), "QuantizationConfig.input_tensors='int8' must be"),
    (lambda: Config(global_quant_config=None), "Config.global_quant_config must be a QuantizationConfig, not NoneType"),
    (lambda: Config(_qc(), op_type_quant_config=[_qc()]), "Config.op_type_quant_config must be a mapping"),
    (lambda: Config(_qc(), node_name_quant_config={"conv2d": "int8"}), "Config.node_name_quant_config['conv2d'] "
                                                                         "must be a QuantizationConfig, not str"),
    (lambda: Config(_qc(), exclude=[1]), "Config.exclude entry 1 must be a str"),
    (lambda: Config(_qc(), exclude="fc"), "Config.exclude must be a list"),
    (lambda: Config(_qc(), fold_bn="no"), "Config.fold_bn='no' must be a bool, not str"),
    (lambda: Config(_qc(), qat=1), "Config.qat=1 must be a bool, not int"),
    (lambda: ModelQuantizer("int8_pow2"), "ModelQuantizer(presets.get('int8_pow2'))"),
])
def test_a_bad_config_field_is_one_line_naming_it(build, text):
    with pytest.raises(SpecError) as exc:
        build()
    _one_line(exc.value, text)


@pytest.fixture(scope="module")
def tiny_gm():
    x = torch.randn(2, 3, 8, 8)
    return capture(TinyAllOps().eval(), (x,)), x


def _with_weight(preset: str, **changes) -> Config:
    config = presets.get(preset)
    qc = config.global_quant_config
    return config.replace(global_quant_config=qc.replace(weight=qc.weight.replace(**changes)))


@pytest.mark.parametrize("config, text", [
    (lambda: presets.get("int8_float").replace(op_type_quant_config={"Linear": _qc()}),
     "Config.op_type_quant_config: unknown op type 'Linear'; did you mean linear?"),
    (lambda: presets.get("int8_float").replace(node_name_quant_config={"sigmod": _qc()}),
     "Config.node_name_quant_config: unknown node name 'sigmod'; did you mean sigmoid?"),
    (lambda: presets.get("int8_float").replace(exclude=("conv4",)),
     "Config.exclude: unknown node name or module path 'conv4'; did you mean conv3"),
    (lambda: _with_weight("int8_float_perchannel", ch_axis=4),
     "QuantizationSpec.ch_axis=4 is out of range for the 4-d weight of node 'conv2d'"),
    (lambda: _with_weight("qat_lsq", qscheme="per_channel", ch_axis=-5),
     "QuantizationSpec.ch_axis=-5 is out of range for the 4-d weight"),
])
def test_a_config_name_or_axis_the_graph_cannot_use_is_one_line(tiny_gm, config, text):
    gm, x = tiny_gm
    with pytest.raises(SpecError) as exc:
        ModelQuantizer(config()).quantize_model(gm, [x])
    _one_line(exc.value, text)


def test_valid_names_and_a_negative_axis_still_quantize(tiny_gm):
    gm, x = tiny_gm
    named = presets.get("int8_float").replace(exclude=("conv3", "relu_1"), op_type_quant_config={"linear": _qc()},
                                              node_name_quant_config={"sigmoid": _qc()})
    for config in (named, _with_weight("int8_float_perchannel", ch_axis=-1)):
        ModelQuantizer(config).quantize_model(gm, [x])


def test_an_uncaptured_module_or_bad_arguments_are_one_line():
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    with pytest.raises(CaptureError, match=r"quantize_model needs the GraphModule .* got a TinyAllOps \(an nn.Module"):
        quantizer.quantize_model(TinyAllOps(), [])
    gm = capture(TinyAllOps().eval(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(BadInputError, match="calib_loader must be an iterable"):
        quantizer.quantize_model(gm, 42)
    for api in (quantizer.freeze, quantizer.coverage):
        with pytest.raises(CaptureError, match="needs the GraphModule"):
            api(nn.Linear(2, 2))
    with pytest.raises(CaptureError, match="tuple of tensors"):
        capture(TinyAllOps(), ([1, 2],))


def test_every_public_entry_names_the_argument_it_refuses(tiny_gm, tmp_path):
    gm, x = tiny_gm
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    cases = [
        (lambda: quantizer.quantize_model(gm, x), CalibrationError, "calib_loader is a single tensor; pass an "
                                                                    "iterable of batches such as [x]"),
        (lambda: quantizer.quantize_model(gm, "data/"), CalibrationError, "calib_loader must be an iterable"),
        (lambda: quantizer.quantize_model(gm, ["a"]), CalibrationError, "calibration batch of type str"),
        (lambda: quantizer.quantize_model(gm, [x], qat="yes"), SpecError, "qat='yes' must be True, False or None"),
        (lambda: quantizer.quantize_model(gm, [x], max_batches=0), SpecError, "max_batches=0 must be a positive"),
        (lambda: quantizer.quantize_model(torch.export.export(TinyAllOps().eval(), (x,)), [x]), CaptureError,
         "got a torch.export ExportedProgram; pass its .module()"),
        (lambda: qat.train_mode(TinyAllOps()), CaptureError, "qat.train_mode needs the GraphModule that "
                                                             "ModelQuantizer.quantize_model returns, got a TinyAllOps"),
        (lambda: capture(TinyAllOps(), None), CaptureError, "capture needs example_inputs as a tuple of tensors"),
        (lambda: capture("resnet18", (x,)), CaptureError, "capture needs a torch.nn.Module, got str"),
        (lambda: export_onnx(gm, [1, 2], tmp_path / "m.onnx"), CaptureError, "export_onnx needs example_inputs"),
        (lambda: export_onnx("m.pt", (x,), tmp_path / "m.onnx"), CaptureError, "export_onnx needs the frozen"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind) as exc:
            call()
        _one_line(exc.value, text)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y


def test_a_failed_capture_is_one_line_without_torch_s_graph_dump(capfd):
    with pytest.raises(CaptureError) as exc:
        capture(_DataDependent(), (torch.randn(2, 3, 8, 8),))
    assert isinstance(exc.value, BadInputError) and "\n" not in str(exc.value)
    _one_line(exc.value, "torch.export could not capture the model _DataDependent", "torch.cond",
              "QUANTBENCH_VERBOSE=1")
    assert exc.value.__cause__ is not None  # torch's own exception, for --debug
    assert "def forward" in exc.value.graph_dump  # kept for --debug, not printed
    assert capfd.readouterr().err == ""


def test_capture_quantize_freeze_and_export_record_no_warning_in_process(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, whatever filters pytest or an import left behind
        gm = capture(TinyAllOps().eval(), (x,))
        export_onnx(quantizer.freeze(quantizer.quantize_model(gm, [x])), (x,), tmp_path / "m.onnx")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


_QUIET = """
import warnings, torch, sys
warnings.simplefilter("default")
from engine_models import TinyAllOps
from quantbench.engine import ModelQuantizer, capture, export_onnx, presets
gm = capture(TinyAllOps().eval(), (torch.randn(2, 3, 8, 8),))
q = ModelQuantizer(presets.get("int8_pow2"))
frozen = q.freeze(q.quantize_model(gm, [torch.randn(2, 3, 8, 8)]))
export_onnx(frozen, (torch.randn(2, 3, 8, 8),), sys.argv[1])
"""


@pytest.mark.slow  # the fast tier checks the quiet case in the README quick start (test_readme.py)
@pytest.mark.parametrize("verbose", ["0", "1"])
def test_quantize_and_export_print_no_library_noise_unless_verbose(tmp_path, verbose):
    env = {**__import__("os").environ, "QUANTBENCH_VERBOSE": verbose, "PYTHONPATH": str(__import__("pathlib").Path(
        __file__).parent)}
    out = subprocess.run([sys.executable, "-c", _QUIET, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                         env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    noisy = [line for line in out.stderr.splitlines() if "LeafSpec" in line or "Failed to load" in line
             or "KernelPreference" in line]
    assert (noisy == []) == (verbose == "0"), out.stderr[-3000:]
    if verbose == "0":
        assert out.stderr == "", out.stderr[-3000:]  # not a line of any other warning either
