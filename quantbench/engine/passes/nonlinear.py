"""Integer kernels for the non-linear ops of modern architectures, exact against onnxruntime.

A frozen graph computes ``DQ -> f -> Q`` for a non-linear ``f`` in float32, and
onnxruntime computes it with its own float kernels (or its own integer
approximation, e.g. QLinearSigmoid, QLinearSoftmax): the two round differently,
and one flipped integer grows through the network. Each kernel here replaces
such a pattern with arithmetic that the ONNX export writes as integer ops, so the
frozen torch graph and
onnxruntime run the *same* arithmetic and agree to the bit:

* :func:`qlut`: any elementwise function of one per-tensor quantized tensor
  (SiLU, GELU in both forms, sigmoid, tanh, hardswish, ELU, an add / mul / div
  by a scalar constant, ...) is a table of ``qmax - qmin + 1`` output integers,
  indexed by the input integer: ``Gather`` in ONNX, on integers. This is how
  integer NPUs compute activations too.
* :func:`qsoftmax`: integer softmax. ``exp(x - max)`` comes from an integer
  table (``round(exp(-k * s_x) * 2^16)``), the row sum is an exact integer sum,
  and the output integer is ``round_half_even(e / (sum * s_y)) + z_y``, computed
  as an exact rational in int64 (``s_y = m * 2^E``): no float op at all.
* :func:`qmean_lut`: a mean (global pooling, token pooling) as an exact integer sum and a
  table of its requantization: the output integer ``round_half_even(sum * s_x / (N * s_y)) + z_y``
  is a function of the sum alone, and the sum of ``N`` integers on the grid takes at most
  ``N * (qmax - qmin) + 1`` values, so it is looked up (:func:`lookup`, as :func:`qlut`), the table
  built with the same exact integer arithmetic. :func:`qmean` computes that arithmetic at run time,
  where the table would be too long (:data:`MEAN_TABLE_MAX`).
* :func:`qnorm_int`: LayerNorm and GroupNorm in integer arithmetic only: exact statistics
  (``S1 = sum(x)``, ``V = N * sum(x^2) - S1^2`` in int64), an integer square root
  (:func:`isqrt`: Newton steps on integers) and a fixed-point per-channel affine.
* :func:`qresize`: a bilinear resize as two integer matrix products (fixed-point
  interpolation weights) and the exact rational requantization of :func:`qmean`.
* :func:`qnorm`: the norms' fallback where int64 would overflow (a huge normalized
  extent) or no quantizer follows: exact integer statistics, then a double-precision
  normalization ``D / sqrt(V + c) * gamma + beta``, every step one correctly rounded IEEE
  operation, the same bits in torch and onnxruntime, but float: coverage names it.

Int8 activations are exported as uint8 with zero point + 128 (see
:mod:`quantbench.engine.export`): :func:`export_offsets` moves each kernel's input
zero point and output offset (or its table) into that domain, so the same function
is what the frozen graph runs and what the exporter traces.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import fx

from quantbench.engine.graph import get_attr_tensor, op_name, set_attr_tensor
from quantbench.engine.ops import ops_of_kind, ops_tagged
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES

__all__ = ["qlut", "qsoftmax", "qmean", "qmean_lut", "qnorm", "qnorm_int", "qresize", "isqrt",
           "fuse_nonlinear_kernels", "SOFTMAX_EXP_BITS", "MEAN_TABLE_MAX", "NONLINEAR_KERNELS", "export_offsets",
           "EXPORT_TRANSLATIONS", "floor_div", "int_clip", "lookup"]

SOFTMAX_EXP_BITS = 16
"""Fixed-point bits of the softmax exp table: entries ``round(exp(-k s_x) 2^16)``."""

MEAN_TABLE_MAX = 1 << 20
"""Most entries of a mean's requantization table (:func:`qmean_lut`), ``N * (qmax - qmin) + 1``: a mean of
up to 4112 int8 values (a 64 x 64 global pool) or 16 int16 values; a longer one keeps :func:`qmean`'s
run-time arithmetic."""


def _storage(dtype: str, off: int) -> torch.dtype:
    return torch.uint8 if off else DTYPES[dtype].storage


def qlut(q: torch.Tensor, table: torch.Tensor, in_base: int) -> torch.Tensor:
    """Look up ``table[q - in_base]``; the table holds the output integers in their storage type
    (:func:`lookup`: one ONNX ``GatherElements`` on integers; int32 indices, as a 16-bit grid needs no more)."""
    idx = q.to(torch.int32)
    if in_base:
        idx = idx - in_base
    return torch.ops.quantbench.lookup(table, idx)


@torch.library.custom_op("quantbench::floor_div", mutates_args=())
def floor_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Integer division of int64 ``num >= 0`` by ``den > 0``.

    An op of its own so that the ONNX export writes one integer ``Div`` (truncating, which is the
    floor here; :data:`EXPORT_TRANSLATIONS`): the exporter's own translation of a floor division
    goes through float ``Div`` and ``Floor``, inexact beyond 2^24.
    """
    return torch.div(num, den, rounding_mode="floor")


