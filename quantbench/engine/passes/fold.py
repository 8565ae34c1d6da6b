"""Folding passes: constants computed at run time, fused attention, layer scale.

Each pass takes the ATen graph that :func:`quantbench.engine.capture` returns,
rewrites it in place and returns it, as the passes of
:mod:`quantbench.engine.passes.prequant` do; each is idempotent and ends with
:func:`~quantbench.engine.graph.finish_graph`.

* :func:`fold_shape_constants`: a value computed from shapes and constants only
  (a detector's anchor grid) becomes a buffer, so the annotator sees a constant.
* :func:`decompose_sdpa`: a fused ``scaled_dot_product_attention`` becomes the
  explicit ``mul, matmul, softmax, matmul`` that integer hardware runs.
* :func:`fold_layer_scale`: a per-channel ``x * gamma`` after a conv or linear
  (ConvNeXt, CaiT, DeiT III) folds into that op's weight and bias.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from quantbench.engine.graph import (
    constant_value,
    conv_groups,
    finish_graph,
    get_attr_tensor,
    op_name,
    set_attr_tensor,
)
from quantbench.engine.ops import ops_of_kind, ops_tagged

__all__ = ["decompose_sdpa", "fold_constants", "fold_layer_scale", "fold_shape_constants", "MAX_FOLD_NUMEL"]

aten = torch.ops.aten

MAX_FOLD_NUMEL = 1 << 22
"""A computed constant larger than this (elements) is left computed rather than stored in the model."""

# Ops that read only the dtype/device of an input (the positions listed), or also its shape (True).
_METADATA_ARGS: dict[str, tuple[tuple[int, ...], bool]] = {
    "type_as": ((1,), False),
    "new_full": ((0,), False),
    "new_zeros": ((0,), False),
    "new_ones": ((0,), False),
    "new_tensor": ((0,), False),
    "zeros_like": ((0,), True),
    "ones_like": ((0,), True),
    "full_like": ((0,), True),
}
# Shape queries: foldable when the captured value is a plain number (a static dimension).
_SHAPE_QUERIES = ops_tagged("shape_query")
# Ops whose values are undefined: never stored as constants.
_UNINITIALISED = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                            "empty_permuted"})


# -- fold_shape_constants ------------------------------------------------------------------------


def _is_pure(target: Any) -> bool:
    """Deterministic and free of side effects on its inputs (the only ops that may be evaluated once)."""
    if target in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.truediv, operator.neg):
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    return target._opname not in _UNINITIALISED


def _mutated_by_a_user(node: fx.Node) -> bool:
    """Whether an in-place op writes ``node``'s storage, directly or through a view of it."""
    for user in node.users:
        if not isinstance(user.target, torch._ops.OpOverload):
            continue
        schema = user.target._schema
        for arg, value in zip(schema.arguments, user.args):
            if value is node and arg.alias_info is not None and arg.alias_info.is_write:
                return True
        is_view = len(schema.returns) == 1 and schema.returns[0].alias_info is not None
        if is_view and _mutated_by_a_user(user):
            return True
    return False


def _static_val(node: fx.Node, need_shape: bool) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return not need_shape or all(isinstance(d, int) for d in val.shape)


def _foldable_nodes(gm: fx.GraphModule, parameters: bool = False) -> set[fx.Node]:
    """Every call_function node whose value depends on buffers, literals and static shapes only.

    Parameters count as inputs, not constants, unless ``parameters``: a value computed
    from a trainable weight (a reshaped layer scale, a weight standardisation) must stay
    live for QAT; after training (PTQ) it is as constant as a buffer.
    A tensor that an in-place op writes (a buffer updated in training) is not constant.
    """
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if _mutated_by_a_user(node):
            continue  # what its readers see depends on where they sit
        if node.op == "get_attr":
            if parameters or not isinstance(get_attr_tensor(gm, node.target), torch.nn.Parameter):
                constant.add(node)
            continue
        if node.op != "call_function" or not _is_pure(node.target):
            continue
        name = op_name(node)
        if name in _SHAPE_QUERIES:
            if isinstance(node.meta.get("val"), (int, float, bool)):
                constant.add(node)
            continue
        meta_positions, need_shape = _METADATA_ARGS.get(name, ((), False))
        meta_args = {a for i, a in enumerate(node.args) if i in meta_positions and isinstance(a, fx.Node)}
        if not all(_static_val(a, need_shape) for a in meta_args):
            continue
        value_args = [a for a in node.all_input_nodes if a not in meta_args]
        if all(a in constant for a in value_args):
            constant.add(node)
    return {n for n in constant if n.op == "call_function"}


