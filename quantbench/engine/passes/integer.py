"""Integer kernels in a frozen graph: conv/linear computed as onnxruntime does.

Why: with float (not power-of-two) scales, a float convolution of
dequantized tensors is not bit-exact between two libraries (summation order),
and a flipped rounding in one layer grows through the network. onnxruntime
runs ``DQ -> Conv -> Q`` as one integer kernel (QLinearConv / QGemm): an exact
int32 accumulation, plus the int32 bias, times ``M = f32(f32(s_x * s_w) / s_y)``,
rounded half to even. :func:`fuse_integer_kernels` makes the frozen torch
graph compute exactly that, so the two agree to the bit.

An activation between the op and its output quantizer (``conv -> relu -> Q``)
is applied on the integer grid after requantizing to the activation's output
scale: ``Q(relu(v)) == max(Q(v), Q(0))`` because rounding is monotone, so this
is exact. At export (:func:`expand_integer_kernels`) the node becomes
``DQ -> Conv -> Q -> DQ -> Relu -> Q``; onnxruntime fuses the first part into
an integer kernel whatever the zero point (a Relu right after a Conv blocks
that fusion unless the zero point is the type's minimum).
"""

from __future__ import annotations

import torch
from torch import fx

from quantbench.engine.passes.prequant import op_name
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES

__all__ = ["qlinear", "fuse_integer_kernels", "expand_integer_kernels", "INTEGER_OPS", "GRID_ACTIVATIONS"]

INTEGER_OPS = {"conv1d", "conv2d", "conv3d", "linear"}
GRID_ACTIVATIONS = {"relu", "hardtanh", "relu6"}


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=like.device)


def _per_channel(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if v.dim() == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def qlinear(op, op_args: tuple, act, act_args: tuple, qx: torch.Tensor, x_qp: tuple, qw: torch.Tensor,
            w_qp: tuple, qb: torch.Tensor | None, b_qp: tuple | None, y_qp: tuple) -> torch.Tensor:
    """An integer conv/linear: int inputs, int weights, int32 bias -> int output grid.

    ``*_qp`` are ``(scale, zero_point, axis, qmin, qmax, dtype, round_method)``.
    The bias is int32 in units of ``s_x * s_w`` (``b_qp`` is kept for export).
    The accumulation runs in float64 on integer values, which is exact for any
    realistic layer (|sum| < 2^53), like onnxruntime's int32 accumulator.
    """
    x_s, x_z = x_qp[0], x_qp[1]
    w_s, w_z, w_axis = w_qp[0], w_qp[1], w_qp[2]
    y_s, y_z, _, y_min, y_max, y_dtype, _ = y_qp
    xi = qx.to(torch.float64) - float(x_z)
    w_z_t = _per_channel(torch.as_tensor(w_z, dtype=torch.float64, device=qw.device), qw.dim(), w_axis or 0)
    wi = qw.to(torch.float64) - w_z_t
    acc = op(xi, wi, None, *op_args)
    channel_axis = acc.dim() - 1 if op_name_of(op) == "linear" else 1
    if qb is not None:
        acc = acc + _per_channel(qb.to(torch.float64), acc.dim(), channel_axis)
    multiplier = (_as_tensor(x_s, qx) * _as_tensor(w_s, qx)) / _as_tensor(y_s, qx)  # float32, as ORT
    v = acc.to(torch.float32) * _per_channel(multiplier, acc.dim(), channel_axis)
    q = torch.clamp(torch.round(v), y_min - int(y_z), y_max - int(y_z)) + int(y_z)
    if act is not None:
        lo, hi = _act_bounds(act, act_args)
        q_lo = -torch.inf if lo is None else torch.round(torch.tensor(lo, dtype=torch.float32) / y_s) + int(y_z)
        q_hi = torch.inf if hi is None else torch.round(torch.tensor(hi, dtype=torch.float32) / y_s) + int(y_z)
        q = torch.clamp(q, q_lo, q_hi)
    return q.to(DTYPES[y_dtype].storage)


def op_name_of(target) -> str:
    return getattr(target, "_opname", getattr(target, "__name__", str(target)))


def _act_bounds(act, args: tuple) -> tuple[float | None, float | None]:
    name = op_name_of(act)
    if name == "relu":
        return 0.0, None
    if name == "relu6":
        return 0.0, 6.0
    lo = args[0] if len(args) > 0 else -1.0
    hi = args[1] if len(args) > 1 else 1.0
    return float(lo), float(hi)


def _is(node, fn) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is fn


def _match(node: fx.Node):
    if node.op != "call_function" or op_name(node) not in INTEGER_OPS:
        return None
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    dqx, dqw, dqb = args[0], args[1], args[2]
    if not (_is(dqx, dequantize) and _is(dqw, dequantize) and dqx.args[3] is None):
        return None
    if dqb is not None and not (_is(dqb, dequantize) and dqb.args[6] == "int32"):
        return None
    if dqw.args[0].op != "get_attr" or (dqb is not None and dqb.args[0].op != "get_attr"):
        return None
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    act = None
    if user.op == "call_function" and op_name(user) in GRID_ACTIVATIONS and len(user.users) == 1:
        act, user = user, next(iter(user.users))
    if not _is(user, quantize) or user.args[3] is not None:
        return None
    return dqx, dqw, dqb, act, user


def fuse_integer_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``DQ -> conv/linear [-> relu] -> Q`` by one :func:`qlinear` node (in place).

    Before: a baked graph from :func:`~quantbench.engine.passes.freeze.bake_quantizers`.
    After: each matched pattern is one node producing the integer output.
    Idempotent: a second run finds no pattern.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        m = _match(node)
        if m is None:
            continue
        dqx, dqw, dqb, act, qy = m
        op_args = tuple(node.args[3:])
        act_target = act.target if act is not None else None
        act_args = tuple(act.args[1:]) if act is not None else ()
        with graph.inserting_before(qy):
            fused = graph.call_function(qlinear, (
                node.target, op_args, act_target, act_args,
                dqx.args[0], tuple(dqx.args[1:]),
                dqw.args[0], tuple(dqw.args[1:]),
                dqb.args[0] if dqb is not None else None,
                tuple(dqb.args[1:]) if dqb is not None else None, tuple(qy.args[1:])))
        fused.meta["val"] = qy.meta.get("val")
        qy.replace_all_uses_with(fused)
        for dead in (qy, act, node):
            if dead is not None and not dead.users:
                graph.erase_node(dead)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def expand_integer_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Inverse of :func:`fuse_integer_kernels`, for export: back to Q/DQ around float ops."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is(node, qlinear):
            continue
        op, op_args, act, act_args, qx, x_qp, qw, w_qp, qb, b_qp, y_qp = node.args
        with graph.inserting_before(node):
            x = graph.call_function(dequantize, (qx, *x_qp))
            w = graph.call_function(dequantize, (qw, *w_qp))
            b = graph.call_function(dequantize, (qb, *b_qp)) if qb is not None else None
            y = graph.call_function(op, (x, w, b, *op_args))
            out = graph.call_function(quantize, (y, *y_qp))
            if act is not None:
                a = graph.call_function(act, (graph.call_function(dequantize, (out, *y_qp)), *act_args))
                out = graph.call_function(quantize, (a, *y_qp))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