@floor_div.register_fake
def _(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(num.shape, den.shape), dtype=num.dtype, device=num.device)


def _floor_div_onnx(num, den):
    from onnxscript import opset18 as op

    return op.Div(num, den)


@torch.library.custom_op("quantbench::int_clip", mutates_args=())
def int_clip(q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Clamp on the integer grid, an op of its own so the ONNX export writes one ``Clip`` in the
    tensor's type (the exporter's integer ``clamp`` becomes ``Max`` + ``Min``: two passes)."""
    return torch.clamp(q, lo, hi)


@int_clip.register_fake
def _(q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.empty_like(q)


def _int_clip_onnx(q, lo: int, hi: int):
    from onnxscript import opset18 as op

    return op.Clip(q, op.CastLike(lo, q), op.CastLike(hi, q))


@torch.library.custom_op("quantbench::lookup", mutates_args=())
def lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D table and integer (int32, int64) indices of any shape.

    An op of its own so that the ONNX export writes one ``GatherElements`` on the flattened indices
    (and two free ``Reshape``): onnxruntime's ``GatherElements`` is a typed loop, some 10x faster on
    one-byte entries than its ``Gather`` and ``GatherND`` (one ``memcpy`` per index), which the
    exporter's translations of ``table[idx]`` and ``index_select`` are."""
    return table[idx]