def _metadata_stand_in(node: fx.Node) -> torch.Tensor:
    val = node.meta["val"]
    shape = val.shape if all(isinstance(d, int) for d in val.shape) else (0,)
    return torch.zeros(shape, dtype=val.dtype, device=val.device)


def _evaluate(gm: fx.GraphModule, node: fx.Node, memo: dict[fx.Node, Any]) -> Any:
    """The value of a foldable node, computed from its ancestors (each evaluated once)."""
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        value = get_attr_tensor(gm, node.target)
    elif op_name(node) in _SHAPE_QUERIES:
        value = node.meta["val"]
    else:
        meta_positions, _ = _METADATA_ARGS.get(op_name(node), ((), False))
        args = list(node.args)
        for i in meta_positions:
            if i < len(args) and isinstance(args[i], fx.Node):
                args[i] = _metadata_stand_in(args[i])
        lookup = lambda n: _evaluate(gm, n, memo)  # noqa: E731
        with torch.no_grad():
            value = node.target(*fx.node.map_arg(tuple(args), lookup), **fx.node.map_arg(node.kwargs, lookup))
    memo[node] = value
    return value


def _replace_with_literal(node: fx.Node, value: Any) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def fold_shape_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Evaluate once every value that depends on no input values, and store it as a buffer.

    A YOLOv8 / YOLO11 decode head builds its anchor grid and stride tensor in
    ``forward`` from feature-map shapes (``arange``, ``meshgrid``, ``stack``,
    ``type_as``, ``new_full``, ``cat``, ``mul`` by the stride). Torch.export
    bakes the static H and W into literals, so the whole grid is a function of
    literals: folded, it is a constant that the annotator quantizes like a
    weight, and nothing of it is left computing in float.

    Before: call_function nodes whose inputs are literals, buffers, static shapes
    or the dtype of a tensor (``type_as``, ``new_full``, ``zeros_like`` of a
    static shape). A value that reads the dynamic batch size (``sym_size`` of
    dim 0), an input's values or a parameter is not foldable, nor are random
    ops, in-place ops and uninitialised ``empty`` tensors.
    After: each foldable value used by the rest of the graph is a ``get_attr``
    of a new buffer (a number, such as an ``item()``, becomes a literal); the
    foldable nodes behind it are gone. Values over :data:`MAX_FOLD_NUMEL`
    elements stay computed. Buffers are taken as constants: a buffer that
    training updates (BatchNorm statistics) is read by ops that also read the
    input, so it is never folded into a value. Idempotent.
    """
    return _fold(gm, _foldable_nodes(gm))


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """:func:`fold_shape_constants` with parameters taken as constants too (PTQ: nothing trains).

    Also folds what a model computes from its weights in ``forward``: a relative position bias
    gathered from its table (Swin, LeViT attention biases), a standardized weight, a reshaped
    layer scale. Before / after as :func:`fold_shape_constants`; idempotent.
    """
    return _fold(gm, _foldable_nodes(gm, parameters=True))


def _fold(gm: fx.GraphModule, foldable: set[fx.Node]) -> fx.GraphModule:
    memo: dict[fx.Node, Any] = {}
    for node in [n for n in gm.graph.nodes if n in foldable]:
        if all(u in foldable for u in node.users):
            continue  # interior of a folded subgraph (or dead): removed with it
        value = _evaluate(gm, node, memo)
        if isinstance(value, (bool, int, float)):
            _replace_with_literal(node, value)
        elif isinstance(value, torch.Tensor) and value.numel() <= MAX_FOLD_NUMEL:
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(set_attr_tensor(gm, f"{node.name}_folded", value, param=False))
            const.meta["val"] = node.meta.get("val", value)
            node.replace_all_uses_with(const)
    return finish_graph(gm)


# -- decompose_sdpa ------------------------------------------------------------------------------

_SDPA_OPS = frozenset({
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
})


def _bound_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ATen call by schema name, defaults filled in."""
    out, position = {}, 0
    for arg in node.target._schema.arguments:
        if not arg.kwarg_only and position < len(node.args):
            out[arg.name] = node.args[position]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
        position += not arg.kwarg_only
    return out


