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

import math

import torch
from torch import fx

from quantbench.engine.graph import get_attr_tensor, op_name, target_name
from quantbench.engine.ops import ops_of_kind, ops_tagged
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES

__all__ = ["qlinear", "qadd", "qmul", "qmatmul", "fuse_integer_kernels", "expand_integer_kernels", "int_clamp",
           "INTEGER_KERNELS"]


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
    channel_axis = acc.dim() - 1 if target_name(op) == "linear" else 1
    if qb is not None:
        bias = qb.to(torch.float64)
        if b_qp is not None and b_qp[5] != "int32":  # an own pow2 bias scale: shift it onto the accumulator grid
            w_s64 = torch.as_tensor(w_s, dtype=torch.float64, device=qb.device)
            bias = bias * (torch.as_tensor(b_qp[0], dtype=torch.float64, device=qb.device) / (float(x_s) * w_s64))
        acc = acc + _per_channel(bias, acc.dim(), channel_axis)
    multiplier = (_as_tensor(x_s, qx) * _as_tensor(w_s, qx)) / _as_tensor(y_s, qx)  # float32, as ORT
    v = acc.to(torch.float32) * _per_channel(multiplier, acc.dim(), channel_axis)
    q = torch.clamp(torch.round(v), y_min - int(y_z), y_max - int(y_z)) + int(y_z)
    if act is not None:
        q = torch.clamp(q, *grid_bounds(act, act_args, y_qp))
    return q.to(DTYPES[y_dtype].storage)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add: one rounding (float64 holds the exact product of two float32)."""
    return (a.double() * b.double() + c.double()).float()


def _export_zero_point(qp: tuple) -> tuple[int, int]:
    """(zero point, offset) in the domain onnxruntime computes in: int8 (and int4) activations are
    exported as uint8 with zero point + 128 (see export.py), so the kernel sees shifted values."""
    zp, dtype = int(qp[1]), qp[5]
    return (zp + 128, 128) if DTYPES[dtype].storage_name == "int8" else (zp, 0)


def qadd(qa: torch.Tensor, a_qp: tuple, qb: torch.Tensor, b_qp: tuple, c_qp: tuple) -> torch.Tensor:
    """Integer add of two quantized tensors, as onnxruntime's x86 QLinearAdd computes it.

    onnxruntime (MLAS, AVX2) evaluates ``c = fma(a, Ra, fma(b, Rb, F))`` in float32 with
    ``Ra = f32(sa / sc)``, ``Rb = f32(sb / sc)``, ``F = zc - fma(Ra, za, Rb * zb)``, rounds
    half to even and saturates. Verified bit for bit against onnxruntime on every (a, b)
    pair for random scales (tests/test_integer_kernels.py).
    """
    za, off_a = _export_zero_point(a_qp)
    zb, off_b = _export_zero_point(b_qp)
    zc, off_c = _export_zero_point(c_qp)
    one = torch.tensor(1.0, dtype=torch.float32, device=qa.device)
    ra = (torch.tensor(float(a_qp[0]), dtype=torch.float32) / torch.tensor(float(c_qp[0]), dtype=torch.float32)).to(qa.device)
    rb = (torch.tensor(float(b_qp[0]), dtype=torch.float32) / torch.tensor(float(c_qp[0]), dtype=torch.float32)).to(qa.device)
    inner = _fma32(ra, one * za, rb * zb)
    fixed = (one * zc) - inner
    a = qa.to(torch.float32) + off_a
    b = qb.to(torch.float32) + off_b
    c = _fma32(a, ra, _fma32(b, rb, fixed))
    lo, hi = int(c_qp[3]) + off_c, int(c_qp[4]) + off_c
    q = torch.clamp(torch.round(c), lo, hi) - off_c
    return q.to(DTYPES[c_qp[5]].storage)


def qmul(qa: torch.Tensor, a_qp: tuple, qb: torch.Tensor, b_qp: tuple, c_qp: tuple) -> torch.Tensor:
    """Integer multiply of two quantized tensors, as onnxruntime's x86 QLinearMul computes it.

    MLAS (SSE2) multiplies ``(a - za) * (b - zb)`` exactly in int32, converts it to float32,
    multiplies by ``R = f32(f32(sa * sb) / sc)``, adds ``zc`` (two separately rounded float32
    operations, no FMA), rounds half to even and saturates. Verified on every (a, b) pair for
    random scales (tests/test_integer_kernels.py).
    """
    za, off_a = _export_zero_point(a_qp)
    zb, off_b = _export_zero_point(b_qp)
    zc, off_c = _export_zero_point(c_qp)
    a = qa.to(torch.int32) + (off_a - za)
    b = qb.to(torch.int32) + (off_b - zb)
    f32 = torch.float32
    ratio = (torch.tensor(float(a_qp[0]), dtype=f32) * torch.tensor(float(b_qp[0]), dtype=f32)
             / torch.tensor(float(c_qp[0]), dtype=f32)).to(qa.device)
    v = (a * b).to(f32) * ratio + torch.tensor(float(zc), dtype=f32, device=qa.device)
    lo, hi = int(c_qp[3]) + off_c, int(c_qp[4]) + off_c
    q = torch.clamp(torch.round(v), lo, hi) - off_c
    return q.to(DTYPES[c_qp[5]].storage)


def qmatmul(qa: torch.Tensor, a_qp: tuple, qb: torch.Tensor, b_qp: tuple, y_qp: tuple) -> torch.Tensor:
    """Integer matmul of two per-tensor quantized tensors, as onnxruntime's QLinearMatMul.

    An exact integer accumulation of ``(a - za) @ (b - zb)`` (float64 holds it exactly), then
    the requantization of QLinearConv / QGemm: ``acc * f32(f32(sa * sb) / sy)`` in float32,
    rounded half to even, plus ``zy``, saturated.
    """
    a = qa.to(torch.float64) - float(a_qp[1])
    b = qb.to(torch.float64) - float(b_qp[1])
    acc = torch.matmul(a, b)
    f32 = torch.float32
    multiplier = (torch.tensor(float(a_qp[0]), dtype=f32) * torch.tensor(float(b_qp[0]), dtype=f32)
                  / torch.tensor(float(y_qp[0]), dtype=f32)).to(qa.device)
    v = acc.to(f32) * multiplier
    y_z = int(y_qp[1])
    q = torch.clamp(torch.round(v), int(y_qp[3]) - y_z, int(y_qp[4]) - y_z) + y_z
    return q.to(DTYPES[y_qp[5]].storage)


def int_clamp(q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Clamp on the integer grid (an activation applied to quantized values)."""
    return torch.clamp(q, lo, hi)


