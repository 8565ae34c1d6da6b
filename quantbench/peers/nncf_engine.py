"""OpenVINO NNCF's post-training quantization as a peer engine (``engine: nncf``).

Backend: NNCF's **ONNX backend**, ``nncf.quantize(onnx.ModelProto, nncf.Dataset(...))`` on the job's
``fp32.onnx``. It is the path NNCF documents for ONNX models (PTQ "Supported" for ONNX; its ONNX
examples quantize a MobileNetV2 export and run it in onnxruntime), it calibrates with onnxruntime
itself, and it returns the QDQ ``onnx.ModelProto`` that quantbench scores, with the weights already
folded to int8 initializers in front of their DequantizeLinear. The torch backend would
return a torch model with NNCF's fake-quantize hooks that must go through a second exporter before
onnxruntime sees it (one more place for the two to disagree); starting from the same ``fp32.onnx``
as the ``ort`` engine also makes the two ONNX peers differ by their quantizer only.

The input is pre-processed as the ``ort`` engine's is (onnxruntime's ``quant_pre_process``, option
``preprocess``): the dynamo exporter leaves BatchNormalization nodes unfolded, where the exports of
NNCF's examples have them folded into the convolutions; NNCF then quantizes the convolution
weights before BN scaling and puts the activation quantizer after the BN, which onnxruntime cannot
fuse into an integer convolution. Folding BN first is a float-exact rewrite.

Calibration: exactly ``job.calibration()`` (same images, same order), fed one image at a time,
which is how NNCF's statistics are defined (per-sample min / max averaged over ``subset_size``
samples; its default pipeline and examples use batch size 1), with ``subset_size`` = the number of
images. An export whose batch dimension is static gets the batches as they are, with NNCF's
``batchwise_statistics``.

Options (``job.options``; an unknown key or a bad value is a ValueError naming it):

* ``preset``: ``performance`` (symmetric activations and weights; default) | ``mixed`` (asymmetric
  activations);
* ``fast_bias_correction``: NNCF's fast bias correction (True, NNCF's default) or its slower bias
  correction on real subgraph outputs (False; NNCF 3.4 fails on some graphs, e.g. torchvision's
  resnet18, and the failure is recorded as the engine's); ``bias_correction``: False turns either
  off (default True). Fast bias correction feeds each layer a constant blob of its per-channel mean
  input, so border (padding) effects enter its estimate; on small feature maps it can hurt (NNCF
  3.4, a CNN trained on 8x8 digits: float 98.5%, no bias correction 98.2%, fast 97.1%, full 98.5%);
* ``per_channel``: None (default: NNCF's own choice, per-channel weights for convolutions), True,
  or False (per-tensor weights through ``AdvancedQuantizationParameters.weights_quantization_params``);
* ``subset_size``: how many calibration images to use (default: all of them);
* ``preprocess``: onnxruntime's pre-processing first (default True).

NNCF's telemetry (openvino_telemetry, on by default; its documented opt-out, ``opt_in_out --opt_out``,
writes a user-wide consent file, which an engine has no business doing) is turned off for the
process instead: ``NNCF_CI=1`` and ``CI=true`` for the duration of the first ``import nncf`` (see
:func:`quantbench.engine.machine.telemetry_declined`), so NNCF installs its telemetry stub, nothing is ever sent and no client-id
file is written; an NNCF imported earlier without them gets the same stub. Its INFO lines and rich
progress bars are kept out of the output; its warnings are recorded as notes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from quantbench.engine.machine import telemetry_declined
from quantbench.peers.base import PeerOutput, overlay_options, require_bool
from quantbench.peers.protocol import PeerJob

__all__ = ["DISTRIBUTION", "DEFAULTS", "resolve_options", "quantize"]

DISTRIBUTION = "nncf"

DEFAULTS: dict[str, Any] = {
    "preset": "performance",
    "fast_bias_correction": True,
    "bias_correction": True,
    "per_channel": None,
    "subset_size": None,
    "preprocess": True,
}

_PRESETS = ("performance", "mixed")
_BOOLS = ("fast_bias_correction", "bias_correction", "preprocess")


def resolve_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` checked and laid over :data:`DEFAULTS` (ValueError names a bad key)."""
    options = dict(options or {})
    out = overlay_options("nncf", options, DEFAULTS)
    for key, value in options.items():
        if key == "preset":
            if not isinstance(value, str) or value.lower() not in _PRESETS:
                raise ValueError(f"nncf engine: option preset={value!r} is not one of {', '.join(_PRESETS)}")
            out[key] = value.lower()
        elif key in _BOOLS:
            out[key] = require_bool("nncf", key, value)
        elif key == "per_channel":
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"nncf engine: option per_channel={value!r} must be true, false or null")
            out[key] = value
        elif key == "subset_size":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"nncf engine: option subset_size={value!r} must be a positive integer or null")
            out[key] = value
    return out


