"""The op vocabulary: every ATen op the engine knows, its kind and its tags, in one registry.

Ops are keyed by their short ATen name (``aten.conv2d.default`` ->
``"conv2d"``, :func:`~quantbench.engine.graph.op_name`). The *kind* says how
the annotator quantizes an op (one ``_annotate_<kind>`` method each); an op
without a kind is left in float and the coverage report says so. A *tag*
names a family that some pass treats alike across kinds. Every op set of the
engine is derived from here (:func:`ops_of_kind`, :func:`ops_tagged`), so an
op is declared once::

    kind               ops
    weighted           conv*, conv_transpose*, linear (weight and bias quantizers)
    matmul             matmul, mm, bmm
    binary             add, sub, mul, div
    cat                cat, concat (inputs and output share one scale)
    activation         relu, sigmoid, silu, gelu, softmax, ...
    pool               average pools, mean, sum, bilinear upsampling (requantized output)
    norm               layer_norm, group_norm, batch_norm
    shared             max pools, nearest upsampling, padding, shuffles (output in the input's group)
    passthrough        reshapes, permutes, slices, ... (output in the input's group, no quantizer)
    tuple_passthrough  split, chunk, unbind (their getitem users carry the groups)
    shape              sym_size and shape assertions (no tensor values)
    dropout            dropout variants (QAT only: PTQ removes them; identity at inference)
    qat_bn             the simulated BN-folding ops of :mod:`quantbench.engine.passes.qat_bn`

    tag                ops
    conv               convolutions, plain and transposed: a following BatchNorm folds into them
    integer_kernel     conv1d/2d/3d, linear: one integer kernel (onnxruntime QLinearConv / QGemm,
                       :func:`~quantbench.engine.passes.integer.fuse_integer_kernels`), and the
                       ops a pow2 NPU checks with shift_cut / shift_bias
    relu_like          relu, relu6, hardtanh: fused into the op before them, a clamp on the grid
    avg_pool           avg_pool2d, adaptive_avg_pool2d, mean: a pow2 NPU computes them as
                       sum * multiplier / 2^shift
    sigmoid_like       sigmoid, hardsigmoid: a pow2 NPU computes its hardsigmoid
    swish_like         silu, hardswish: a pow2 NPU computes x * hardsigmoid(x)
    softmax            softmax, _softmax: an integer softmax once frozen (passes/nonlinear.qsoftmax)
    not_elementwise    softmax, log_softmax, prelu: activations that are no function of one value (no table)
    ort_qlinear        avg_pool2d, adaptive_avg_pool2d: onnxruntime fuses DQ -> op -> Q into its own integer
                       kernel (QLinearAveragePool / QLinearGlobalAveragePool); a global one is the engine's
                       integer mean once frozen
    qlinear_binary     add, mul: onnxruntime's QLinearAdd / QLinearMul (passes/integer.qadd, qmul)
    integer_mean       mean, adaptive_avg_pool2d: a global one is an integer mean once frozen
                       (passes/nonlinear.qmean_lut, or qmean past its table bound)
    integer_movement   pad, roll, flip, pixel / channel shuffles, repeat: value-preserving ops that torch also
                       runs on integer tensors (the export moves integers through them, not floats)
    pad                constant_pad_nd, pad: a constant pad's value moves to the integer grid with the data
    shape_query        sym_size, sym_numel, ...: a dimension (a plain number when the shape is static)
    stat_norm          layer_norm, group_norm: normalized by the tensor's own statistics (passes/nonlinear.qnorm)

The registry is a :class:`quantbench.registry.Registry`: a name registered
twice raises, and :func:`ops_of_kind` / :func:`ops_tagged` of an unknown kind
or tag raise :class:`~quantbench.registry.UnknownNameError`.
"""

from __future__ import annotations

import operator
from typing import Iterable

from torch import fx

from quantbench.engine.graph import op_name
from quantbench.registry import Registry, UnknownNameError, suggest

__all__ = [
    "HELPER_KINDS",
    "OP_KINDS",
    "OP_TYPES",
    "kind_of",
    "op_kind",
    "op_tags",
    "ops_of_kind",
    "ops_tagged",
    "register_op_kind",
]

OP_KINDS: Registry[str] = Registry(
    "op", hint="(register it with quantbench.engine.ops.register_op_kind)")
"""Short ATen op name -> kind; the tags of each op are its registry meta (``OP_KINDS.meta(name)["tags"]``)."""

_BY_KIND: dict[str, frozenset[str]] = {}
_BY_TAG: dict[str, frozenset[str]] = {}


def register_op_kind(kind: str, *names: str, tags: Iterable[str] = ()) -> None:
    """Register op names under a kind, each with the given tags.

    Raises:
        DuplicateNameError: a name is already registered.
    """
    tags = frozenset(tags)
    for name in names:
        OP_KINDS.add(name, kind, tags=tags)
        _BY_KIND[kind] = _BY_KIND.get(kind, frozenset()) | {name}
        for tag in tags:
            _BY_TAG[tag] = _BY_TAG.get(tag, frozenset()) | {name}


