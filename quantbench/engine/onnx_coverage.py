"""Export-side coverage: which nodes of the graph onnxruntime runs compute in float.

:func:`quantbench.engine.quantizer.coverage` reads the annotation: a node counts
as quantized when its inputs and its output carry quantizers. What deploys is
decided later, by onnxruntime: it fuses a QDQ group (DequantizeLinear inputs ->
op -> QuantizeLinear) into an integer kernel only for the ops and patterns it
has a kernel for (QLinearConv, QGemm, QLinearAdd, QLinearMul, QLinearMatMul,
QLinearConcat, QLinearSigmoid, QLinearSoftmax, the QLinear pools, ...), and
runs every other node in float between a DequantizeLinear and a QuantizeLinear:
a SiLU exported as Sigmoid + Mul (the Mul of two activations), an Add whose
output feeds a Relu, LayerNorm, a mean. The annotation cannot see that; this
module reads the graph onnxruntime actually runs and classifies every node:

* **integer compute**: an integer kernel (``QLinear*``, ``QGemm``,
  ``ConvInteger``, ``MatMulInteger``, ...) or any other compute node whose
  tensors are all integer (a Clip or Max on uint8);
* **data movement**: Reshape, Transpose, Concat, Slice, Gather, MaxPool, a
  nearest Resize, Cast, ... and index arithmetic on int64. On integers they
  are free; on floats they are listed in ``float_movement`` (not compute, but
  they show a float path);
* **static**: nodes that read only constants and shapes (a weight's
  DequantizeLinear -> Transpose, an anchor grid): no activation flows
  through them, so they are neither compute nor a float path;
* **boundary**: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear (the
  model's input Q and its final DequantizeLinear included), and the integer
  Clip to a 4-bit grid that completes a QuantizeLinear to int4 / uint4 (which
  QuantizeLinear writes in 8 bits: :mod:`quantbench.engine.export`);
* **float compute**: any other node that reads a float activation or writes a
  float tensor, with the reason: where its float inputs come from, whether
  onnxruntime has an integer kernel for the op at all, and if it has, which
  part of the QDQ pattern around the node kept it from fusing.

The graph is the one onnxruntime writes at ``ORT_ENABLE_EXTENDED``: every QDQ
fusion happens at that level, and it is the highest whose
``optimized_model_filepath`` is portable (above it onnxruntime adds layout
transforms, NHWC/NCHWc, that are specific to the machine, and warns). Those
transforms only re-layout: the integer/float split is the same as what the
fully optimised session (:func:`quantbench.engine.check.ort_session`) runs.
Tensor types come from onnxruntime's value_info, ONNX shape inference and
the op's own definition (a QuantizeLinear writes its zero point's type, a
DequantizeLinear its scale's), so contrib ops are typed too.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

__all__ = ["OnnxCoverage", "classify", "onnx_float_nodes", "optimized_model"]

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
#: Integer types that carry quantized values; int64 and bool carry shapes, indices and masks.
QUANT_INT_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                             TensorProto.INT32, TensorProto.UINT32, TensorProto.INT4, TensorProto.UINT4})

BOUNDARY = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
SHAPE_ONLY = frozenset({"Shape", "Size"})
INTEGER_KERNELS = frozenset({"QGemm", "QAttention", "QEmbedLayerNormalization", "ConvInteger", "MatMulInteger",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
MOVEMENT = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Gather",
    "GatherElements", "GatherND", "Shape", "Size", "Expand", "Identity", "Cast", "CastLike", "Tile", "Pad",
    "DepthToSpace", "SpaceToDepth", "MaxPool", "NhwcMaxPool", "ConstantOfShape", "Range", "ScatterND",
    "ScatterElements", "NonZero", "ReverseSequence", "Compress", "Dropout",
})
#: float op -> the integer kernel onnxruntime fuses a matching QDQ group into (CPU provider).
QDQ_KERNEL = {
    "Conv": "QLinearConv", "ConvTranspose": "QLinearConvTranspose", "MatMul": "QLinearMatMul", "Gemm": "QGemm",
    "Add": "QLinearAdd", "Mul": "QLinearMul", "Concat": "QLinearConcat", "Sigmoid": "QLinearSigmoid",
    "Softmax": "QLinearSoftmax", "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool", "LeakyRelu": "QLinearLeakyRelu", "Where": "QLinearWhere",
}
#: Integer Clip bounds that narrow a QuantizeLinear's 8-bit output to a 4-bit grid: int4 [-8, 7] in int8,
#: uint4 [0, 15] in uint8, and int4 stored as uint8 + 128 (the export's unsigned activations).
GRID_CLIPS = {TensorProto.INT8: frozenset({(-8, 7)}), TensorProto.UINT8: frozenset({(0, 15), (120, 135)})}
_BOOL_OUT = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                       "IsNaN", "IsInf"})
_INT64_OUT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})


@dataclass
class OnnxCoverage:
    """Which compute nodes of the deployed graph run on integers, and why the others do not."""

    integer_ops: int
    total_ops: int
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op type, reason)
    float_movement: list[tuple[str, str, str]] = field(default_factory=list)
    movement_ops: int = 0  # data movement on integers, index arithmetic (not counted as compute)
    boundary_ops: int = 0  # QuantizeLinear / DequantizeLinear
    static_ops: int = 0  # nodes on constants and shapes only (no activation flows through them)

    @property
    def fraction(self) -> float:
        return self.integer_ops / self.total_ops if self.total_ops else 1.0

    def float_op_counts(self) -> dict[str, int]:
        """Float compute nodes per op type, most frequent first."""
        return dict(Counter(op for _, op, _ in self.float_nodes).most_common())

    def summary(self) -> str:
        """The float compute op types with counts (``Mul×49, Softmax×12``), or ``-`` for none."""
        return ", ".join(f"{op}×{n}" for op, n in self.float_op_counts().items()) or "-"

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}

    def __str__(self) -> str:
        lines = [f"export coverage: {self.integer_ops}/{self.total_ops} compute nodes integer"]
        lines += [f"  float: {n} ({op}): {reason}" for n, op, reason in self.float_nodes]
        lines += [f"  float movement: {n} ({op}): {reason}" for n, op, reason in self.float_movement]
        return "\n".join(lines)


def optimized_model(path: str | Path, *, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for ``path``, at ``ORT_ENABLE_EXTENDED`` (see the module doc)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def onnx_float_nodes(path: str | Path, *, optimized: bool = True, threads: int = 1) -> OnnxCoverage:
    """Classify every node of the exported model ``path`` as onnxruntime runs it.

    Args:
        path: a QDQ ONNX file (:func:`quantbench.engine.export_onnx`).
        optimized: classify onnxruntime's optimised graph (the integer kernels
            that deploy); False reads the file as written, where every op
            between a DequantizeLinear and a QuantizeLinear is float.
        threads: onnxruntime intra-op threads for building the session.
    """
    model = optimized_model(path, threads=threads) if optimized else onnx.load(str(path))
    return classify(model)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  (inference is only a fallback; a contrib op it trips on is typed by rule)
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _rule_types(node: onnx.NodeProto, types: dict[str, int]) -> list[int | None]:
    """Output types that follow from the op's definition (None: not determined here)."""
    op, ins = node.op_type, list(node.input)

    def of(i: int) -> int | None:
        return types.get(ins[i]) if i < len(ins) and ins[i] else None

    n = len(node.output)
    if op == "QuantizeLinear":
        return [_attr(node, "output_dtype") or of(2) or TensorProto.UINT8]
    if op == "DequantizeLinear":
        return [of(1) or TensorProto.FLOAT]
    if op == "DynamicQuantizeLinear":
        return [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8]
    if op == "Cast":
        return [_attr(node, "to")]
    if op in ("ConvInteger", "MatMulInteger"):
        return [TensorProto.INT32]
    if op == "QGemm":
        return [(of(8) or TensorProto.UINT8) if len(ins) > 7 and ins[7] else TensorProto.FLOAT]  # no y_scale: float out
    if op == "QLinearConcat":
        return [of(1)]
    if op.startswith("QLinear"):
        return [of(7 if op in ("QLinearConv", "QLinearConvTranspose") else len(ins) - 1)]  # the output zero point
    if op in _BOOL_OUT:
        return [TensorProto.BOOL] * n
    if op in _INT64_OUT:
        return [TensorProto.INT64] * n
    if op in ("MaxPool", "TopK"):
        return [of(0), TensorProto.INT64][:n]
    if op in ("Constant", "ConstantOfShape"):
        value = _attr(node, "value")
        return [value.data_type if value is not None else TensorProto.FLOAT]
    return [None] * n


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor: by the op's rule, else as declared or inferred, else its first input's."""
    declared = _declared_types(model)
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in g.input if v.type.HasField("tensor_type")})
    for node in g.node:
        first = next((types.get(t) for t in node.input if t and types.get(t)), None)
        for out, rule in zip(node.output, _rule_types(node, types)):
            if out:
                types[out] = rule or declared.get(out) or first
    return types


def _static_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that do not depend on the input's values: constants, shapes, and what is computed from them only."""
    g = model.graph
    static = {i.name for i in g.initializer}
    for node in g.node:
        if node.op_type in ("Shape", "Size") or all(t in static for t in node.input if t):
            static.update(o for o in node.output if o)
    return static