def grid_bounds(act, act_args: tuple, qp: tuple) -> tuple[int, int]:
    """Integer bounds of a clamping activation on a grid: ``Q(clamp(v)) == clamp(Q(v), lo, hi)``
    because rounding is monotone."""
    scale, zp, qmin, qmax = float(qp[0]), int(qp[1]), int(qp[3]), int(qp[4])
    lo, hi = _act_bounds(act, act_args)
    s = torch.tensor(scale, dtype=torch.float32)
    q_lo = qmin if lo is None else int(torch.round(torch.tensor(lo, dtype=torch.float32) / s)) + zp
    q_hi = qmax if hi is None else int(torch.round(torch.tensor(hi, dtype=torch.float32) / s)) + zp
    return max(q_lo, qmin), min(q_hi, qmax)


def _act_bounds(act, args: tuple) -> tuple[float | None, float | None]:
    name = target_name(act)
    if name == "relu":
        return 0.0, None
    if name == "relu6":
        return 0.0, 6.0
    lo = args[0] if len(args) > 0 else -1.0
    hi = args[1] if len(args) > 1 else 1.0
    return float(lo), float(hi)


def _is(node, fn) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is fn


def _is_pow2(v) -> bool:
    return isinstance(v, float) and v > 0 and math.frexp(v)[0] == 0.5


def _pow2_bias(dqx: fx.Node, dqb: fx.Node) -> bool:
    """A per-tensor bias with its own power-of-two scale (NPU int8 bias): a shift from the accumulator."""
    return dqb.args[3] is None and _is_pow2(dqb.args[1]) and _is_pow2(dqx.args[1])