@lookup.register_fake
def _(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.empty(idx.shape, dtype=table.dtype, device=idx.device)


def _lookup_onnx(table, idx):
    from onnxscript import opset18 as op

    flat = op.Reshape(idx, op.Constant(value_ints=[-1]))
    return op.Reshape(op.GatherElements(table, flat, axis=0), op.Shape(idx))


EXPORT_TRANSLATIONS = {torch.ops.quantbench.floor_div.default: _floor_div_onnx,
                       torch.ops.quantbench.int_clip.default: _int_clip_onnx,
                       torch.ops.quantbench.lookup.default: _lookup_onnx}
"""ONNX translations of this module's own ops, for ``torch.onnx.export(custom_translation_table=...)``."""


def _store(y: torch.Tensor, y_zp: int, y_min: int, y_max: int, out_off: int, out_dtype: str) -> torch.Tensor:
    """Integer results on the output grid: plus the zero point, saturated, offset for export, stored."""
    y = torch.clamp(y + y_zp, y_min, y_max)
    return (y + out_off).to(_storage(out_dtype, out_off))


def _signed_div_half_even(num: torch.Tensor, den) -> torch.Tensor:
    """:func:`_div_half_even` for any sign of ``num`` (half to even is symmetric around zero)."""
    return _div_half_even(num.abs(), den) * torch.sign(num)


def _div_half_even(num: torch.Tensor, den) -> torch.Tensor:
    """``round_half_even(num / den)`` for int64 ``num >= 0``, ``den > 0``: exact integer arithmetic."""
    den = torch.as_tensor(den, dtype=torch.int64, device=num.device) if not isinstance(den, torch.Tensor) else den
    quot = torch.ops.quantbench.floor_div(num, den)
    twice_rem = (num - quot * den) * 2
    up = (twice_rem > den) | ((twice_rem == den) & (torch.remainder(quot, 2) == 1))
    return quot + up.to(torch.int64)


def qsoftmax(q: torch.Tensor, table: torch.Tensor, dim: int, num_shift: int, den_mult: int, y_zp: int,
             y_min: int, y_max: int, out_off: int, out_dtype: str) -> torch.Tensor:
    """Integer softmax along ``dim`` (see the module docstring); ``table[k] = exp(-k s_x) * 2^16``.

    ``s_y = den_mult * 2^-num_shift``: ``e / (sum * s_y) = (e * 2^num_shift) / (sum * den_mult)``.
    """
    i = q.to(torch.int64)
    d = i.amax(dim, keepdim=True) - i  # >= 0: independent of the zero point and the export offset
    e = torch.ops.quantbench.lookup(table, d)
    total = e.sum(dim, keepdim=True)
    y = _div_half_even(e * (2 ** num_shift), total * den_mult)
    return _store(y, y_zp, y_min, y_max, out_off, out_dtype)


def _requantize_sum(total: torch.Tensor, num_mult: int, den_mult: int, y_zp: int, y_min: int, y_max: int,
                    out_off: int, out_dtype: str) -> torch.Tensor:
    """The output integers of a mean whose exact integer sum is ``total``: what :func:`qmean` computes
    at run time and what :func:`qmean_lut`'s table holds."""
    return _store(_signed_div_half_even(total * num_mult, den_mult), y_zp, y_min, y_max, out_off, out_dtype)


def qmean(q: torch.Tensor, in_zp: int, dims: list[int], keepdim: bool, num_mult: int, den_mult: int, y_zp: int,
          y_min: int, y_max: int, out_off: int, out_dtype: str) -> torch.Tensor:
    """Integer mean: ``round_half_even(sum(x - z_x) * s_x / (N * s_y)) + z_y`` as an exact rational,
    ``num_mult / den_mult == s_x / (N * s_y)`` (both scales are dyadic rationals); rounding is
    symmetric around zero, as half-to-even is. Some 15 int64 ops on the output: where the sum's
    range is short enough, the frozen graph holds :func:`qmean_lut` instead."""
    total = (q.to(torch.int64) - in_zp).sum(dims, keepdim=keepdim)
    return _requantize_sum(total, num_mult, den_mult, y_zp, y_min, y_max, out_off, out_dtype)


def qmean_lut(q: torch.Tensor, table: torch.Tensor, dims: list[int], keepdim: bool, in_min: int,
              count: int) -> torch.Tensor:
    """Integer mean as :func:`qmean`, its requantization looked up: ``table[sum(q) - count * in_min]``.

    ``count`` integers are summed, each in ``[in_min, in_max]``, so the sum's offset from its least
    value indexes ``table`` (``count * (in_max - in_min) + 1`` output integers in their storage type,
    built by :func:`qmean`'s arithmetic from the sums ``count * (in_min - z_x) + k``): the input's zero
    point is folded into the table, and the export writes ``Cast``, ``ReduceSum``, ``Sub`` (none when
    the exported ``in_min`` is 0, as for int8 written as uint8 + 128) and :func:`lookup`. The sum is
    int32 (onnxruntime's int32 ``ReduceSum`` is some 4x faster than its int64 one) unless ``count``
    is 2^15 or more.
    """
    acc = torch.int32 if count < 2 ** 15 else torch.int64  # |sum| < count * 2^16: int32 holds it
    total = q.to(acc)
    if count > 1:
        total = total.sum(dims, keepdim=keepdim, dtype=acc)
    elif not keepdim:  # a mean of one value (a 1 x 1 global pool): no sum to run
        total = total.squeeze(dims)
    base = count * in_min
    if base:
        total = total - base
    return torch.ops.quantbench.lookup(table, total)


def _statistics(q: torch.Tensor, in_zp: int, dims: list[int], groups: int):
    """``x = q - z`` (int64; ``[B, groups, -1]`` for GroupNorm), its exact sums ``S1``, ``S2`` over
    the normalized extent, and that extent's size ``N``."""
    x = q.to(torch.int64) - in_zp
    if groups:
        x = x.reshape(x.shape[0], groups, -1)
    red = [-1] if groups else dims
    n = 1
    for d in red:
        n = n * x.shape[d]
    return x, x.sum(red, keepdim=True), (x * x).sum(red, keepdim=True), n


def qnorm(q: torch.Tensor, in_zp: int, dims: list[int], groups: int, const: float, gamma: torch.Tensor | None,
          beta: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm (``groups == 0``: over ``dims``) or GroupNorm (``groups`` groups over dims 1..) of an
    integer tensor; returns float32, which the output's QuantizeLinear quantizes.

    ``const = eps * N^2 / s_x^2``: the epsilon in the units of ``V = N * sum(x^2) - sum(x)^2``.
    """
    x, s1, s2, n = _statistics(q, in_zp, dims, groups)
    shape = q.shape
    var = s2 * n - s1 * s1  # exact integers
    dev = x * n - s1
    y = dev.to(torch.float64) / torch.sqrt(var.to(torch.float64) + const)
    if groups:
        y = y.reshape(shape)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y.to(torch.float32)


ISQRT_NEWTON_STEPS = 6
"""Newton steps of the integer square root: from ``2^ceil(bits/2)`` (at most twice the root) six
steps reach ``floor(sqrt(v))`` for every ``v < 2^62`` (relative error 1, 1/4, 1/40, ... < 2^-31)."""
_POW2 = torch.tensor([1 << i for i in range(63)], dtype=torch.int64)


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(v))`` of int64 ``v >= 0`` (at least 1) in integer ops: the bit length by comparison
    with the powers of two, a power-of-two start above the root, monotone Newton steps."""
    bits = (v.unsqueeze(-1) >= _POW2.to(v.device)).to(torch.int64).sum(-1)
    r = torch.index_select(_POW2.to(v.device), 0, torch.ops.quantbench.floor_div(bits + 1, _TWO.to(v.device))
                           .reshape(-1)).reshape(v.shape)
    for _ in range(ISQRT_NEWTON_STEPS):
        step = torch.ops.quantbench.floor_div(r + torch.ops.quantbench.floor_div(v, r), _TWO.to(v.device))
        r = torch.clamp(torch.minimum(r, step), min=1)
    return r


_TWO = torch.tensor(2, dtype=torch.int64)


def qnorm_int(q: torch.Tensor, in_zp: int, dims: list[int], groups: int, eps_units: int, root_bits: int,
              gain: torch.Tensor, offset: torch.Tensor, frac_bits: int, y_zp: int, y_min: int, y_max: int,
              out_off: int, out_dtype: str) -> torch.Tensor:
    """LayerNorm / GroupNorm in integer arithmetic only, output integers on the output's grid.

    ``D = N x - S1``, ``V = N S2 - S1^2 + eps_units`` (exact), ``r = isqrt(V 4^root_bits)``
    (``sqrt(V) 2^root_bits``), then ``q = round_half_even((D gain + offset r) / (r 2^frac_bits)) + z_y``
    with ``gain = round(gamma / s_y 2^frac_bits) 2^root_bits`` and ``offset = round(beta / s_y
    2^frac_bits)`` per channel: ``D / sqrt(V) * gamma / s_y + beta / s_y`` to within the fixed-point
    precision, every step an integer op (I-BERT, Kim et al., arXiv 2101.01321, does LayerNorm so).
    """
    x, s1, s2, n = _statistics(q, in_zp, dims, groups)
    shape = q.shape
    v = (s2 * n - s1 * s1 + eps_units) * (4 ** root_bits)
    r = isqrt(torch.clamp(v, min=1))
    dev = x * n - s1
    if groups:
        r = r.expand(dev.shape).reshape(shape)
        dev = dev.reshape(shape)
    num = dev * gain + offset * r
    den = r * (2 ** frac_bits)
    y = _signed_div_half_even(num, den)
    return _store(y, y_zp, y_min, y_max, out_off, out_dtype)


def qresize(q: torch.Tensor, in_zp: int, rows: torch.Tensor, cols: torch.Tensor, num_mult: int, den_mult: int,
            y_zp: int, y_min: int, y_max: int, out_off: int, out_dtype: str) -> torch.Tensor:
    """Bilinear resize as two integer matrix products: ``rows @ (q - z_x) @ cols^T`` with the
    interpolation weights in fixed point (``round(w * 2^12)``, exact for the dyadic weights of
    2x / 0.5x / 4x), then the exact rational requantization of :func:`qmean`."""
    x = q.to(torch.int64) - in_zp
    acc = torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
    y = _signed_div_half_even(acc * num_mult, den_mult)
    return _store(y, y_zp, y_min, y_max, out_off, out_dtype)


RESIZE_WEIGHT_BITS = 12


NONLINEAR_KERNELS = (qlut, qsoftmax, qmean, qmean_lut, qnorm, qnorm_int, qresize)


def _int8_stored(dtype: str) -> bool:
    """A grid stored in int8 (int8, int4): exported as uint8 + 128 with the activations."""
    return DTYPES[dtype].storage_name == "int8"


def export_offsets(gm: fx.GraphModule, node: fx.Node, shifted_input: bool, unsigned: bool) -> bool:
    """Rewrite a kernel node's offsets for export (in place); returns whether its output is shifted.

    ``shifted_input``: the kernel's integer input is exported as uint8 + 128;
    ``unsigned``: int8 (and int4) outputs are written as uint8 + 128 too.
    """
    args = list(node.args)
    if node.target in (qlut, qmean_lut):
        if shifted_input:  # qlut's in_base, qmean_lut's in_min
            at = 2 if node.target is qlut else 4
            args[at] = args[at] + 128
        table = get_attr_tensor(gm, args[1].target)
        shift = unsigned and table.dtype == torch.int8
        if shift:  # int8 outputs are written as uint8 + 128: so are the table's entries
            with gm.graph.inserting_before(node):
                args[1] = gm.graph.get_attr(set_attr_tensor(
                    gm, f"{args[1].target}_u8", (table.to(torch.int16) + 128).to(torch.uint8), param=False))
    elif node.target is qsoftmax:
        shift = unsigned and _int8_stored(args[9])
        args[8] = 128 if shift else 0
    elif node.target is qmean:
        shift = unsigned and _int8_stored(args[10])
        args[9] = 128 if shift else 0
        if shifted_input:
            args[1] = args[1] + 128
    elif node.target is qnorm_int:
        shift = unsigned and _int8_stored(args[13])
        args[12] = 128 if shift else 0
        if shifted_input:
            args[1] = args[1] + 128
    elif node.target is qresize:
        shift = unsigned and _int8_stored(args[10])
        args[9] = 128 if shift else 0
        if shifted_input:
            args[1] = args[1] + 128
    elif node.target is qnorm:
        shift = False  # float output: its quantize node is shifted as any other
        if shifted_input:
            args[1] = args[1] + 128
    else:
        raise ValueError(f"not a non-linear kernel: {node.target}")
    node.args = tuple(args)
    return shift


# -- matching in a frozen graph ---------------------------------------------------------------------------


def _is(node, fn) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is fn


def _act_dq(node) -> bool:
    """A per-tensor dequantize of an activation (not of a constant)."""
    return (_is(node, dequantize) and node.args[3] is None and isinstance(node.args[0], fx.Node)
            and node.args[0].op != "get_attr")


def _scalar_const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The float value of a dequantized one-element constant (a lifted scalar), or None."""
    if not (_is(node, dequantize) and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
        return None
    q = get_attr_tensor(gm, node.args[0].target)
    if q.numel() != 1:
        return None
    return dequantize(q, *[_value(gm, a) for a in node.args[1:]])


def _value(gm, a):
    return get_attr_tensor(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a


def _single_q_user(node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if _is(user, quantize) and user.args[3] is None and not isinstance(user.args[1], fx.Node):
        return user
    return None


def _lut_function(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Callable] | None:
    """(input dequantize, f) when ``node`` is an elementwise function of one quantized tensor."""
    name = op_name(node)
    unary = name in ops_of_kind("activation") and name not in ops_tagged("not_elementwise")
    if unary:
        x = node.args[0] if node.args else None
        if not _act_dq(x) or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        return x, lambda t: node.target(t, *node.args[1:], **node.kwargs)
    if name in ops_of_kind("binary") and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if _act_dq(a) and (c := _scalar_const(gm, b)) is not None:
            return a, lambda t: node.target(t, c.reshape(()))
        if _act_dq(b) and (c := _scalar_const(gm, a)) is not None:
            return b, lambda t: node.target(c.reshape(()), t)
    return None


def _grid(qp: tuple) -> torch.Tensor:
    return torch.arange(int(qp[3]), int(qp[4]) + 1, dtype=torch.int64)


def _fuse_luts(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _lut_function(gm, node)
        qy = _single_q_user(node) if found else None
        if qy is None:
            continue
        dqx, fn = found
        x_qp, y_qp = tuple(dqx.args[1:]), tuple(qy.args[1:])
        levels = _grid(x_qp)
        with torch.no_grad():
            y = fn(dequantize(levels.to(DTYPES[x_qp[5]].storage), *x_qp)).float()
        if y.shape != levels.shape:
            continue  # not elementwise after all
        table = quantize(y, *y_qp)  # in the output's storage type
        with graph.inserting_before(qy):
            tnode = graph.get_attr(set_attr_tensor(gm, f"{node.name}_table", table, param=False))
            fused = graph.call_function(qlut, (dqx.args[0], tnode, int(x_qp[3])))
        fused.meta["val"] = qy.meta.get("val")
        fused.meta.update(qb_source_node=node.name, qb_kernel=f"table of {op_name(node)}", qb_source_op=op_name(node), qb_qparams=(x_qp, y_qp))
        qy.replace_all_uses_with(fused)
        graph.erase_node(qy)
        graph.erase_node(node)


def _softmax_dim(node: fx.Node, ndim: int) -> int | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int):
        return None
    return dim % ndim


def _rational(scale: float) -> tuple[int, int]:
    """``scale == den_mult * 2^-num_shift`` exactly (a float32 value is a dyadic rational)."""
    mant, exp = math.frexp(float(scale))
    m = int(mant * (1 << 53))
    shift = 53 - exp
    while m % 2 == 0 and shift > 0:
        m //= 2
        shift -= 1
    return shift, m


def _fuse_softmax(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node) not in ops_tagged("softmax"):
            continue
        x = node.args[0]
        qy = _single_q_user(node)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not _act_dq(x) or qy is None or val is None:
            continue
        dim = _softmax_dim(node, val.dim())
        x_qp, y_qp = tuple(x.args[1:]), tuple(qy.args[1:])
        if dim is None or isinstance(x_qp[0], fx.Node):
            continue
        span = int(x_qp[4]) - int(x_qp[3])
        k = torch.arange(span + 1, dtype=torch.float64)
        table = torch.round(torch.exp(-k * float(x_qp[0])) * 2 ** SOFTMAX_EXP_BITS).to(torch.int64)
        num_shift, den_mult = _rational(float(torch.tensor(float(y_qp[0]), dtype=torch.float32)))
        n = int(val.shape[dim])
        if num_shift + SOFTMAX_EXP_BITS > 62 or (n << SOFTMAX_EXP_BITS) * den_mult >= 2 ** 62:
            continue  # int64 would overflow: left in float (coverage names it)
        with graph.inserting_before(qy):
            tnode = graph.get_attr(set_attr_tensor(gm, f"{node.name}_exp_table", table, param=False))
            fused = graph.call_function(qsoftmax, (x.args[0], tnode, dim, num_shift, den_mult, int(y_qp[1]),
                                                   int(y_qp[3]), int(y_qp[4]), 0, y_qp[5]))
        fused.meta["val"] = qy.meta.get("val")
        fused.meta.update(qb_source_node=node.name, qb_kernel="integer softmax", qb_source_op=op_name(node), qb_qparams=(x_qp, y_qp))
        qy.replace_all_uses_with(fused)
        graph.erase_node(qy)
        graph.erase_node(node)


class _NotConstant(Exception):
    pass


def _const_float(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """A norm's affine parameter as float64 (None when absent); raises _NotConstant for a computed one."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return get_attr_tensor(gm, node.target).detach().to(torch.float64)
    if _is(node, dequantize) and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
        q = get_attr_tensor(gm, node.args[0].target)
        return dequantize(q, *[_value(gm, a) for a in node.args[1:]]).to(torch.float64)
    raise _NotConstant


def _fuse_means(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node) not in ops_tagged("integer_mean") or len(node.args) < 2:
            continue
        if op_name(node) == "adaptive_avg_pool2d" and [int(v) for v in node.args[1]] != [1, 1]:
            continue  # a windowed pool: onnxruntime's QLinearAveragePool
        x, qy = node.args[0], _single_q_user(node)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not _act_dq(x) or qy is None or val is None or isinstance(x.args[1], fx.Node) \
                or node.kwargs.get("dtype") is not None:
            continue
        if op_name(node) == "adaptive_avg_pool2d":  # global: the mean over H, W
            dims, keepdim = [val.dim() - 2, val.dim() - 1], True
        else:
            dims = sorted(int(d) % val.dim() for d in node.args[1])
            keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        n = math.prod(int(val.shape[d]) for d in dims)
        x_shift, x_mult = _rational(float(x.args[1]))
        y_shift, y_mult = _rational(float(qy.args[1]))
        # s_x / (N s_y) = x_mult 2^-x_shift / (N y_mult 2^-y_shift)
        num, den = x_mult, n * y_mult
        if x_shift >= y_shift:
            den <<= x_shift - y_shift
        else:
            num <<= y_shift - x_shift
        x_zp, x_min, x_max = int(x.args[2]), int(x.args[4]), int(x.args[5])
        bound = (x_max - x_min) * n  # the largest |sum|
        if bound * num >= 2 ** 62 or den >= 2 ** 62:
            continue  # int64 would overflow: left in float (coverage names it)
        y_qp = qy.args[1:]
        requant = (num, den, int(y_qp[1]), int(y_qp[3]), int(y_qp[4]), 0, y_qp[5])
        entries = n * (x_max - x_min) + 1  # every sum of n integers in [x_min, x_max]
        with graph.inserting_before(qy):
            if entries <= MEAN_TABLE_MAX:
                sums = torch.arange(entries, dtype=torch.int64) + n * (x_min - x_zp)  # sum(x - z_x)
                table = _requantize_sum(sums, *requant)
                tnode = graph.get_attr(set_attr_tensor(gm, f"{node.name}_mean_table", table, param=False))
                fused = graph.call_function(qmean_lut, (x.args[0], tnode, dims, keepdim, x_min, n))
                kernel = "integer mean (requantization table)"
            else:
                fused = graph.call_function(qmean, (x.args[0], x_zp, dims, keepdim, *requant))
                kernel = "integer mean"
        fused.meta["val"] = qy.meta.get("val")
        fused.meta.update(qb_source_node=node.name, qb_kernel=kernel, qb_source_op=op_name(node), qb_qparams=(tuple(x.args[1:]), tuple(y_qp)))
        qy.replace_all_uses_with(fused)
        graph.erase_node(qy)
        graph.erase_node(node)


NORM_FRAC_BITS = 20
"""Fixed-point bits of the integer norm's per-channel gain and offset (fewer when int64 would overflow)."""


def _fuse_norm_int(gm, node, x, dims, groups, n, const, gamma, beta, shape, name) -> bool:
    """Replace ``DQ -> norm -> Q`` by :func:`qnorm_int` when int64 holds every intermediate."""
    qy = _single_q_user(node)
    if qy is None:
        return False
    y_qp = tuple(qy.args[1:])
    s_y = float(y_qp[0])
    span = int(x.args[5]) - int(x.args[4])
    d_max = n * span  # |N x - S1|
    v_max = n * n * span * span + math.ceil(const)
    root_bits = max(0, min(8, int((61 - math.log2(max(v_max, 2))) // 2)))
    r_max = math.isqrt(v_max * 4 ** root_bits) + 1
    channels = int(math.prod(shape))
    g = gamma.reshape(-1) if gamma is not None else torch.ones(channels, dtype=torch.float64)
    b = beta.reshape(-1) if beta is not None else torch.zeros(channels, dtype=torch.float64)
    ratio = max(float(g.abs().max()), 1e-12) / s_y
    bias_ratio = float(b.abs().max()) / s_y + 1
    frac = NORM_FRAC_BITS
    while frac >= 8 and (d_max * ratio * 2 ** (frac + root_bits) + bias_ratio * 2 ** frac * r_max >= 2 ** 62
                         or r_max * 2 ** frac >= 2 ** 62):
        frac -= 1
    if frac < 8:
        return False  # int64 would overflow: the double-precision path below
    gain = (torch.round(g / s_y * 2 ** frac).to(torch.int64) * 2 ** root_bits).reshape(shape)
    offset = torch.round(b / s_y * 2 ** frac).to(torch.int64).reshape(shape)
    graph = gm.graph
    with graph.inserting_before(qy):
        gn = graph.get_attr(set_attr_tensor(gm, f"{node.name}_gain", gain, param=False))
        on = graph.get_attr(set_attr_tensor(gm, f"{node.name}_offset", offset, param=False))
        fused = graph.call_function(qnorm_int, (x.args[0], int(x.args[2]), dims, groups, int(round(const)),
                                                root_bits, gn, on, frac, int(y_qp[1]), int(y_qp[3]), int(y_qp[4]),
                                                0, y_qp[5]))
    fused.meta["val"] = qy.meta.get("val")
    fused.meta.update(qb_source_node=node.name, qb_kernel=f"integer {name}", qb_source_op=name,
                      qb_qparams=(tuple(x.args[1:]), y_qp))
    qy.replace_all_uses_with(fused)
    graph.erase_node(qy)
    graph.erase_node(node)
    return True


def _requant_ratio(s_x: float, s_y: float, extra_shift: int) -> tuple[int, int]:
    """Integers ``num, den`` with ``num / den == s_x / (2^extra_shift s_y)`` exactly."""
    x_shift, x_mult = _rational(s_x)
    y_shift, y_mult = _rational(s_y)
    num, den = x_mult, y_mult << extra_shift
    if x_shift >= y_shift:
        den <<= x_shift - y_shift
    else:
        num <<= y_shift - x_shift
    return num, den


def _fuse_resizes(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node) != "upsample_bilinear2d":
            continue
        x, qy = node.args[0], _single_q_user(node)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not _act_dq(x) or qy is None or val is None or val.dim() != 4 or isinstance(x.args[1], fx.Node):
            continue
        h, w = int(val.shape[2]), int(val.shape[3])
        with torch.no_grad():
            basis_h = torch.eye(h).reshape(h, 1, h, 1).expand(h, 1, h, w).contiguous()
            basis_w = torch.eye(w).reshape(w, 1, 1, w).expand(w, 1, h, w).contiguous()
            rows = node.target(basis_h, *node.args[1:], **node.kwargs)[:, 0, :, 0].transpose(0, 1)
            cols = node.target(basis_w, *node.args[1:], **node.kwargs)[:, 0, 0, :].transpose(0, 1)
        scale = 2 ** RESIZE_WEIGHT_BITS
        rows_i = torch.round(rows.double() * scale).to(torch.int64)
        cols_i = torch.round(cols.double() * scale).to(torch.int64)
        num, den = _requant_ratio(float(x.args[1]), float(qy.args[1]), 2 * RESIZE_WEIGHT_BITS)
        span = int(x.args[5]) - int(x.args[4])
        acc_max = span * int(rows_i.abs().sum(1).max()) * int(cols_i.abs().sum(1).max())
        if acc_max * num >= 2 ** 62 or den >= 2 ** 62:
            continue  # int64 would overflow: left in float (coverage names it)
        y_qp = tuple(qy.args[1:])
        with graph.inserting_before(qy):
            rn = graph.get_attr(set_attr_tensor(gm, f"{node.name}_rows", rows_i, param=False))
            cn = graph.get_attr(set_attr_tensor(gm, f"{node.name}_cols", cols_i, param=False))
            fused = graph.call_function(qresize, (x.args[0], int(x.args[2]), rn, cn, num, den, int(y_qp[1]),
                                                  int(y_qp[3]), int(y_qp[4]), 0, y_qp[5]))
        fused.meta["val"] = qy.meta.get("val")
        fused.meta.update(qb_source_node=node.name, qb_kernel="integer bilinear resize", qb_source_op=op_name(node),
                          qb_qparams=(tuple(x.args[1:]), y_qp))
        qy.replace_all_uses_with(fused)
        graph.erase_node(qy)
        graph.erase_node(node)


def _fuse_norms(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        name = op_name(node) if node.op == "call_function" else ""
        if name not in ops_tagged("stat_norm"):
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not _act_dq(x) or val is None or isinstance(x.args[1], fx.Node):
            continue
        args = list(node.args) + [None] * 6
        if name == "layer_norm":
            normalized, weight, bias, eps = args[1], args[2], args[3], node.kwargs.get("eps", args[4])
            eps = 1e-5 if eps is None else float(eps)
            dims = list(range(val.dim() - len(normalized), val.dim()))
            groups, n = 0, math.prod(int(val.shape[d]) for d in dims)
            shape = [int(s) for s in normalized]
        else:
            groups, weight, bias = int(args[1]), args[2], args[3]
            eps = float(node.kwargs.get("eps", args[4] if args[4] is not None else 1e-5))
            dims, n = [], math.prod(int(s) for s in val.shape[1:]) // groups
            shape = [int(val.shape[1])] + [1] * (val.dim() - 2)
        try:
            gamma, beta = _const_float(gm, weight), _const_float(gm, bias)
        except _NotConstant:
            continue
        scale = float(x.args[1])
        const = eps * n * n / (scale * scale)
        if _fuse_norm_int(gm, node, x, dims, groups, n, const, gamma, beta, shape, name):
            continue
        with graph.inserting_before(node):
            g = graph.get_attr(set_attr_tensor(gm, f"{node.name}_gamma", gamma.reshape(shape), param=False)) \
                if gamma is not None else None
            b = graph.get_attr(set_attr_tensor(gm, f"{node.name}_beta", beta.reshape(shape), param=False)) \
                if beta is not None else None
            fused = graph.call_function(qnorm, (x.args[0], int(x.args[2]), dims, groups, const, g, b))
        fused.meta["val"] = node.meta.get("val")
        fused.meta.update(qb_source_node=node.name, qb_kernel=f"{name} from integer statistics (double-precision normalization)",
                          qb_source_op=name, qb_qparams=(tuple(x.args[1:]), None))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def fuse_nonlinear_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``DQ -> f -> Q`` for tables, softmax and norms by :data:`NONLINEAR_KERNELS` (in place).

    Before: a baked graph (:func:`~quantbench.engine.passes.freeze.bake_quantizers`), per-tensor
    activations. After: each matched pattern is one kernel node; the rest is unchanged. Idempotent.
    """
    _fuse_luts(gm)
    _fuse_softmax(gm)
    _fuse_means(gm)
    _fuse_resizes(gm)
    _fuse_norms(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm

