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
"""

from quantbench.engine import check, modes, presets, qat
from quantbench.engine.capture import CaptureError, capture
from quantbench.engine.export import ExportError, export_onnx
from quantbench.engine.hardware import HardwareError, HardwareTarget, Violation, check_hardware
from quantbench.engine.observers import NonFiniteError
from quantbench.engine.quantizer import (
    CalibrationError,
    CoverageReport,
    ModelQuantizer,
    QuantizationError,
    coverage,
)
from quantbench.engine.spec import Config, QuantizationConfig, QuantizationSpec, SpecError

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
    "presets",
    "qat",
]
