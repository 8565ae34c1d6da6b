"""torchao's PT2E flow with its X86 inductor quantizer, as a peer engine.

The flow is the one torchao documents for CNNs on x86 CPUs (static post-training quantization):
``torch.export.export(model, example).module()`` ->
``prepare_pt2e(gm, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))`` ->
calibration on the job's batches, in order -> ``convert_pt2e`` (quantize/dequantize ops of
``quantized_decomposed`` around float aten ops). Its deploy path is ``torch.compile`` with
inductor freezing, which pattern-matches those q/dq patterns into oneDNN int8 kernels; that path
is timed here against a ``torch.compile``d float model (``latency/inductor_*``).

What the recipe is (recorded in the notes): activations uint8 asymmetric per-tensor (histogram
observer), weights int8 symmetric per-channel (min-max), bias float, BatchNorm folded into the
convolution. Ops the quantizer has no annotation for stay float; so does the output of a
convolution that feeds a residual add (inductor fuses conv+add(+relu) into one int8 kernel, so the
recipe puts no quantizer between them).

Capture: an eager model is exported with ``strict=True`` and a dynamic batch dimension. Non-strict
export records no per-call-site ``source_fn_stack``, and torchao's partition matcher then groups the
two call sites of a ReLU module used twice (torchvision's BasicBlock) into one partition and raises
"Input partition has more than one output node". A graph that is already a ``torch.export`` module
(the job's ``float.pt2`` in an isolated worker, or a non-strict fallback) is quantized as it is,
with each call site given its own name in the ``nn_module_stack`` metadata (see
:func:`_separate_call_sites`); re-tracing it would lose the source modules the quantizer matches on.
Such a program must have a dynamic batch dimension for calibration batches of other sizes.

Importing torchao's x86 quantizer module sets ``torch._inductor.config.pre_grad_custom_pass`` for
the whole process (torchao's own import-time registration of its inductor passes).
"""

from __future__ import annotations

import copy
import math
import operator
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchao  # noqa: F401  (ImportError here: the toolkit is not installed)

from quantbench.peers.base import PeerOutput, Unsupported, overlay_options, require_bool
from quantbench.peers.protocol import PeerJob

__all__ = ["DEFAULT_OPTIONS", "DISTRIBUTION", "quantize"]

DISTRIBUTION = "torchao"

#: option -> default (the type of the default is the option's type).
DEFAULT_OPTIONS: dict[str, Any] = {
    "per_channel": True,
    "reduce_range": False,
    "onnx_export": True,
    "inductor_latency": True,
    "latency_iters": 30,
    "latency_batch": 1,
}

_WARMUP = 3
_QDQ = "quantized_decomposed"
_LAYOUT_OPS = {"aten.dropout.default", "aten.flatten.using_ints", "aten.view.default", "aten.reshape.default",
               "aten.clone.default", "aten.contiguous.default"}


def _validate(raw: dict[str, Any] | None) -> dict[str, Any]:
    raw = dict(raw or {})
    options = overlay_options("torchao", raw, DEFAULT_OPTIONS)
    for key, value in raw.items():
        if isinstance(DEFAULT_OPTIONS[key], bool):
            require_bool("torchao", key, value)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"torchao engine: option {key}={value!r} must be an integer >= 1")
        options[key] = value
    return options


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)


def _first_output(y) -> torch.Tensor:
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