def _output_users(node: fx.Node) -> list[fx.Node] | None:
    """Nodes that read the attention output: the node itself, or its ``getitem(_, 0)`` users."""
    if len(node.target._schema.returns) == 1:
        return [node]
    users = list(node.users)
    if all(u.target is operator.getitem and u.args[1] == 0 for u in users):
        return users
    return None  # logsumexp or another extra output is read


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """A call_function node with ``meta["val"]`` computed on the fake values of its inputs."""
    node = graph.call_function(target, args)
    if all(isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes):
        node.meta["val"] = target(*fx.node.map_arg(args, lambda n: n.meta["val"]))
    return node


def _sdpa_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float] | None:
    """(q, k, v, scale) of an attention call without mask, dropout, causality or GQA; None otherwise."""
    args = _bound_args(node)
    mask = args.get("attn_mask", args.get("attn_bias"))
    if mask is not None or args.get("dropout_mask") is not None:
        return None
    if args.get("dropout_p", 0.0) or args.get("is_causal", False) or args.get("enable_gqa", False):
        return None
    q, k, v = args["query"], args["key"], args["value"]
    scale = args.get("scale")
    if scale is None:
        val = q.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            return None
        scale = 1.0 / math.sqrt(val.shape[-1])
    return q, k, v, float(scale)


