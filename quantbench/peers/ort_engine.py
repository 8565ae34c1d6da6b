"""onnxruntime's own static quantizer as a peer engine (``engine: ort``).

The float model's ONNX export (``fp32.onnx``) goes through onnxruntime's documented flow: the
pre-processing step (:func:`onnxruntime.quantization.shape_inference.quant_pre_process`: symbolic
shape inference and onnxruntime's basic graph optimizations, which fold the BatchNormalization
nodes the dynamo exporter leaves behind into their convolutions), then
:func:`onnxruntime.quantization.quantize_static` in QDQ format, calibrated on exactly the job's
calibration batches, in order. The torch-side ``model`` is not used.

Options (``job.options``; an unknown key or a bad value is a ValueError naming it):

* ``calibrate_method``: ``MinMax`` (default) | ``Entropy`` | ``Percentile``; ``percentile``: the
  percentile of ``Percentile`` (default 99.999, onnxruntime's);
* ``per_channel``: per-output-channel weight scales (default False);
* ``activation_type``: ``QInt8`` (default) | ``QUInt8``; ``weight_type``: ``QInt8`` (default) |
  ``QUInt8`` | ``QInt4`` (4-bit only where the installed onnxruntime has ``QuantType.QInt4``;
  onnxruntime cannot pair int8 activations with uint8 weights: :class:`Unsupported`);
* ``symmetric_activation`` / ``symmetric_weight``: ``extra_options`` ActivationSymmetric /
  WeightSymmetric (default True / True);
* ``reduce_range``: 7-bit weights for CPUs without VNNI (default False);
* ``quantize_bias``: int32 biases (``extra_options`` QuantizeBias, default True, onnxruntime's);
* ``preprocess``: run the pre-processing step first (default True; on failure the raw export is
  quantized and a note says so).

The defaults are quantbench's ``ptq_float`` scheme: int8 weights and activations, per-tensor,
symmetric, float scales, min-max ranges.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantbench.peers.base import PeerOutput, Unsupported, overlay_options, require_bool
from quantbench.peers.protocol import PeerJob

__all__ = ["DISTRIBUTION", "DEFAULTS", "resolve_options", "quantize", "ort_preprocess"]

DISTRIBUTION = "onnxruntime"

DEFAULTS: dict[str, Any] = {
    "calibrate_method": "MinMax",
    "percentile": 99.999,
    "per_channel": False,
    "activation_type": "QInt8",
    "weight_type": "QInt8",
    "symmetric_activation": True,
    "symmetric_weight": True,
    "reduce_range": False,
    "quantize_bias": True,
    "preprocess": True,
}

_CHOICES = {
    "calibrate_method": ("MinMax", "Entropy", "Percentile"),
    "activation_type": ("QInt8", "QUInt8"),
    "weight_type": ("QInt8", "QUInt8", "QInt4"),
}
_BOOLS = ("per_channel", "symmetric_activation", "symmetric_weight", "reduce_range", "quantize_bias", "preprocess")

def _choice(key: str, value: Any) -> str:
    for name in _CHOICES[key]:
        if isinstance(value, str) and value.lower() == name.lower():
            return name
    raise ValueError(f"ort engine: option {key}={value!r} is not one of {', '.join(_CHOICES[key])}")


def resolve_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The effective options: ``options`` checked and laid over :data:`DEFAULTS` (ValueError names a bad key)."""
    options = dict(options or {})
    out = overlay_options("ort", options, DEFAULTS)
    for key, value in options.items():
        if key in _CHOICES:
            out[key] = _choice(key, value)
        elif key in _BOOLS:
            out[key] = require_bool("ort", key, value)
        elif key == "percentile":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50.0 < float(value) <= 100.0:
                raise ValueError(f"ort engine: option percentile={value!r} must be a number in (50, 100]")
            out[key] = float(value)
    if out["calibrate_method"] != "Percentile":
        out.pop("percentile")
    return out


