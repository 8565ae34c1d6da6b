"""The exported ONNX model in a deployment runtime: onnxruntime or OpenVINO, behind one small interface.

Both runtimes read the same QDQ file; each fuses the Q/DQ pairs into its own integer kernels, so their
outputs may differ by a few quantization steps (different requantization rounding, a different
accumulation order of a float epilogue). :class:`Agreement` measures that difference in units of the
output's step; it is reported, never a gate: parity is onnxruntime's (:func:`~quantbench.engine.check.compare`).

::

    from quantbench.engine import runtimes
    ov = runtimes.session("openvino", "model.onnx", threads=1)
    ort = runtimes.session("ort", "model.onnx", threads=1)
    logits = ov.predict_fn()(x)                          # torch in, torch out, graph output order
    ov_ms, ort_ms = runtimes.latencies([ov, ort], x)     # interleaved medians (ms)

OpenVINO is compiled for the CPU with one stream, the latency hint and **f32 inference precision**: by
default OpenVINO runs an fp32 model in bf16 on a CPU with AVX512-bf16 or AMX, and an int8 / fp32 ratio
would then compare int8 with bf16. A model is reshaped to the input's static shape before it is compiled
(a static shape is what deploys, and what OpenVINO optimizes best); the compiled models are kept per shape.
"""

from __future__ import annotations

import functools
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from quantbench.engine import check
from quantbench.engine.machine import import_openvino, require_openvino
from quantbench.engine.storage import signed_weights

__all__ = ["OPENVINO_CPU_CONFIG", "RUNTIMES", "Agreement", "OpenVINOSession", "OrtSession", "latencies",
           "onnx_output_scales", "session"]

#: The runtimes :func:`session` builds, by name.
RUNTIMES = ("ort", "openvino")

#: OpenVINO's CPU compile settings (``INFERENCE_NUM_THREADS`` is added per session): one stream and the
#: latency hint (one request at a time, as onnxruntime is measured), f32 precision (never bf16 for fp32).
OPENVINO_CPU_CONFIG = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy())


class OrtSession:
    """onnxruntime (:func:`~quantbench.engine.check.ort_session`: fully optimized, no spinning threads)."""

    runtime = "ort"

    def __init__(self, path: str | Path, threads: int | None = None, *, session: Any = None) -> None:
        self.path = Path(path)
        self.session = session or check.ort_session(path, threads)

    def predict_fn(self) -> Callable[[torch.Tensor], Outputs]:
        """Torch tensor in, torch tensor(s) out (:func:`~quantbench.engine.check.ort_predict_fn`)."""
        return check.ort_predict_fn(self.session)

    def runner(self, example: torch.Tensor) -> Callable[[], Any]:
        """One inference on ``example``, as a call with nothing left to prepare (for timing)."""
        feed = {self.session.get_inputs()[0].name: _numpy(example)}
        return functools.partial(self.session.run, None, feed)


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    return import_openvino().Core()  # optional: imported once OpenVINO is asked for, telemetry declined


def _read_signed(path: Path):
    """OpenVINO's model of ``path``, its uint8 GEMM weights read as int8 (:func:`~quantbench.engine.storage.signed_weights`:
    the same values; OpenVINO runs uint8 weights in float, int8 ones in its integer kernels)."""
    proto = onnx.load(str(path))
    if not signed_weights(proto):
        return _core().read_model(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / path.name
        onnx.save(proto, str(signed))
        return _core().read_model(str(signed))


class OpenVINOSession:
    """OpenVINO on the CPU (:data:`OPENVINO_CPU_CONFIG`), compiled once per input shape.

    Raises:
        RuntimeUnavailableError: OpenVINO is not installed (one line: how to install it).
    """

    runtime = "openvino"
    #: compiled shapes kept (a validation set has one or two: its batch and its last batch)
    max_shapes = 8

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require_openvino()
        self.path = Path(path)
        self.config = {**OPENVINO_CPU_CONFIG, **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        self.model = _read_signed(self.path)
        first = self.model.input(0).get_partial_shape()
        self.fixed_batch = first[0].get_length() if first.rank.is_static and first[0].is_static else None
        self._compiled: OrderedDict[tuple[int, ...], tuple[Any, Any]] = OrderedDict()

    def compiled(self, shape: Sequence[int]) -> tuple[Any, Any]:
        """The model compiled for input ``shape`` and its infer request (kept for the next call)."""
        ov = import_openvino()

        key = tuple(int(d) for d in shape)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self.model
        declared = model.input(0).get_partial_shape()
        if not (declared.is_static and tuple(declared.to_shape()) == key):
            model = model.clone()
            model.reshape({model.input(0): ov.PartialShape(list(key))})
        compiled = _core().compile_model(model, "CPU", self.config)
        self._compiled[key] = (compiled, compiled.create_infer_request())
        while len(self._compiled) > self.max_shapes:
            self._compiled.popitem(last=False)
        return self._compiled[key]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        compiled, request = self.compiled(x.shape)
        request.infer({0: x})
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    def predict_fn(self) -> Callable[[torch.Tensor], Outputs]:
        """Torch tensor in, torch tensor(s) out in graph output order; a fixed batch runs in chunks."""
        return check.chunked_predict(self._run, self.fixed_batch)

    def runner(self, example: torch.Tensor) -> Callable[[], Any]:
        """One inference on ``example`` (set once as the request's input), for timing."""
        ov = import_openvino()

        x = _numpy(example)
        _, request = self.compiled(x.shape)
        request.set_input_tensor(ov.Tensor(x))
        return request.infer


RuntimeSession = OrtSession | OpenVINOSession


def session(runtime: str, path: str | Path, threads: int | None = None) -> RuntimeSession:
    """A session of ``runtime`` (one of :data:`RUNTIMES`) on the ONNX model at ``path``."""
    if runtime == "ort":
        return OrtSession(path, threads)
    if runtime == "openvino":
        return OpenVINOSession(path, threads)
    raise ValueError(f"runtime={runtime!r}: one of {', '.join(RUNTIMES)}")


def latencies(sessions: Sequence[RuntimeSession], example: torch.Tensor, *, warmup: int = 3,
              iters: int = 20) -> list[float]:
    """Median wall time (ms) of one run on ``example`` for each session (any runtimes), measured interleaved.

    Each round runs every model once, in turn, so a slow spell of a shared machine lands on all of them
    alike and their ratios stay meaningful (as :func:`~quantbench.engine.check.ort_latencies`).
    """
    return check.interleaved_medians([s.runner(example) for s in sessions], warmup=warmup, iters=iters)


def onnx_output_scales(path: str | Path) -> list[float | None]:
    """The quantization step of each output of the ONNX graph: the scale of the ``DequantizeLinear`` that
    writes it (the largest, per channel), None where the output is not dequantized (or its scale computed).
    The same steps :func:`~quantbench.engine.check.output_scales` reads from the frozen graph, for a model
    that has no frozen graph (a peer toolkit's)."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name: i for i in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    producers = {o: n for n in model.graph.node for o in n.output}
    scales: list[float | None] = []
    for out in model.graph.output:
        node = producers.get(out.name)
        scale = constants.get(node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None
        scales.append(float(np.max(numpy_helper.to_array(scale))) if scale is not None else None)
    return scales


class Agreement:
    """A predict function that runs ``predict`` and ``reference`` on the same inputs and returns ``predict``'s
    outputs, keeping how far apart the two are: the largest difference in units of each output's quantization
    step (``scales``, see :func:`onnx_output_scales`; outputs without one count in the absolute difference
    only) and the argmax agreement over dim 1 of the first output (per image for logits, per image and anchor
    for a detector's class scores), as :func:`~quantbench.engine.check.compare` measures parity.
    """

    def __init__(self, predict: Callable[[torch.Tensor], Any], reference: Callable[[torch.Tensor], Any],
                 scales: Sequence[float | None] | None = None) -> None:
        self.predict, self.reference = predict, reference
        self.scales = list(scales or [])
        self.max_abs = 0.0
        self.max_lsb: float | None = None
        self.agree = self.count = 0

    def __call__(self, x: torch.Tensor) -> Any:
        out = self.predict(x)
        outs, refs = check.output_tuple(out), check.output_tuple(self.reference(x))
        if len(outs) != len(refs):
            raise ValueError(f"the two runtimes give {len(outs)} and {len(refs)} outputs")
        for i, (o, r) in enumerate(zip(outs, refs)):
            err = (o.double() - r.double()).abs().max().item() if r.numel() else 0.0
            self.max_abs = max(self.max_abs, err)
            scale = self.scales[i] if i < len(self.scales) else None
            if scale:
                self.max_lsb = max(self.max_lsb or 0.0, err / scale)
        if refs[0].dim() >= 2:
            self.agree += (outs[0].argmax(1) == refs[0].argmax(1)).sum().item()
            self.count += refs[0].argmax(1).numel()
        return out

    def metrics(self, prefix: str) -> dict[str, float]:
        """``<prefix>_max_abs``, ``<prefix>_max_lsb`` (quantized outputs only) and ``<prefix>_agree_top1`` (%)."""
        out = {f"{prefix}_max_abs": self.max_abs}
        if self.max_lsb is not None:
            out[f"{prefix}_max_lsb"] = self.max_lsb
        if self.count:
            out[f"{prefix}_agree_top1"] = 100.0 * self.agree / self.count
        return out