def _is_movement(node: onnx.NodeProto) -> bool:
    if node.op_type == "Resize":
        mode = _attr(node, "mode", b"nearest")
        return (mode.decode() if isinstance(mode, bytes) else mode) == "nearest"
    return node.op_type in MOVEMENT


def _scalar_constants(model: onnx.ModelProto) -> dict[str, int | float]:
    """The one-element initializers and Constant outputs (a Clip's bounds), by tensor name."""
    tensors = [(i.name, i) for i in model.graph.initializer]
    tensors += [(n.output[0], _attr(n, "value")) for n in model.graph.node if n.op_type == "Constant"
                and _attr(n, "value") is not None]
    values = {}
    for name, t in tensors:
        if isinstance(t, TensorProto) and math.prod(t.dims) == 1:
            values[name] = numpy_helper.to_array(t).reshape(-1)[0].item()
    return values


def _is_grid_clip(node: onnx.NodeProto, types: dict[str, int], scalars: dict) -> bool:
    """An integer Clip to the full range of a 4-bit grid: the second half of a quantization to it."""
    if node.op_type != "Clip" or len(node.input) != 3 or not all(t in scalars for t in node.input[1:]):
        return False
    return (scalars[node.input[1]], scalars[node.input[2]]) in GRID_CLIPS.get(types.get(node.input[0]), ())