def _lookup(table: dict[str, frozenset[str]], key: str, what: str) -> frozenset[str]:
    if key not in table:
        raise UnknownNameError(suggest(str(key), sorted(table), what))
    return table[key]


def ops_of_kind(kind: str) -> frozenset[str]:
    """The op names registered under ``kind``."""
    return _lookup(_BY_KIND, kind, "op kind")


def ops_tagged(tag: str) -> frozenset[str]:
    """The op names that carry ``tag``."""
    return _lookup(_BY_TAG, tag, "op tag")


def kind_of(name: str) -> str | None:
    """The kind of a short op name, or None if the engine does not know it."""
    return OP_KINDS.get(name) if name in OP_KINDS else None


def op_tags(name: str) -> frozenset[str]:
    """The tags of a registered op name."""
    return OP_KINDS.meta(name)["tags"]


def op_kind(node: fx.Node) -> str | None:
    """The registered kind of a call_function node, or None if unsupported.

    Python's own ``operator.mul`` / ``add`` / ``floordiv`` ... are symbolic shape arithmetic in a
    captured graph (a dynamic batch size times a channel count): kind ``shape``, whatever their name.
    """
    if node.op != "call_function":
        return None
    if getattr(node.target, "__module__", None) == "_operator" and node.target is not operator.getitem:
        return "shape"
    return kind_of(op_name(node))


register_op_kind("weighted", "conv1d", "conv2d", "conv3d", tags=("conv", "integer_kernel"))
register_op_kind("weighted", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", tags=("conv",))
register_op_kind("weighted", "linear", tags=("integer_kernel",))
register_op_kind("matmul", "matmul", "mm", "bmm")
register_op_kind("binary", "add", "mul", tags=("qlinear_binary",))
register_op_kind("binary", "sub", "div")
register_op_kind("cat", "cat", "concat")
register_op_kind("activation", "relu", "hardtanh", "relu6", tags=("relu_like",))
register_op_kind("activation", "sigmoid", "hardsigmoid", tags=("sigmoid_like",))
register_op_kind("activation", "silu", "hardswish", tags=("swish_like",))
register_op_kind("activation", "clamp", "gelu", "leaky_relu", "tanh", "elu", "mish")
register_op_kind("activation", "softmax", "_softmax", tags=("softmax", "not_elementwise"))
register_op_kind("activation", "log_softmax", "prelu", tags=("not_elementwise",))
# Elementwise functions of one tensor: a table once frozen (passes/nonlinear.qlut).
register_op_kind("activation", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "reciprocal", "softplus", "pow",
                 "hardshrink", "selu", "celu", "logit")
register_op_kind("pool", "avg_pool2d", tags=("avg_pool", "ort_qlinear"))
register_op_kind("pool", "adaptive_avg_pool2d", tags=("avg_pool", "ort_qlinear", "integer_mean"))
register_op_kind("pool", "mean", tags=("avg_pool", "integer_mean"))
register_op_kind("pool", "avg_pool1d", "avg_pool3d", "adaptive_avg_pool1d", "sum", "upsample_bilinear2d",
                 "upsample_bicubic2d", "_upsample_bilinear2d_aa", "upsample_linear1d")
register_op_kind("norm", "layer_norm", "group_norm", tags=("stat_norm",))
register_op_kind("norm", "batch_norm")
# Value-preserving: output values are a subset / rearrangement of input values.
register_op_kind("shared", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d",
                 "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d")
register_op_kind("shared", "constant_pad_nd", "pad", tags=("integer_movement", "pad"))
register_op_kind("shared", "roll", "flip", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "repeat", "tile",
                 tags=("integer_movement",))
register_op_kind("passthrough", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute",
                 "transpose", "t", "squeeze", "unsqueeze", "slice", "select", "narrow", "contiguous",
                 "clone", "expand", "alias", "detach", "getitem", "identity", "reshape_as", "view_as",
                 "expand_as", "movedim", "swapaxes", "swapdims")
# Shape arithmetic (a dynamic batch size): no tensor values, nothing to quantize.
register_op_kind("shape", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", tags=("shape_query",))
register_op_kind("shape", "_assert_scalar", "_assert_tensor_metadata")
register_op_kind("tuple_passthrough", "split", "split_with_sizes", "chunk", "unbind", "tensor_split")
# QAT only (PTQ removes dropout and folds BN before annotation).
register_op_kind("dropout", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
# The call_function targets of passes.qat_bn, by their function names.
register_op_kind("qat_bn", "bn_fold_weight", "bn_fold_bias", "bn_qat_output")

OP_TYPES = tuple(OP_KINDS.list())
"""Every registered op name, sorted: the keys ``Config.op_type_quant_config`` understands."""
HELPER_KINDS = ("passthrough", "tuple_passthrough", "dropout", "qat_bn", "shape")
"""Kinds that compute nothing on the integer grid of their own (coverage does not count them)."""