def decompose_sdpa(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite fused attention into ``softmax((q * scale) @ k^T) @ v``.

    ``F.scaled_dot_product_attention`` (timm's ``Attention`` with fused_attn,
    torch's ``MultiheadAttention``) captures as one
    ``aten.scaled_dot_product_attention`` node (or, after decompositions, a
    backend variant such as ``_scaled_dot_product_flash_attention_for_cpu``):
    an op that no integer target has. Spelt out, each step is an op the engine
    quantizes: a ``mul`` by a constant, two ``matmul`` and a ``softmax``.

    Before: attention nodes with no mask, ``dropout_p == 0``, ``is_causal``
    False and no grouped-query broadcast, whose extra outputs (logsumexp...) are
    unused. Any other attention node is left as is and the coverage report
    names it. After: none of those nodes remain. Idempotent.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_name(node) not in _SDPA_OPS:
            continue
        operands, readers = _sdpa_operands(node), _output_users(node)
        if operands is None or readers is None:
            continue
        q, k, v, scale = operands
        with gm.graph.inserting_before(node):
            q_scaled = _call(gm.graph, aten.mul.Tensor, q, scale)
            k_t = _call(gm.graph, aten.transpose.int, k, -2, -1)
            logits = _call(gm.graph, aten.matmul.default, q_scaled, k_t)
            attn = _call(gm.graph, aten.softmax.int, logits, -1)
            out = _call(gm.graph, aten.matmul.default, attn, v)
        for reader in readers:
            reader.replace_all_uses_with(out)
        for reader in readers:
            if reader is not node:
                gm.graph.erase_node(reader)
        gm.graph.erase_node(node)
    return finish_graph(gm)


# -- fold_layer_scale ----------------------------------------------------------------------------


def _permute_axis(node: fx.Node, axis: int, ndim: int) -> int:
    dims = [d % ndim for d in node.args[1]]
    return dims.index(axis)


def _transpose_axis(node: fx.Node, axis: int, ndim: int) -> int:
    a, b = node.args[1] % ndim, node.args[2] % ndim
    return b if axis == a else a if axis == b else axis


# Layout ops that may sit between the weighted op and the scale, and where they move the channel axis.
_AXIS_MOVES = {
    "permute": _permute_axis,
    "transpose": _transpose_axis,
    "contiguous": lambda node, axis, ndim: axis,
    "clone": lambda node, axis, ndim: axis,
}


def _ndim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _scaled_producer(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(weighted op, channel axis of ``node``) when ``node`` is a weighted op seen through layout ops.

    Every node of the chain has one user, so scaling the weighted op changes only what ``node`` feeds.
    """
    chain = [node]
    while op_name(chain[-1]) in _AXIS_MOVES and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    weighted = chain[-1]
    if op_name(weighted) not in ops_of_kind("weighted") or any(len(n.users) != 1 for n in chain):
        return None
    ndim = _ndim(weighted)
    if ndim is None or not all(_ndim(n) == ndim for n in chain):
        return None
    axis = 1 if op_name(weighted) in ops_tagged("conv") else ndim - 1
    for layout in reversed(chain[:-1]):
        axis = _AXIS_MOVES[op_name(layout)](layout, axis, ndim)
    return weighted, axis


def _channel_gamma(gm: fx.GraphModule, const: Any, axis: int, ndim: int, channels: int) -> torch.Tensor | None:
    """The per-channel factor of a constant operand that scales only along ``axis``, else None."""
    if isinstance(const, (int, float)) and not isinstance(const, bool):
        return torch.full((channels,), float(const))
    if not isinstance(const, fx.Node):
        return None
    value = constant_value(gm, const)
    if value is None or not value.is_floating_point() or value.dim() > ndim:
        return None
    shape = [1] * (ndim - value.dim()) + list(value.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return value.detach().float().reshape(-1).expand(channels)


def _scale_out_channels(weight: torch.Tensor, gamma: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    if not transposed:
        return weight * gamma.reshape(-1, *([1] * (weight.dim() - 1)))
    w = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    w = w * gamma.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
    return w.reshape(weight.shape)


def _fold_into(gm: fx.GraphModule, weighted: fx.Node, gamma: torch.Tensor) -> bool:
    w_node = weighted.args[1]
    b_node = weighted.args[2] if len(weighted.args) > 2 else weighted.kwargs.get("bias")
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
        return False
    if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
        return False
    transposed = op_name(weighted).startswith("conv_transpose")
    groups = conv_groups(weighted) if op_name(weighted) in ops_tagged("conv") else 1
    weight = get_attr_tensor(gm, w_node.target).detach().float()
    args = list(weighted.args)
    with gm.graph.inserting_before(weighted):
        new_w = _scale_out_channels(weight, gamma, transposed, groups)
        args[1] = gm.graph.get_attr(set_attr_tensor(gm, f"{w_node.target}_lsfold", new_w, param=True))
        args[1].meta["val"] = w_node.meta.get("val")
        if b_node is not None:
            new_b = get_attr_tensor(gm, b_node.target).detach().float() * gamma
            bias = gm.graph.get_attr(set_attr_tensor(gm, f"{b_node.target}_lsfold", new_b, param=True))
            bias.meta["val"] = b_node.meta.get("val")
            if len(args) > 2:
                args[2] = bias
            else:
                weighted.kwargs = {**weighted.kwargs, "bias": bias}
    weighted.args = tuple(args)
    return True


def fold_layer_scale(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold a per-channel ``x * gamma`` into the conv or linear that computes ``x``.

    Layer scale (ConvNeXt's ``x.mul(gamma.reshape(1, -1, 1, 1))`` after a
    ``permute`` back to NCHW or after a 1x1 conv, timm's ``LayerScale`` after
    a linear in ViT / DeiT III / CaiT) multiplies each output channel by a
    constant: the same as scaling that channel's weights and bias, which costs
    nothing at run time and leaves one quantizer fewer. PTQ only: in QAT gamma
    is trained, so the mul stays.

    Before: ``mul(y, c)`` where ``y`` is a weighted op (conv, conv_transpose,
    linear) with constant weight and bias, possibly seen through single-user
    ``permute`` / ``transpose`` / ``contiguous`` / ``clone``, each node of the
    chain with a single user, and ``c`` a number or a constant that varies
    along the channel axis of ``y`` only. After: the weighted op reads
    ``w * gamma`` (per output channel) and ``b * gamma``; the mul is gone. A mul
    with no such producer is left for the annotator (a binary op with a
    constant). Idempotent.
    """
    for mul in list(gm.graph.nodes):
        if mul.op != "call_function" or op_name(mul) != "mul" or len(mul.args) != 2:
            continue
        for x, const in (mul.args, mul.args[::-1]):
            found = _scaled_producer(x) if isinstance(x, fx.Node) else None
            if found is None:
                continue
            weighted, axis = found
            x_val, mul_val = x.meta.get("val"), mul.meta.get("val")
            if not (isinstance(x_val, torch.Tensor) and isinstance(mul_val, torch.Tensor)
                    and mul_val.shape == x_val.shape):
                continue  # unknown shapes, or the constant broadcasts the output to a larger shape
            channels = x_val.shape[axis]
            gamma = _channel_gamma(gm, const, axis, x_val.dim(), channels) if isinstance(channels, int) else None
            if gamma is not None and _fold_into(gm, weighted, gamma):
                mul.replace_all_uses_with(x)
                gm.graph.erase_node(mul)
                break
    return finish_graph(gm)