def _is_integer_kernel(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INTEGER_KERNELS


def classify(model: onnx.ModelProto) -> OnnxCoverage:
    """Classify every node of ``model`` (see the module doc); the graph is read, never run."""
    g = model.graph
    types = _tensor_types(model)
    static = _static_tensors(model)
    scalars = _scalar_constants(model)
    producers = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    integer = total = movement = boundary = static_ops = 0
    float_nodes: list[tuple[str, str, str]] = []
    float_movement: list[tuple[str, str, str]] = []
    for node in g.node:
        op = node.op_type
        if all(t in static for t in node.input if t):
            static_ops += 1  # a Constant, a weight's transpose, an anchor grid: no activation flows through it
            continue
        if op in BOUNDARY or _is_grid_clip(node, types, scalars):
            boundary += 1
            continue
        if op in SHAPE_ONLY:
            movement += 1  # reads a tensor's shape, never its values
            continue
        name = node.name or node.output[0]
        if _is_integer_kernel(op):
            integer += 1
            total += 1
            continue
        float_in = list(dict.fromkeys(t for t in node.input if t and t not in static and types.get(t) in FLOAT_TYPES))
        float_out = [t for t in node.output if t and types.get(t) in FLOAT_TYPES]
        if _is_movement(node):
            if float_in or float_out:
                float_movement.append((name, op, _movement_reason(node, float_in, float_out, producers, g)))
            else:
                movement += 1
            continue
        if not float_in and not float_out:
            if any(types.get(t) in QUANT_INT_TYPES for t in [*node.input, *node.output] if t):
                integer += 1
                total += 1
            else:
                movement += 1  # shape and index arithmetic on int64 / bool
            continue
        total += 1
        float_nodes.append((name, op, _float_reason(node, float_in, float_out, producers, consumers, types, g)))
    return OnnxCoverage(integer, total, float_nodes, float_movement, movement, boundary, static_ops)


def _source(tensor: str, producers: dict[str, onnx.NodeProto], graph: onnx.GraphProto) -> str:
    p = producers.get(tensor)
    if p is None:
        if any(i.name == tensor for i in graph.input):
            return f"graph input '{tensor}'"
        return f"initializer '{tensor}'" if any(i.name == tensor for i in graph.initializer) else f"'{tensor}'"
    return f"{p.op_type} '{p.name or tensor}'"


def _sources(tensors: list[str], producers, graph) -> str:
    names = [_source(t, producers, graph) for t in tensors]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _movement_reason(node, float_in, float_out, producers, graph) -> str:
    if float_in:
        return f"{node.op_type} moves float data from {_sources(float_in, producers, graph)}"
    return f"{node.op_type} writes float output '{float_out[0]}'"


def _float_reason(node, float_in, float_out, producers, consumers, types, graph) -> str:
    """Where the float comes from, and why onnxruntime did not fuse an integer kernel in its place."""
    op = node.op_type
    if float_in:
        head = f"float input{'s' if len(float_in) > 1 else ''} from {_sources(float_in, producers, graph)}"
    else:
        head = f"integer inputs, float output '{float_out[0]}'"
    kernel = QDQ_KERNEL.get(op)
    if kernel is None:
        return f"{op}: {head}; onnxruntime has no integer kernel for {op}"
    float_args = [t for t in node.input if t and types.get(t) in FLOAT_TYPES]  # constants too: a fusion needs DQs
    not_dq = [t for t in float_args if producers.get(t) is None or producers[t].op_type != "DequantizeLinear"]
    dq_inputs = [producers[t] for t in node.input if t in producers and producers[t].op_type == "DequantizeLinear"]
    stored = sorted({onnx.helper.tensor_dtype_to_np_dtype(types[dq.input[0]]).name for dq in dq_inputs
                     if types.get(dq.input[0])})
    if not_dq:
        why = f"input from {_source(not_dq[0], producers, graph)} is not a DequantizeLinear"
    elif len(stored) > 1:
        why = f"its DequantizeLinear inputs mix {' and '.join(stored)}"
    else:
        readers = [c for o in node.output for c in consumers.get(o, [])]
        other = [c for c in readers if c.op_type != "QuantizeLinear"]
        if other:
            why = f"its output feeds {other[0].op_type} '{other[0].name}', not a QuantizeLinear"
        elif not readers:
            why = "its output is a float graph output"
        else:
            why = "the Q/DQ pattern around it did not match (scales, zero points or types)"
    return f"{op}: {head}; onnxruntime has {kernel} but did not fuse it: {why}"
