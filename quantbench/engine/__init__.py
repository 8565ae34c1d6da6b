"""quantbench.engine: graph-mode quantization on torch.export, QDQ ONNX, onnxruntime checks.

The flow (see :mod:`quantbench.engine.quantizer` for details)::

    from quantbench.engine import ModelQuantizer, capture, export_onnx, presets, check
    gm = capture(model.eval(), (x,))
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    qmodel = quantizer.quantize_model(gm, calib_loader)
    frozen = quantizer.freeze(qmodel)
    export_onnx(frozen, (x,), "model.onnx")
    print(check.compare("model.onnx", frozen, x, float_model=gm))

The engine depends on torch, torchao, onnx and onnxruntime only (and OpenVINO, imported when
a runtime session asks for it): never on hydra, omegaconf, mlflow, pandas, timm or pycocotools.

Layers, bottom to top (a module imports only modules listed before it;
``tests/test_engine_layers.py`` checks that there is no cycle)::

    errors, graph, learnable      exceptions; graph helpers (op names, attributes); LSQ / TQT math
    ops, observers, capture       the op vocabulary (kinds, tags); observer registry; torch.export
    spec, passes.fold, passes.prequant
                                  specs and configs; constant folding, SDPA, layer scale; pre-quant passes
    qdq, fake_quant, modes, presets, annotate, passes.qat_bn, passes.integer, passes.nonlinear
                                  ...; integer kernels (conv, add, mul, matmul; tables, softmax, mean, norms)
    targets, export, qat          hardware targets and their check; ONNX export; QAT modes
    passes.align                  alignment to a hardware target
    finite, passes.freeze         NaN / inf checks; fake-quant graph -> integer Q/DQ graph
    quantizer                     ModelQuantizer, coverage (what runs on integers in the export)
    check, onnx_coverage          onnxruntime parity, SQNR, latency; the float nodes of the ONNX graph
    runtimes                      the ONNX model in onnxruntime or OpenVINO: predict, interleaved latency
                                  (machine, a leaf beside errors: the CPU, its int8 ISA, installed runtimes)

Names load on first use (PEP 562): importing a light module such as
:mod:`quantbench.engine.spec` does not import torch, onnx or torchao, so the
command line checks a config in well under a second.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = [
    "CalibrationError",
    "CaptureError",
    "Config",
    "CoverageReport",
    "ExportError",
    "HardwareError",
    "HardwareTarget",
    "ModelQuantizer",
    "NonFiniteError",
    "QuantizationConfig",
    "QuantizationError",
    "QuantizationSpec",
    "SpecError",
    "Violation",
    "capture",
    "check",
    "check_hardware",
    "coverage",
    "export_onnx",
    "modes",
    "onnx_float_nodes",
    "machine",
    "ops",
    "presets",
    "qat",
    "runtimes",
]


#: exported name -> the module that defines it (a submodule itself when the name is a module)
_WHERE = {
    "check": None, "machine": None, "modes": None, "ops": None, "presets": None, "qat": None, "runtimes": None,
    "CalibrationError": "errors", "CaptureError": "errors", "ExportError": "errors", "HardwareError": "errors",
    "NonFiniteError": "errors", "QuantizationError": "errors", "SpecError": "errors",
    "export_onnx": "export", "onnx_float_nodes": "onnx_coverage",
    "CoverageReport": "quantizer", "ModelQuantizer": "quantizer", "coverage": "quantizer",
    "Config": "spec", "QuantizationConfig": "spec", "QuantizationSpec": "spec",
    "HardwareTarget": "targets", "Violation": "targets", "check_hardware": "targets",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE[name]
    value = importlib.import_module(f"{__name__}.{name}") if module is None else \
        getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _EngineModule(types.ModuleType):
    """The package's module type: ``capture`` is the function, although a submodule has that name too.

    Importing the submodule :mod:`quantbench.engine.capture` sets the package attribute ``capture``
    to the module; with lazy loading that may happen before anyone asks for the function, so the
    name is a property whose setter ignores the import system's assignment.
    """

    @property
    def capture(self) -> Any:
        from quantbench.engine.capture import capture

        return capture

    @capture.setter
    def capture(self, _module: Any) -> None:
        pass


sys.modules[__name__].__class__ = _EngineModule