class _Batches:
    """A :class:`~onnxruntime.quantization.CalibrationDataReader` over the job's batches, in order."""

    def __init__(self, batches: list, input_names: list[str]) -> None:
        self.feeds = [_feed(b, input_names) for b in batches]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _feed(batch, input_names: list[str]) -> dict[str, np.ndarray]:
    """One calibration batch as onnxruntime feeds: a tensor goes to the first input, a tuple to the inputs in order."""
    tensors = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
    if len(tensors) > len(input_names):
        raise ValueError(f"a calibration batch has {len(tensors)} tensors but fp32.onnx has inputs {input_names}")
    return {name: np.ascontiguousarray(t.detach().cpu().float().numpy() if hasattr(t, "detach") else t,
                                       dtype=np.float32)
            for name, t in zip(input_names, tensors)}


def ort_preprocess(src: Path, dst: Path, notes: list[str], who: str = "onnxruntime") -> Path:
    """onnxruntime's quantization pre-processing of ``src`` into ``dst``; ``src`` itself (and a note) on failure."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # In the job directory: a failed attempt can leave external-data files behind in the working directory.
    with contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst))
            return dst
        except Exception as exc:  # symbolic shape inference gives up on some graphs (a detector's head)
            first = _first_line(exc)
        try:  # onnxruntime's documented switch for that case: ONNX shape inference only, still optimized
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            notes.append(f"{who}: quant_pre_process's symbolic shape inference failed ({first}); "
                         "pre-processed with skip_symbolic_shape=True")
            return dst
        except Exception as exc:  # the documented fallback: quantize the export as it is
            notes.append(f"{who}: quant_pre_process failed ({first}; then {_first_line(exc)}); "
                         "the raw fp32.onnx was quantized (BatchNormalization not folded)")
            return src


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:200]}"


def quantize(job: PeerJob, model=None) -> PeerOutput:
    """Quantize ``job``'s ``fp32.onnx`` with onnxruntime's ``quantize_static`` (QDQ) into ``<root>/model.onnx``."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = resolve_options(job.options)
    if options["weight_type"] == "QInt4" and not hasattr(QuantType, "QInt4"):
        raise Unsupported(f"onnxruntime {onnxruntime.__version__} has no 4-bit weights (QuantType.QInt4)")
    if options["activation_type"] == "QInt8" and options["weight_type"] == "QUInt8":
        raise Unsupported("onnxruntime's quantize_static cannot pair int8 activations with uint8 weights "
                          "(activation_type=QInt8, weight_type=QUInt8)")
    root = Path(job.root)
    src = job.path(job.fp32_onnx)
    out = root / "model.onnx"
    notes: list[str] = []
    reader = _Batches(job.calibration(), list(job.input_names))
    if not len(reader):
        raise ValueError("ort engine: the job has no calibration batches")

    start = time.perf_counter()
    if options["preprocess"]:
        src = ort_preprocess(src, root / "fp32.pre.onnx", notes)
    extra = {"ActivationSymmetric": options["symmetric_activation"], "WeightSymmetric": options["symmetric_weight"],
             "QuantizeBias": options["quantize_bias"]}
    if options["calibrate_method"] == "Percentile":
        extra["CalibPercentile"] = options["percentile"]
    # The calibrators print progress lines ("Collecting tensor data ...") with print(): kept out of our stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src), str(out), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=options["per_channel"],
            reduce_range=options["reduce_range"],
            activation_type=getattr(QuantType, options["activation_type"]),
            weight_type=getattr(QuantType, options["weight_type"]),
            calibrate_method=getattr(CalibrationMethod, options["calibrate_method"]),
            extra_options=extra,
        )
    quantize_s = time.perf_counter() - start

    notes.append("onnxruntime's calibration session uses its default intra-op threads (quantize_static "
                 f"takes no session options), not job.threads={job.threads}")
    if options["weight_type"] == "QInt4":
        notes.append("4-bit weights: onnxruntime writes com.microsoft QuantizeLinear/DequantizeLinear below opset 21")
    return PeerOutput(onnx=out, torch_model=None, options=options, notes=notes, quantize_s=quantize_s)