def _import_nncf():
    """``import nncf`` with its telemetry off (:func:`~quantbench.engine.machine.telemetry_declined`: NNCF
    installs its stub, openvino_telemetry declines consent and writes nothing under ``~/intel``)."""
    if "nncf" not in sys.modules:
        with telemetry_declined():
            import nncf  # noqa: F401
    import nncf
    import nncf.telemetry.decorator as decorator
    import nncf.telemetry.wrapper as wrapper

    if not isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub):
        # NNCF was imported before, without the switch: give it the stub it would have installed.
        nncf.telemetry.telemetry = wrapper.telemetry = decorator.telemetry = wrapper.NNCFTelemetryStub()
    return nncf


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if message and message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _quiet_nncf(nncf) -> Iterator[_Capture]:
    """NNCF's logger at WARNING (its INFO lines are noise here), its warnings captured, and its rich progress
    bars (written to sys.stdout) kept out of ours; all undone after. ``quantbench -v`` shows everything."""
    from quantbench.quiet import verbose

    capture = _Capture()
    logger = nncf.nncf_logger
    if verbose():
        logger.addHandler(capture)
        try:
            yield capture
        finally:
            logger.removeHandler(capture)
        return
    saved = logger.level, [(h, h.level) for h in logger.handlers]
    nncf.set_log_level(logging.WARNING)
    logger.addHandler(capture)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(saved[0])
        for handler, level in saved[1]:
            handler.setLevel(level)


def _batch_is_dynamic(model, input_name: str) -> bool:
    for value in model.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            return not dims or not dims[0].HasField("dim_value")
    return True


def _items(batches: list, input_names: list[str], per_image: bool) -> list[dict]:
    import numpy as np

    from quantbench.peers.ort_engine import _feed

    feeds = [_feed(b, input_names) for b in batches]
    if not per_image:
        return feeds
    items = []
    for feed in feeds:
        n = len(next(iter(feed.values())))
        items += [{k: np.ascontiguousarray(v[i:i + 1]) for k, v in feed.items()} for i in range(n)]
    return items


def _per_channel_weights(model) -> bool:
    """Whether some weight of the QDQ model has a per-channel scale (a DequantizeLinear of an initializer)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            if np.prod(numpy_helper.to_array(inits[node.input[1]]).shape, dtype=int) > 1:
                return True
    return False


def quantize(job: PeerJob, model=None) -> PeerOutput:
    """Quantize ``job``'s ``fp32.onnx`` with ``nncf.quantize`` (ONNX backend) into ``<root>/model.onnx``."""
    options = resolve_options(job.options)
    nncf = _import_nncf()
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from quantbench.peers.ort_engine import ort_preprocess

    root = Path(job.root)
    out = root / "model.onnx"
    notes: list[str] = []
    batches = job.calibration()
    if not batches:
        raise ValueError("nncf engine: the job has no calibration batches")
    input_names = list(job.input_names)

    start = time.perf_counter()
    src = job.path(job.fp32_onnx)
    if options["preprocess"]:
        src = ort_preprocess(src, root / "fp32.pre.onnx", notes, who="nncf")
    float_model = onnx.load(str(src))
    per_image = _batch_is_dynamic(float_model, input_names[0])
    items = _items(batches, input_names, per_image)
    images = sum(len(next(iter(item.values()))) for item in items)
    subset_size = options["subset_size"] or (len(items) if per_image else images)
    if not per_image:
        notes.append("fp32.onnx has a static batch dimension: NNCF calibrated on whole batches "
                     "(batchwise_statistics=True); subset_size counts batches")

    advanced = AdvancedQuantizationParameters(disable_bias_correction=not options["bias_correction"],
                                              batchwise_statistics=not per_image)
    if options["per_channel"] is not None:
        advanced.weights_quantization_params = QuantizationParameters(per_channel=options["per_channel"])
    preset = nncf.QuantizationPreset.PERFORMANCE if options["preset"] == "performance" else nncf.QuantizationPreset.MIXED
    with _quiet_nncf(nncf) as capture:
        quantized = nncf.quantize(float_model, nncf.Dataset(items), preset=preset, subset_size=subset_size,
                                  fast_bias_correction=options["fast_bias_correction"], advanced_parameters=advanced)
    onnx.save(quantized, str(out))
    quantize_s = time.perf_counter() - start

    effective = dict(options, subset_size=subset_size)
    if options["per_channel"] is None:
        effective["per_channel"] = _per_channel_weights(quantized)
        notes.append(f"per_channel: NNCF's default ({'per-channel' if effective['per_channel'] else 'per-tensor'} "
                     "weights)")
    if options["bias_correction"] and options["fast_bias_correction"]:
        notes.append("fast bias correction on (NNCF's default)")
    notes.append(f"NNCF's calibration sessions use onnxruntime's default intra-op threads, not job.threads={job.threads}")
    notes += [f"nncf: {m}" for m in capture.messages]
    return PeerOutput(onnx=out, torch_model=None, options=effective, notes=notes, quantize_s=quantize_s)
