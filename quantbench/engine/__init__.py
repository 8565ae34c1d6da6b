"""quantbench.engine: graph-mode quantization on torch.export, QDQ ONNX, onnxruntime checks.

The flow (see :mod:`quantbench.engine.quantizer` for details)::

    from quantbench.engine import ModelQuantizer, capture, export_onnx, presets, check
    gm = capture(model.eval(), (x,))
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    qmodel = quantizer.quantize_model(gm, calib_loader)
    frozen = quantizer.freeze(qmodel)
    export_onnx(frozen, (x,), "model.onnx")
    print(check.compare("model.onnx", frozen, x, float_model=gm))

The engine depends on torch, torchao, onnx and onnxruntime only: never on
hydra, omegaconf, mlflow, pandas, timm or pycocotools.

Layers, bottom to top (a module imports only modules listed before it;
``tests/test_engine_layers.py`` checks that there is no cycle)::

    errors, graph, learnable      exceptions; graph helpers (op names, attributes); LSQ / TQT math
    ops, observers, capture       the op vocabulary (kinds, tags); observer registry; torch.export
    spec, passes.prequant         specs and configs; pre-quantization passes
    qdq, fake_quant, modes, presets, annotate, passes.qat_bn, passes.integer
    targets, export, qat          hardware targets and their check; ONNX export; QAT modes
    passes.align                  alignment to a hardware target
    passes.freeze                 fake-quant graph -> integer Q/DQ graph
    quantizer                     ModelQuantizer, coverage
    check                         onnxruntime parity, SQNR, latency
"""

from quantbench.engine import check, modes, ops, presets, qat
from quantbench.engine.capture import capture
from quantbench.engine.errors import (
    CalibrationError,
    CaptureError,
    ExportError,
    HardwareError,
    NonFiniteError,
    QuantizationError,
    SpecError,
)
from quantbench.engine.export import export_onnx
from quantbench.engine.quantizer import CoverageReport, ModelQuantizer, coverage
from quantbench.engine.spec import Config, QuantizationConfig, QuantizationSpec
from quantbench.engine.targets import HardwareTarget, Violation, check_hardware

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
    "ops",
    "presets",
    "qat",
]