def _sqnr_db(ref: torch.Tensor, other: torch.Tensor) -> float:
    noise = (ref.double() - other.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


# --------------------------------------------------------------------------------------------- the flow

def _quantization_config(per_channel: bool, reduce_range: bool):
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    if per_channel:
        return config
    # The quantizer takes any weight spec in its config; this is the default one with a per-tensor qscheme.
    default = config.weight
    weight = QuantizationSpec(dtype=default.dtype, quant_min=default.quant_min, quant_max=default.quant_max,
                              qscheme=torch.per_tensor_symmetric, is_dynamic=False,
                              observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return type(config)(config.input_activation, config.output_activation, weight, config.bias, config.is_qat)


def _example(batch) -> tuple:
    """The first calibration batch as export's example (batch >= 2, so the batch dimension can stay symbolic)."""
    args = _as_args(batch)
    if args and args[0].dim() > 0 and args[0].shape[0] < 2:
        args = tuple(torch.cat([a, a]) if a.dim() > 0 else a for a in args)
    return args


def _is_exported(model) -> bool:
    """A graph module that torch.export produced (its nodes carry the source modules the quantizer matches on)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        "nn_module_stack" in n.meta for n in model.graph.nodes if n.op == "call_function")


def _separate_call_sites(gm: torch.fx.GraphModule) -> int:
    """Give each call site of a module called more than once its own name in ``nn_module_stack``.

    A non-strict ``torch.export`` keys the second call of ``layer1.0.relu`` as ``layer1.0.relu@1`` but gives both
    calls the module path ``layer1.0.relu``; torchao's partition matcher groups nodes by that path, so the two
    ReLUs of a BasicBlock become one partition with two outputs and the X86 quantizer raises "Input partition has
    more than one output node". Metadata only: the graph is unchanged. Returns the entries renamed."""
    renamed = 0
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fixed = {}
        for key, (path, kind) in stack.items():
            if "@" in key and "@" not in path:
                path = f"{path}@{key.rsplit('@', 1)[1]}"
                renamed += 1
            fixed[key] = (path, kind)
        node.meta["nn_module_stack"] = fixed
    return renamed


def _static_batch(gm: torch.fx.GraphModule) -> int | None:
    """The batch size a captured graph is specialised to, or None when its batch dimension is symbolic."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0] if isinstance(value.shape[0], int) else None
    return None


def _capture(model: torch.nn.Module, example: tuple, notes: list[str]) -> tuple[torch.fx.GraphModule, str]:
    """``torch.export.export(...).module()`` of an eager model: strict with a dynamic batch first (strict export
    records a unique ``source_fn_stack`` per call site, which the quantizer's matcher reads); falls back, with a
    note. An already exported graph module is used as it is (copied): re-tracing it would lose the source modules
    (nn.Conv2d, nn.ReLU, ...) that the quantizer matches on, and nothing would be annotated."""
    if _is_exported(model):
        return copy.deepcopy(model), "the torch.export graph given, as is"
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} if a.dim() > 0 else None for a in example)
    errors = []
    for strict, dyn in ((True, dynamic), (False, dynamic), (True, None), (False, None)):
        try:
            gm = torch.export.export(model, example, dynamic_shapes=dyn, strict=strict).module()
        except Exception as exc:  # noqa: BLE001  (the next attempt; all failing raises below)
            errors.append(f"strict={strict} dynamic={dyn is not None}: {_first_line(exc)}")
            continue
        how = f"torch.export.export(strict={strict}, {'dynamic' if dyn else 'static'} batch)"
        if errors:
            notes.append(f"capture fell back to {how} after: " + "; ".join(errors))
        return gm, how
    raise RuntimeError("torch.export.export failed: " + " | ".join(errors))


def _unannotated_ops(prepared: torch.fx.GraphModule) -> Counter:
    """call_function ops the quantizer left without an annotation (they run in float)."""
    left = Counter()
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or _QDQ in str(node.target):
            continue
        annotation = node.meta.get("quantization_annotation")
        if annotation is None or not getattr(annotation, "_annotated", False):
            left[str(node.target)] += 1
    return left


def _requantized_outputs(converted: torch.fx.GraphModule) -> tuple[int, int]:
    """(conv/linear with int8 inputs whose output is requantized, all conv/linear with int8 inputs).

    The output is requantized when it reaches a ``quantize_per_tensor`` through single-user
    elementwise post-ops (relu, hardtanh, ...); a conv feeding a residual add is not (inductor
    fuses the add into the int8 kernel)."""
    total = requantized = 0
    for node in converted.graph.nodes:
        if node.op != "call_function" or str(node.target) not in ("aten.conv2d.default", "aten.conv1d.default",
                                                                  "aten.linear.default"):
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if not inputs or not all(_QDQ in str(a.target) for a in inputs):
            continue
        total += 1
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if "quantize_per_tensor" in str(user.target) and "dequantize" not in str(user.target):
                requantized += 1
                break
            if _QDQ in str(user.target) or not str(user.target).startswith(("aten.relu", "aten.hardtanh",
                                                                             "aten.hardswish", "aten.silu")):
                break
            current = user
    return requantized, total


def _recipe_notes(per_channel: bool, reduce_range: bool, left: Counter, requantized: int, total: int) -> list[str]:
    weights = ("int8 symmetric per-channel (PerChannelMinMaxObserver, X86 default)" if per_channel else
               "int8 symmetric per-tensor (MinMaxObserver; the X86 default is per-channel)")
    notes = [f"X86InductorQuantizer (torchao PT2E, static PTQ): activations uint8 asymmetric per-tensor "
             f"[0, {127 if reduce_range else 255}] (HistogramObserver), weights {weights}, bias float, "
             f"BatchNorm folded into conv by prepare_pt2e"]
    compute = {k: v for k, v in left.items() if k not in _LAYOUT_OPS}
    layout = {k: v for k, v in left.items() if k in _LAYOUT_OPS}
    if compute:
        notes.append("left in float (no X86 annotation): "
                     + ", ".join(f"{k.removeprefix('aten.')} x{v}" for k, v in sorted(compute.items())))
    if layout:
        notes.append("not annotated (layout / no-op): "
                     + ", ".join(f"{k.removeprefix('aten.')} x{v}" for k, v in sorted(layout.items())))
    if total > requantized:
        notes.append(f"{total - requantized} of {total} int8 conv/linear outputs are not requantized: they feed "
                     f"a residual add (fused into the int8 kernel by inductor) or the model output in float")
    return notes


# --------------------------------------------------------------------------------------------- ONNX

def _onnx_range_problem(converted: torch.fx.GraphModule) -> str | None:
    """The exporter lowers quantize_per_tensor to QuantizeLinear without a clamp to (quant_min, quant_max)."""
    for node in converted.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(f"{_QDQ}.quantize_per_tensor"):
            qmin, qmax, dtype = node.args[3], node.args[4], node.args[5]
            info = torch.iinfo(dtype)
            if (qmin, qmax) != (info.min, info.max):
                return (f"activation range [{qmin}, {qmax}] of {dtype} is not the dtype's full range, and torch.onnx "
                        f"lowers quantize_per_tensor to QuantizeLinear without that clamp")
    return None


def _ort_session(path: Path, threads: int, optimize: bool, optimized_path: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not the warning that an optimized model file is hardware-specific
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_outputs(session, args: tuple) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0])


def _export_onnx(converted, float_model, example: tuple, dynamic: bool, job: PeerJob, check_batch,
                 notes: list[str]) -> Path | None:
    """``torch.onnx.export(dynamo=True)`` of the converted model, checked in onnxruntime. None (with a note) when
    the export fails, onnxruntime cannot run it, or it does not compute what the torch-side model computes.

    The check runs the ONNX without graph optimisation (its QDQ semantics, float kernels) on a calibration batch.
    It cannot be bit-exact: onnxruntime's and torch's float convolutions round differently, a value on a rounding
    boundary of a quantizer lands one step apart, and such steps grow through the layers (more so in a random-init
    network). So the bar is relative: the export's deviation from torchao's model must stay below torchao's own
    quantization error (torch-side int8 model vs the float model)."""
    import onnx

    problem = _onnx_range_problem(converted)
    if problem:
        notes.append(f"no ONNX: {problem}")
        return None
    path = Path(job.root) / "model.onnx"
    names = list(job.input_names[:len(example)]) if len(job.input_names) >= len(example) else None
    attempts = [True, False] if dynamic else [False]
    errors = []
    for dyn in attempts:
        batch = torch.export.Dim("batch", min=1, max=65536)
        shapes = tuple({0: batch} if a.dim() > 0 else None for a in example) if dyn else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(converted, example, str(path), dynamo=True, dynamic_shapes=shapes,
                                  input_names=names, external_data=False, verbose=False)
            break
        except Exception as exc:  # noqa: BLE001  (recorded as the note; the run goes on without an ONNX)
            errors.append(f"{'dynamic' if dyn else 'static'} batch: {_first_line(exc)}")
    else:
        notes.append("no ONNX: torch.onnx.export(dynamo=True) failed: " + "; ".join(errors))
        path.unlink(missing_ok=True)
        return None
    if errors:
        notes.append("ONNX exported with a static batch after: " + "; ".join(errors))
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    args = _as_args(check_batch)
    try:
        with torch.no_grad():
            ref = _first_output(converted(*args)).float()
            reference = _first_output(float_model(*args)).float()
        plain = _ort_outputs(_ort_session(path, job.threads, optimize=False), args)
        with tempfile.TemporaryDirectory() as tmp:
            fused_path = Path(tmp) / "optimized.onnx"
            fast = _ort_outputs(_ort_session(path, job.threads, optimize=True, optimized_path=fused_path), args)
            fused = Counter(n.op_type for n in onnx.load(str(fused_path)).graph.node)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"no ONNX: onnxruntime cannot run the export ({_first_line(exc)})")
        path.unlink(missing_ok=True)
        return None
    export_sqnr, quant_sqnr = _sqnr_db(ref, plain), _sqnr_db(reference, ref)
    if export_sqnr < quant_sqnr:
        notes.append(f"no ONNX: the export does not compute what torchao's model computes (onnxruntime without "
                     f"graph optimisation vs torch: {export_sqnr:.1f} dB SQNR, below the int8 model's own "
                     f"{quant_sqnr:.1f} dB vs float)")
        path.unlink(missing_ok=True)
        return None
    convs = ops.get("Conv", 0) + ops.get("Gemm", 0) + ops.get("MatMul", 0)
    integer = sum(fused.get(k, 0) for k in ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"))
    agree = ""
    if ref.dim() == 2 and ref.shape[1] > 1:
        agree = f", top-1 agreement {100.0 * (ref.argmax(1) == fast.argmax(1)).float().mean().item():.1f} %"
    notes.append(f"ONNX: torch.onnx.export(dynamo=True{', dynamic batch' if not errors and dynamic else ''}), "
                 f"{ops.get('QuantizeLinear', 0)} QuantizeLinear / {ops.get('DequantizeLinear', 0)} DequantizeLinear; "
                 f"onnxruntime vs torch without graph optimisation: {export_sqnr:.1f} dB SQNR (int8 vs float: "
                 f"{quant_sqnr:.1f} dB); "
                 f"with it, {integer} of {convs} conv/gemm run as integer kernels "
                 f"({_sqnr_db(ref, fast):.1f} dB vs torch{agree})")
    return path


# --------------------------------------------------------------------------------------------- inductor

def _latency_inputs(calibration: list, batch: int, notes: list[str]) -> tuple:
    firsts = [_as_args(b) for b in calibration]
    n_args = len(firsts[0])
    joined = [torch.cat([f[i] for f in firsts]) for i in range(n_args)]
    have = joined[0].shape[0]
    if have < batch:
        notes.append(f"inductor latency: {have} calibration images repeated to latency_batch={batch}")
        reps = -(-batch // have)
        joined = [torch.cat([j] * reps) for j in joined]
    return tuple(j[:batch].contiguous() for j in joined)


def _inductor_latency(float_model, converted, inputs: tuple, iters: int, notes: list[str]) -> dict[str, float]:
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    def kernels() -> int:
        return sum(counters["inductor"][k] for k in ("qconv_weight_prepack_matcher_count",
                                                      "qlinear_weight_prepack_matcher_count"))

    try:
        # torchao's documented x86 int8 setting; patch() restores the previous value on exit.
        with inductor_config.patch(freezing=True), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # inductor's own lowering warnings
            before = kernels()
            start = time.perf_counter()
            compiled_fp32 = torch.compile(float_model, dynamic=False)
            compiled_fp32(*inputs)
            fp32_compile = time.perf_counter() - start
            start = time.perf_counter()
            compiled_int8 = torch.compile(converted, dynamic=False)
            compiled_int8(*inputs)
            int8_compile = time.perf_counter() - start
            lowered = kernels() - before
            for _ in range(_WARMUP):
                compiled_fp32(*inputs)
                compiled_int8(*inputs)
            times = {"fp32": [], "int8": []}
            runs = {"fp32": compiled_fp32, "int8": compiled_int8}
            for i in range(iters):
                for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):  # interleaved, order alternating
                    start = time.perf_counter()
                    runs[name](*inputs)
                    times[name].append(time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001  (no C++ compiler, an inductor failure: skipped, with the reason)
        notes.append(f"inductor latency skipped: torch.compile failed ({_first_line(exc)})")
        return {}
    if lowered == 0:
        notes.append("inductor lowered no conv/linear to an int8 kernel (its x86 weight-prepack patterns match "
                     "per-channel int8 weights): the int8 timing is of q/dq around float kernels")
    fp32_ms = 1e3 * statistics.median(times["fp32"])
    int8_ms = 1e3 * statistics.median(times["int8"])
    notes.append(f"inductor (torch.compile, freezing=True): {lowered} conv/linear lowered to oneDNN int8 kernels; "
                 f"compile {fp32_compile:.1f} s fp32 + {int8_compile:.1f} s int8; median of {iters} interleaved "
                 f"runs at batch {inputs[0].shape[0]}")
    return {"latency/inductor_fp32_ms": fp32_ms, "latency/inductor_int8_ms": int8_ms,
            "latency/inductor_speedup": fp32_ms / int8_ms if int8_ms > 0 else float("nan"),
            "latency/inductor_batch": float(inputs[0].shape[0]),
            "time/inductor_compile_s": fp32_compile + int8_compile}


# --------------------------------------------------------------------------------------------- the engine

def quantize(job: PeerJob, model: torch.nn.Module | None) -> PeerOutput:
    """PT2E + X86InductorQuantizer on the job's float model, calibrated on ``job.calibration()`` in order."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    options = _validate(job.options)
    if job.qat:
        raise Unsupported("the torchao engine runs PT2E post-training quantization only (no QAT recipe)")
    calibration = job.calibration()
    if not calibration:
        raise ValueError("torchao engine: the job has no calibration batches")
    if model is None:  # an isolated worker: the job's torch.export program
        program = torch.export.load(job.path(job.program_dynamic or job.program))
        model, source = program.module(), program.module()
        how = f"{job.program_dynamic or job.program} (the job's torch.export program), as is"
    else:
        if not _is_exported(model) and model.training:
            model = model.eval()
        source, how = model, None
    notes: list[str] = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(job.threads)))
    try:
        config = _quantization_config(options["per_channel"], options["reduce_range"])
        example = _example(calibration[0])
        start = time.perf_counter()
        if how is None:
            captured, how = _capture(source, example, notes)
        else:
            captured = source
        _separate_call_sites(captured)
        static = _static_batch(captured)
        sizes = sorted({_as_args(b)[0].shape[0] for b in calibration})
        if static is not None and sizes != [static]:
            raise ValueError(f"torchao engine: the captured graph has a static batch of {static} ({how}) but the "
                             f"calibration batches have {sizes} images; export the float program with a dynamic "
                             f"batch dimension (dynamic_shapes=({{0: torch.export.Dim('batch')}},))")
        prepared = prepare_pt2e(captured, X86InductorQuantizer().set_global(config))
        with torch.no_grad():
            for batch in calibration:
                prepared(*_as_args(batch))
        converted = convert_pt2e(prepared)
        quantize_s = time.perf_counter() - start
        move_exported_model_to_eval(converted)
        converted.training = False  # exported graphs refuse .eval(); the flag is what torch.onnx reads
        notes.extend(_recipe_notes(options["per_channel"], options["reduce_range"], _unannotated_ops(prepared),
                                   *_requantized_outputs(converted)))
        if static is not None:
            notes.append(f"the torch-side model has a static batch of {static} (as captured: {how})")
            example = tuple(a[:static] if a.dim() > 0 else a for a in _as_args(calibration[0]))
        onnx_path = None
        if options["onnx_export"]:
            onnx_path = _export_onnx(converted, model, example, static is None, job, calibration[0], notes)
        else:
            notes.append("no ONNX: onnx_export is false")
        metrics: dict[str, float] = {}
        if options["inductor_latency"] and static not in (None, options["latency_batch"]):
            notes.append(f"inductor latency skipped: the graph's static batch {static} is not "
                         f"latency_batch={options['latency_batch']}")
        elif options["inductor_latency"]:
            inputs = _latency_inputs(calibration, options["latency_batch"], notes)
            metrics.update(_inductor_latency(model, converted, inputs, options["latency_iters"], notes))
    finally:
        torch.set_num_threads(previous_threads)
    run_options = {**options, "quantizer": "X86InductorQuantizer",
                   "config": f"get_default_x86_inductor_quantization_config(reduce_range={options['reduce_range']})"
                             + ("" if options["per_channel"] else " with per-tensor weights"),
                   "capture": how}
    return PeerOutput(onnx=onnx_path, torch_model=converted, options=run_options, notes=notes, metrics=metrics,
                      quantize_s=quantize_s)



#: The engine-module contract's option check (``base.py``): ValueError naming a bad key.
resolve_options = _validate
