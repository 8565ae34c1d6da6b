"""The engine's Python API: a wrong argument is one line naming it (a BadInputError), and a
capture, quantization and export of a model print nothing a user cannot act on."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from engine_models import TinyAllOps
from torch import nn

from quantbench.engine import CaptureError, ModelQuantizer, QuantizationSpec, SpecError, capture, presets
from quantbench.errors import BadInputError


@pytest.mark.parametrize("kwargs, text", [
    ({"ch_axis": "x"}, "ch_axis='x' must be an int"),
    ({"ch_axis": 1.5}, "ch_axis=1.5 must be an int"),
    ({"symmetric": 1}, "symmetric=1 must be a bool"),
    ({"narrow_range": "yes"}, "narrow_range='yes' must be a bool"),
    ({"percentile": "99"}, "percentile='99' must be a float"),
    ({"observer": "minmx"}, "did you mean 'minmax'"),
    ({"dtype": "int3"}, "dtype='int3' is not one of"),
])
def test_a_bad_spec_field_is_one_line_naming_it(kwargs, text):
    with pytest.raises(SpecError) as exc:
        QuantizationSpec(**kwargs)
    assert isinstance(exc.value, BadInputError) and text in str(exc.value) and "\n" not in str(exc.value)


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
    assert "torch.export could not capture the model" in str(exc.value) and "torch.cond" in str(exc.value)
    assert "def forward" in exc.value.graph_dump  # kept for --debug, not printed
    assert "def forward" not in capfd.readouterr().err


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