def _match(node: fx.Node):
    if node.op != "call_function" or op_name(node) not in ops_tagged("integer_kernel"):
        return None
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    dqx, dqw, dqb = args[0], args[1], args[2]
    if not (_is(dqx, dequantize) and _is(dqw, dequantize) and dqx.args[3] is None):
        return None
    if dqb is not None and not (_is(dqb, dequantize) and (dqb.args[6] == "int32" or _pow2_bias(dqx, dqb))):
        return None
    if dqw.args[0].op != "get_attr" or (dqb is not None and dqb.args[0].op != "get_attr"):
        return None
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    act = None
    if user.op == "call_function" and op_name(user) in ops_tagged("relu_like") and len(user.users) == 1:
        act, user = user, next(iter(user.users))
    if not _is(user, quantize) or user.args[3] is not None:
        return None
    return dqx, dqw, dqb, act, user


def _is_act_dq(node) -> bool:
    return (_is(node, dequantize) and node.args[3] is None
            and not (isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"))


def _is_const_dq(gm: fx.GraphModule, node) -> bool:
    """A per-tensor dequantized constant tensor of more than one element (a scalar is a table)."""
    return (_is(node, dequantize) and node.args[3] is None and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "get_attr" and not isinstance(node.args[1], fx.Node)
            and get_attr_tensor(gm, node.args[0].target).numel() > 1)


_BYTE_STORED = ("int8", "uint8")


def _stored_like(const_dq: fx.Node, act_dq: fx.Node) -> bool:
    """A constant of another 8-bit grid than the activation it meets (an int4 / int8 position
    embedding added to uint4 / uint8 activations): the export stores such a constant, read only by
    adds and muls, like the activation (int8 as uint8 + 128), so onnxruntime's QLinearAdd /
    QLinearMul see one type, which is what :func:`qadd` / :func:`qmul` compute in."""
    return (DTYPES[const_dq.args[6]].storage_name in _BYTE_STORED
            and DTYPES[act_dq.args[6]].storage_name in _BYTE_STORED
            and all(u.op == "call_function" and op_name(u) in ops_tagged("qlinear_binary") for u in const_dq.users))


def _binary_operands(gm: fx.GraphModule, node: fx.Node) -> bool:
    dqa, dqb = node.args
    acts = [_is_act_dq(dqa), _is_act_dq(dqb)]
    consts = [_is_const_dq(gm, dqa), _is_const_dq(gm, dqb)]
    if not (all(a or c for a, c in zip(acts, consts)) and any(acts)):
        return False
    if dqa.args[6] == dqb.args[6]:
        return True
    return op_name(node) in ops_tagged("qlinear_binary") and not all(acts) and (
        _stored_like(dqb, dqa) if acts[0] else _stored_like(dqa, dqb))


def _activation_operand(node: fx.Node) -> fx.Node:
    dqa, dqb = node.args
    return dqa if _is_act_dq(dqa) else dqb


def _match_add(gm: fx.GraphModule, node: fx.Node):
    if node.op != "call_function" or op_name(node) != "add" or len(node.args) != 2 or node.kwargs:
        return None
    dqa, dqb = node.args
    if not _binary_operands(gm, node) or len(node.users) != 1:
        return None
    qc = next(iter(node.users))
    relu = None
    if qc.op == "call_function" and op_name(qc) == "relu" and len(qc.users) == 1:
        # Q(relu(v)) == max(Q(v), zp) (rounding is monotone): with the output zero point at the
        # grid minimum that is the saturation itself (onnxruntime drops the relu and fuses the add);
        # otherwise an integer clamp after the add, which onnxruntime runs on integers too.
        relu, qc = qc, next(iter(qc.users))
    if not _is(qc, quantize) or qc.args[3] is not None or qc.args[6] != _activation_operand(node).args[6]:
        return None
    return dqa, dqb, relu, qc


def _match_two_operand(gm: fx.GraphModule, node: fx.Node, names: tuple[str, ...]):
    """``DQ(a), DQ(b) -> mul / matmul -> Q``, all per-tensor: (dqa, dqb, q)."""
    if node.op != "call_function" or op_name(node) not in names or len(node.args) != 2 or node.kwargs:
        return None
    if not _binary_operands(gm, node) or len(node.users) != 1:
        return None
    q = next(iter(node.users))
    if not _is(q, quantize) or q.args[3] is not None or isinstance(q.args[1], fx.Node):
        return None
    return node.args[0], node.args[1], q


def _fuse_two_operand(gm: fx.GraphModule, names: tuple[str, ...], kernel) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        m = _match_two_operand(gm, node, names)
        if m is None:
            continue
        dqa, dqb, q = m
        with graph.inserting_before(q):
            fused = graph.call_function(kernel, (dqa.args[0], tuple(dqa.args[1:]), dqb.args[0],
                                                 tuple(dqb.args[1:]), tuple(q.args[1:])))
        fused.meta["val"] = q.meta.get("val")
        q.replace_all_uses_with(fused)
        graph.erase_node(q)
        graph.erase_node(node)


def _fuse_adds(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        m = _match_add(gm, node)
        if m is None:
            continue
        dqa, dqb, relu, qc = m
        with graph.inserting_before(qc):
            fused = graph.call_function(qadd, (dqa.args[0], tuple(dqa.args[1:]), dqb.args[0],
                                               tuple(dqb.args[1:]), tuple(qc.args[1:])))
        fused.meta["val"] = qc.meta.get("val")
        if relu is not None and int(qc.args[2]) != int(qc.args[4]):
            with graph.inserting_before(qc):
                fused = graph.call_function(int_clamp, (fused, int(qc.args[2]), int(qc.args[5])))
            fused.meta["val"] = qc.meta.get("val")
        qc.replace_all_uses_with(fused)
        for dead in (qc, relu, node):
            if dead is not None:
                graph.erase_node(dead)


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
        fused.meta["qb_input_val"] = dqx.meta.get("val")
        qy.replace_all_uses_with(fused)
        for dead in (qy, act, node):
            if dead is not None and not dead.users:
                graph.erase_node(dead)
    _fuse_adds(gm)
    _fuse_two_operand(gm, ("mul",), qmul)
    _fuse_two_operand(gm, tuple(ops_of_kind("matmul")), qmatmul)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


_TWO_OPERAND = {qadd: torch.ops.aten.add.Tensor, qmul: torch.ops.aten.mul.Tensor, qmatmul: torch.ops.aten.matmul.default}
INTEGER_KERNELS = (qlinear, qadd, qmul, qmatmul)


def qw_features(gm: fx.GraphModule, qw: fx.Node) -> int:
    """The output features of a linear's integer weight (a get_attr, ``[out, in]``)."""
    return int(get_attr_tensor(gm, qw.target).shape[0])


def expand_integer_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Inverse of :func:`fuse_integer_kernels`, for export: back to Q/DQ around float ops.

    A fused activation becomes :func:`int_clamp` on the quantized tensor (an ONNX Clip on
    integers), which export shifts along with the tensor when int8 becomes uint8.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _TWO_OPERAND:
            qa, a_qp, qb, b_qp, c_qp = node.args
            with graph.inserting_before(node):
                a = graph.call_function(dequantize, (qa, *a_qp))
                b = graph.call_function(dequantize, (qb, *b_qp))
                out = graph.call_function(quantize, (graph.call_function(_TWO_OPERAND[node.target], (a, b)), *c_qp))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            continue
        if not _is(node, qlinear):
            continue
        op, op_args, act, act_args, qx, x_qp, qw, w_qp, qb, b_qp, y_qp = node.args
        val = node.meta.get("qb_input_val")
        lead = None
        if target_name(op) == "linear" and isinstance(val, torch.Tensor) and val.dim() > 2:
            # A token-wise linear (transformers): as a 2-D Gemm onnxruntime runs it as one integer
            # QGemm; a 3-D MatMul would become MatMulIntegerToFloat and a float bias Add.
            lead = [-1, *(int(d) for d in val.shape[1:-1])]
            with graph.inserting_before(node):
                qx = graph.call_function(torch.ops.aten.reshape.default, (qx, [-1, int(val.shape[-1])]))
        with graph.inserting_before(node):
            x = graph.call_function(dequantize, (qx, *x_qp))
            w = graph.call_function(dequantize, (qw, *w_qp))
            b = graph.call_function(dequantize, (qb, *b_qp)) if qb is not None else None
            y = graph.call_function(op, (x, w, b, *op_args))
            out = graph.call_function(quantize, (y, *y_qp))
            if act is not None:
                # On the integer grid: an integer Clip, cheap for onnxruntime, exact by construction.
                out = graph.call_function(int_clamp, (out, *grid_bounds(act, act_args, y_qp)))
            if lead is not None:
                out = graph.call_function(torch.ops.aten.reshape.default, (out, [*lead, int(qw_features(gm, qw))]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
