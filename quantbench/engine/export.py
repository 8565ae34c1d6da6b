"""QDQ ONNX export with the translator of the dynamo-based ``torch.onnx.export``.

A frozen graph's :func:`~quantbench.engine.qdq.quantize` /
:func:`~quantbench.engine.qdq.dequantize` calls are swapped for
``quantized_decomposed`` ops, which the exporter translates to ONNX
QuantizeLinear / DequantizeLinear. Integer weights stay integer initializers
feeding DequantizeLinear (what onnxruntime fuses into integer kernels); the
int32 bias keeps scale = input scale x weight scale. An activation grid
narrower than its 8-bit storage (int4 [-8, 7], uint4 [0, 15]: W4A4) is
QuantizeLinear to the storage type followed by an integer ``Clip`` to the grid
(:func:`_narrow_to_grid`): the same integers, and onnxruntime still fuses
``DQ -> Conv -> Q`` into its integer kernel in front of the Clip. A float graph
or module exports as plain fp32 ONNX (the latency baseline).

A graph goes to torch's translator without the exporter's re-tracing
(:mod:`~quantbench.engine.translate`): the same ONNX graph in a fifth of the time
on a small CNN. The model is optimized, given one DequantizeLinear per consumer,
checked and written once, in memory until then.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import onnx
import torch
from torch import fx

from quantbench.engine.errors import CaptureError, ExportError, example_tuple
from quantbench.engine.finite import check_finite_qdq
from quantbench.engine.graph import copy_graph, get_attr_tensor, op_name, quiet_pytree_copies, set_attr_tensor
from quantbench.engine.machine import describe
from quantbench.engine.ops import op_kind, ops_of_kind, ops_tagged
from quantbench.engine.passes.integer import expand_integer_kernels, int_clamp
from quantbench.engine.passes.nonlinear import EXPORT_TRANSLATIONS, NONLINEAR_KERNELS, export_offsets
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES
from quantbench.engine.translate import Untranslatable, batch_dim, timed, to_onnx
from quantbench.quiet import quiet_loggers

__all__ = ["export_onnx", "ExportError", "ONNX_ACTIVATION_DTYPES", "default_unsigned_weights", "signed_weights"]

log = logging.getLogger(__name__)

# Storage types that QuantizeLinear (opset <= 20) writes: an activation grid stored in one of them is
# exported exactly, a narrower grid (int4 [-8, 7], uint4 [0, 15]) as QuantizeLinear + an integer Clip.
ONNX_ACTIVATION_STORAGE = ("int8", "uint8")
ONNX_ACTIVATION_DTYPES = frozenset(name for name, t in DTYPES.items() if t.storage_name in ONNX_ACTIVATION_STORAGE)
"""Activation dtypes the export expresses exactly: int8, uint8, and int4 / uint4 (narrowed by a Clip)."""


def _decomposed_ops():
    # torch's quantized_decomposed op library, which the exporter translates to QuantizeLinear /
    # DequantizeLinear; torchao's pt2e package registers it by importing this same module, at 1-2 s
    # of import (its kernels, its logs) that the export does not need: torchao only where a torch
    # without the module leaves no other way.
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:  # pragma: no cover - a torch that moved it out for good
        with quiet_loggers("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
            import torchao.quantization.pt2e  # noqa: F401

    return torch.ops.quantized_decomposed


def _check_exportable(node: fx.Node, is_quantize: bool) -> None:
    qmin, qmax, dtype, round_method = node.args[4:8]
    if not is_quantize:
        return
    itype = DTYPES[dtype]
    if dtype not in ONNX_ACTIVATION_DTYPES or not itype.qmin <= qmin <= qmax <= itype.qmax:
        raise ExportError(
            f"node '{node.name}': activations quantized to {dtype} [{qmin}, {qmax}] cannot be expressed by "
            f"ONNX QuantizeLinear (grids stored in int8 / uint8 only: {', '.join(sorted(ONNX_ACTIVATION_DTYPES))}); "
            "use one of those for activations")
    if round_method != "half_even":
        raise ExportError(
            f"node '{node.name}': round_method={round_method!r} cannot be exported exactly (ONNX QuantizeLinear "
            "rounds half to even); use round_method='half_even'")


_BINARY_TARGETS = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)


def _const_as_activation(node: fx.Node) -> bool:
    """A per-tensor constant read only by add / mul: onnxruntime's QLinearAdd / QLinearMul take both
    operands in one type, so the constant is stored like the activation it meets (uint8 + 128)."""
    return (node.args[3] is None and bool(node.users)
            and all(u.op == "call_function" and u.target in _BINARY_TARGETS for u in node.users))


def _saturating_weight(node: fx.Node, nonnegative: set[fx.Node]) -> bool:
    """A dequantize of a constant read only by integer GEMM ops (conv, linear, matmul) as their weight,
    one of which multiplies it with activations that may exceed 128 on the uint8 grid: where
    onnxruntime's U8S8 kernels can saturate (:func:`default_unsigned_weights`). A conv whose input
    is :func:`_nonnegative_activations` (a ReLU's, on [0, 127]) cannot: 2 x 128 x 128 fits int16."""
    def reads_as_weight(user: fx.Node) -> bool:
        if user.op != "call_function":
            return False
        name = op_name(user)
        if name in ops_of_kind("matmul"):
            return True  # either operand multiplies in the kernel
        return name in ops_tagged("integer_kernel") and len(user.args) > 1 and user.args[1] is node  # not the bias

    def small_input(user: fx.Node) -> bool:
        return op_name(user) in ops_tagged("integer_kernel") and user.args[0] in nonnegative

    return (node.target is dequantize and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
            and bool(node.users) and all(reads_as_weight(u) for u in node.users)
            and not all(small_input(u) for u in node.users))


def _nonnegative_activations(gm: fx.GraphModule) -> set[fx.Node]:
    """The int8 activations whose integers are never negative, and every node that carries them.

    A quantize read only by integer clamps with a lower bound >= 0 (a ReLU, ReLU6 on the grid), whose
    values reach only per-tensor dequantizes read by convs and linears as their input (through max
    pools, reshapes, splits): its integers, [0, 127] at most, are the same numbers in uint8 with the
    same zero point. Stored so, the QuantizeLinear's saturation at 0 *is* the ReLU's lower clamp, and
    onnxruntime's U8S8 kernels cannot saturate on them (the pair sums of ``vpmaddubsw`` stay within
    int16). Only between integer GEMMs: their sums are exact whatever the input zero point, and
    their output zero point is added after rounding, where QLinearAdd / QLinearMul round a float
    expression of either (:func:`~quantbench.engine.passes.integer.qadd` mirrors the + 128 one).
    Returns the quantize, clamp, movement and dequantize nodes of each such tensor.
    """
    out: set[fx.Node] = set()
    for q in gm.graph.nodes:
        src = q.args[0] if q.args else None
        if not (q.op == "call_function" and q.target is quantize and q.args[3] is None
                and isinstance(src, fx.Node) and src.op == "call_function"
                and op_name(src) in ops_tagged("integer_kernel")
                and not isinstance(q.args[2], fx.Node) and 0 <= int(q.args[2]) <= 127
                and DTYPES[q.args[6]].storage_name == "int8" and q.users):
            continue
        clamps = list(q.users)
        if not all(u.op == "call_function" and u.target is int_clamp and u.args[0] is q
                   and 0 <= u.args[1] and u.args[2] <= 127 for u in clamps):
            continue
        region, frontier, ok = set(clamps), list(clamps), True
        while frontier and ok:
            for user in frontier.pop().users:
                if user.op != "call_function" or not user.args or user.args[0] not in region:
                    ok = False
                elif user.target is dequantize:  # read by convs / linears only: see above
                    ok = (user.args[3] is None and not isinstance(user.args[2], fx.Node)
                          and 0 <= int(user.args[2]) <= 127 and bool(user.users)
                          and all(r.op == "call_function" and op_name(r) in ops_tagged("integer_kernel")
                                  and r.args[0] is user for r in user.users))
                    region.add(user)
                elif op_kind(user) in _MOVEMENT_KINDS and not any(
                        isinstance(a, fx.Node) for a in (*user.args[1:], *user.kwargs.values())):
                    region.add(user)
                    frontier.append(user)
                else:
                    ok = False
                if not ok:
                    break
        if ok:
            out |= {q, *region}
    return out


def _activation_storage(node: fx.Node, dtype: str, zp, unsigned_activations: bool,
                        unsigned_weights: bool = False, nonnegative: frozenset | set = frozenset()):
    """Storage dtype, zero point and (shifted: new) full range of one Q/DQ node in the ONNX graph.

    ``Q_int8(x, s, z) + 128 == Q_uint8(x, s, z + 128)`` bit for bit (same
    rounding, both saturate at the same real values), so int8 activations can
    be written as uint8 without changing a single value. onnxruntime's x86
    integer kernels are U8S8: it converts int8 activations itself only where
    a QuantizeLinear has a single DequantizeLinear reader, and leaves every
    other conv in float. Biases keep their type; weights too, unless ``unsigned_weights``
    (:func:`default_unsigned_weights`): then a GEMM weight is stored uint8 + 128 the same way, exact too
    (a per-channel zero point tensor is shifted by the caller).
    """
    is_const = isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
    is_activation = not is_const or (node.target is dequantize and _const_as_activation(node))
    itype = DTYPES[dtype]
    if itype.storage_name != "int8":
        return itype.storage, zp, None, None
    if unsigned_activations and is_activation and not isinstance(zp, fx.Node):
        return torch.uint8, int(zp) + 128, 0, 255  # int4 too: its integers are int8's, shifted alike
    if unsigned_weights and is_const and _saturating_weight(node, nonnegative):
        return torch.uint8, zp if isinstance(zp, fx.Node) else int(zp) + 128, 0, 255
    return itype.storage, zp, None, None


def default_unsigned_weights() -> bool:
    """Whether this machine's onnxruntime needs uint8 weights for its integer kernels to be exact.

    onnxruntime's x86 U8S8 kernels (uint8 activations x int8 weights) multiply with VNNI's
    ``vpdpbusd`` where the CPU has it (AVX512-VNNI, AVX-VNNI, AMX): exact 32-bit sums. Without it
    they use AVX2 / AVX-512BW ``vpmaddubsw``, which adds each pair of u8 x s8 products into a
    *saturating* int16: 255 x 127 x 2 overflows, and a conv's integers drift from the QDQ graph's
    (measured on an AVX2 EPYC: ResNet-18 52 quantization steps off at the logits, top-1 agreement
    3 %). Its U8U8 kernels widen to int16 first and never saturate, at some speed (ResNet-18 int8
    1.9x -> 1.4x fp32 there). So: uint8 weights on an x86 CPU without VNNI, int8 elsewhere.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(describe().isa)


def _shift_constant(gm: fx.GraphModule, x: fx.Node) -> fx.Node:
    """A constant (or a reshape / expand of one: a class token) stored like an activation: its
    integers move to uint8 + 128 too. Returns the node to read instead of ``x``."""
    chain, root = [], x
    while root.op == "call_function" and root.args and isinstance(root.args[0], fx.Node) \
            and op_kind(root) == "passthrough" and len(root.users) == 1:
        chain.append(root)
        root = root.args[0]
    if root.op != "get_attr":
        return x
    const = get_attr_tensor(gm, root.target)
    with gm.graph.inserting_after(root):
        shifted = gm.graph.get_attr(set_attr_tensor(
            gm, f"{root.target}_u8", (const.to(torch.int16) + 128).to(torch.uint8), param=False))
    if not chain:
        return shifted
    chain[-1].replace_input_with(root, shifted)
    return x


_MOVEMENT_KINDS = ("passthrough", "tuple_passthrough", "shared")


def _pad_value_arg(node: fx.Node) -> int | None:
    """Position of a constant pad's value argument (None for reflect / replicate / circular pads)."""
    if op_name(node) == "constant_pad_nd":
        return 2
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    return 3 if mode == "constant" else None


def _with_pad_value(node: fx.Node, args: list, value) -> list:
    """``args`` of a constant pad with its value set (a missing mode is 'constant')."""
    pos = _pad_value_arg(node)
    defaults = [None, None, 0.0] if op_name(node) == "constant_pad_nd" else [None, None, "constant", None]
    args = list(args) + defaults[len(args):]
    args[pos] = value
    return args


def _shift_pad_value(node: fx.Node) -> None:
    pos = _pad_value_arg(node)
    if pos is not None:
        current = node.args[pos] if len(node.args) > pos else None
        node.args = tuple(_with_pad_value(node, list(node.args), int(current or 0) + 128))


def _sinkable(node: fx.Node) -> bool:
    """A value-preserving op reading a per-tensor dequantize: it can move the integers instead."""
    if node.op != "call_function" or not node.args or not _is_dq(node.args[0]):
        return False
    if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    dq = node.args[0]
    if dq.args[3] is not None or isinstance(dq.args[1], fx.Node):
        return False
    kind = op_kind(node)
    if kind == "tuple_passthrough":
        return all(op_name(u) == "getitem" for u in node.users)
    return (kind == "passthrough" and op_name(node) != "getitem") or op_name(node) in ops_tagged("integer_movement")


def _is_dq(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is dequantize


def sink_dequantize(gm: fx.GraphModule) -> fx.GraphModule:
    """Move every per-tensor DequantizeLinear below the value-preserving ops that read it (in place).

    ``DQ -> reshape / split / pad / roll ... -> op`` becomes ``reshape / split ... -> DQ -> op``:
    the same values (these ops commute with ``(q - z) * s``), but the movement runs on integers,
    which onnxruntime otherwise leaves in float around a Split, a Pad or a roll's Slice + Concat.
    A constant pad pads with the zero point's integer grid value. Idempotent.
    """
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if not _sinkable(node):
                continue
            dq = node.args[0]
            args = list(node.args)
            args[0] = dq.args[0]
            if op_name(node) in ops_tagged("pad") and (pos := _pad_value_arg(node)) is not None:
                value = float((args[pos] if len(args) > pos else None) or 0.0)
                args = _with_pad_value(node, args, int(quantize(torch.tensor(value), *dq.args[1:])))
            with graph.inserting_before(node):
                moved = graph.call_function(node.target, tuple(args), dict(node.kwargs))
            if op_kind(node) == "tuple_passthrough":
                for user in list(node.users):
                    with graph.inserting_before(user):
                        part = graph.call_function(user.target, (moved, *user.args[1:]))
                        new = graph.call_function(dequantize, (part, *dq.args[1:]))
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
            else:
                with graph.inserting_before(node):
                    new = graph.call_function(dequantize, (moved, *dq.args[1:]))
                new.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _on_grid(q: fx.Node) -> bool:
    """A quantize that needs no Clip to its grid: every reader clamps within the grid anyway (a fused
    ReLU's :func:`int_clamp`), or its input is a value-preserving op (max pool, nearest upsample, a
    reshape) of a dequantize with the same parameters, whose values are grid values already."""
    qmin, qmax = q.args[4], q.args[5]
    if q.users and all(u.op == "call_function" and u.target is int_clamp and u.args[0] is q
                       and qmin <= u.args[1] and u.args[2] <= qmax for u in q.users):
        return True
    x = q.args[0]
    while isinstance(x, fx.Node) and x.op == "call_function" and op_kind(x) in ("shared", "passthrough") \
            and op_name(x) not in ops_tagged("pad") and x.args and isinstance(x.args[0], fx.Node) \
            and not any(isinstance(a, fx.Node) for a in (*x.args[1:], *x.kwargs.values())):
        x = x.args[0]
    return _is_dq(x) and tuple(x.args[1:7]) == tuple(q.args[1:7])


def _narrow_to_grid(gm: fx.GraphModule, node: fx.Node, grid: tuple[int, int], storage: torch.dtype, offset: int,
                    shifted: set[fx.Node], on_grid: bool) -> tuple[int, int]:
    """A quantize to a grid narrower than its storage (int4 [-8, 7] in int8, uint4 [0, 15] in uint8):
    QuantizeLinear to the full storage type, which saturates there, then an integer ``Clip`` to the
    grid, ``clamp(sat_8bit(v), qmin, qmax) == clamp(v, qmin, qmax)`` bit for bit (the ranges nest).
    The Clip is inserted after ``node`` and read in its place (shifted like it), unless ``on_grid``
    (:func:`_on_grid`). Returns the range the QuantizeLinear itself saturates to."""
    info = torch.iinfo(storage)
    lo, hi = grid[0] + offset, grid[1] + offset
    if (lo, hi) == (info.min, info.max) or on_grid:
        return info.min, info.max
    with gm.graph.inserting_after(node):
        clip = gm.graph.call_function(torch.ops.quantbench.int_clip.default, (node, lo, hi))
    clip.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(clip, delete_user_cb=lambda user: user is not clip)
    if offset:
        shifted.add(clip)
    return info.min, info.max


def _shift_zero_point(gm: fx.GraphModule, node: fx.Node, zp: fx.Node) -> fx.Node:
    """A per-channel zero point tensor moved to the uint8 grid (+ 128), as a new constant."""
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(set_attr_tensor(
            gm, f"{zp.target}_u8", get_attr_tensor(gm, zp.target).to(torch.int32) + 128, param=False))


def _swap_to_decomposed(gm: fx.GraphModule, unsigned_activations: bool = True,
                        unsigned_weights: bool = False) -> fx.GraphModule:
    ops = _decomposed_ops()
    shifted: set[fx.Node] = set()
    nonnegative = _nonnegative_activations(gm) if unsigned_activations else set()
    on_grid = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is quantize and _on_grid(n)}
    for node in list(gm.graph.nodes):  # a narrow grid's Clip is inserted after its quantize
        if node in nonnegative and node.target in (quantize, dequantize):
            _check_exportable(node, node.target is quantize)  # uint8, the same integers and zero point
            x, scale, zp = node.args[:3]
            if node.target is quantize:
                node.target, node.args = ops.quantize_per_tensor.default, (x, scale, zp, 0, 255, torch.uint8)
            else:
                node.target, node.args = ops.dequantize_per_tensor.default, (x, scale, zp, 0, 255, torch.uint8)
            node.kwargs = {}
            continue
        if node.op == "call_function" and node.target is int_clamp:
            src, lo, hi = node.args
            offset = 128 if src in shifted else 0
            node.target = torch.ops.quantbench.int_clip.default
            node.args = (src, lo + offset, hi + offset)
            if offset:
                shifted.add(node)
            continue
        if node.op == "call_function" and op_kind(node) in _MOVEMENT_KINDS and node.args \
                and node.args[0] in shifted:
            shifted.add(node)  # moves shifted integers (a reshape, a window roll, a split)
            if op_name(node) in ops_tagged("pad"):  # the pad value is an integer of the shifted grid too
                _shift_pad_value(node)
            continue
        if node.op == "call_function" and node.target in NONLINEAR_KERNELS:
            if export_offsets(gm, node, node.args[0] in shifted, unsigned_activations):
                shifted.add(node)
            continue
        if node.op != "call_function" or node.target not in (quantize, dequantize):
            continue
        is_q = node.target is quantize
        _check_exportable(node, is_q)
        x, scale, zp, axis, qmin, qmax, dtype = node.args[:7]
        storage, zp, new_min, new_max = _activation_storage(node, dtype, zp, unsigned_activations, unsigned_weights,
                                                            nonnegative)
        grid = (qmin, qmax)
        if new_min is not None:
            qmin, qmax = new_min, new_max
            shifted.add(node)
            x = _shift_constant(gm, x)
            if isinstance(zp, fx.Node):
                zp = _shift_zero_point(gm, node, zp)
        if axis is None:
            target = ops.quantize_per_tensor.default if is_q else ops.dequantize_per_tensor.default
            if is_q:
                qmin, qmax = _narrow_to_grid(gm, node, grid, storage, 128 if node in shifted else 0, shifted,
                                             node in on_grid)
            node.args = (x, scale, zp, qmin, qmax, storage)
        else:
            target = ops.quantize_per_channel.default if is_q else ops.dequantize_per_channel.default
            node.args = (x, scale, zp, axis, qmin, qmax, storage)
        node.target = target
        node.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return gm


def export_onnx(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | os.PathLike,
                *, dynamic_batch: bool = True, opset: int | None = None,
                unsigned_activations: bool = True, unsigned_weights: bool | None = None,
                timings: dict[str, float] | None = None) -> Path:
    """Export a frozen graph (QDQ) or a float model (fp32) to ONNX.

    A graph is translated by torch's ONNX translator without ``torch.onnx.export``'s two re-traces
    (:func:`~quantbench.engine.translate.to_onnx`: the same ONNX graph, a fraction of the time);
    a graph that cannot be, and a module that is not a graph, go through ``torch.onnx.export``.

    Args:
        model: a frozen GraphModule from :meth:`ModelQuantizer.freeze`, or any
            float module / captured graph.
        example_inputs: example tensors (batch >= 2 when ``dynamic_batch``).
        path: the ``.onnx`` file to write (parent folders are created).
        dynamic_batch: a symbolic batch dimension; False fixes it to the example's.
        opset: ONNX opset (default: the exporter's).
        unsigned_activations: write int8 (and int4) activations as uint8 with
            zero point + 128 (exact; what onnxruntime's x86 integer kernels
            take). False keeps int8 activations in the file (e.g. for NPU
            toolchains; onnxruntime then leaves some convs in float).
        unsigned_weights: write the int8 weights of convs, linears and matmuls
            as uint8 with zero point + 128 (exact), so that onnxruntime runs
            its U8U8 kernels, which cannot saturate. None (default):
            :func:`default_unsigned_weights`, True on an x86 CPU without VNNI,
            where its U8S8 kernels saturate and drift from the graph.
        timings: a dict that gets the seconds of each stage added (``prepare``: the Q/DQ graph;
            ``fake_values``, ``registry``, ``retrace``, ``translate``: see
            :func:`~quantbench.engine.translate.to_onnx`, or ``torch_onnx_export`` where the
            exporter runs; ``optimize``; ``write``: one DQ per consumer, checked, saved).

    Returns:
        The path written.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"export_onnx needs the frozen GraphModule of ModelQuantizer.freeze (or a float "
                           f"nn.Module), got {type(model).__name__}")
    example_inputs = example_tuple(example_inputs, "export_onnx")  # a single tensor or a list is fine too
    if not isinstance(path, (str, os.PathLike)):
        raise CaptureError(f"export_onnx: path={path!r} must be a file path (str or pathlib.Path) of the .onnx to write")
    check_finite_qdq(model, "export_onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timings = {} if timings is None else timings
    if unsigned_weights is None and isinstance(model, fx.GraphModule):
        unsigned_weights = default_unsigned_weights()
    onnx_model = None
    if isinstance(model, fx.GraphModule):
        with timed(timings, "prepare"):
            prepared = _prepare(model, unsigned_activations, unsigned_weights)
        try:
            onnx_model = to_onnx(prepared, example_inputs, dynamic_batch=dynamic_batch, opset=opset,
                                 translations=EXPORT_TRANSLATIONS, timings=timings)
        except Untranslatable as why:
            log.debug("export_onnx: %s; torch.onnx.export instead", why)
    if onnx_model is None:
        if isinstance(model, fx.GraphModule):  # to_onnx rewrote its copy: a fresh one
            model = _prepare(model, unsigned_activations, unsigned_weights)
        with timed(timings, "torch_onnx_export"):
            onnx_model = _torch_onnx_export(model, example_inputs, dynamic_batch, opset)
    with timed(timings, "optimize"):
        _light_optimize(onnx_model)
    with timed(timings, "write"):
        _write(onnx_model, path)
    return path


def _prepare(gm: fx.GraphModule, unsigned_activations: bool, unsigned_weights: bool) -> fx.GraphModule:
    """A copy of a frozen graph in the exporter's terms: Q/DQ ops, integer kernels expanded."""
    prepared = _swap_to_decomposed(sink_dequantize(expand_integer_kernels(copy_graph(gm))), unsigned_activations,
                                   unsigned_weights)
    prepared.training = False  # exported graphs refuse .eval(); the flag is what the exporter reads
    return prepared


def _torch_onnx_export(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_batch: bool,
                       opset: int | None):
    """``torch.onnx.export`` itself (``torch.export``, its decompositions, the translation): an ``onnx_ir`` model."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = batch_dim()
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)
    kwargs = {"opset_version": opset} if opset is not None else {}
    try:
        with quiet_pytree_copies():  # the exporter copies the program's pytree specs (see there)
            program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, dynamic_shapes=dynamic_shapes,
                                        external_data=False, verbose=False, optimize=False,
                                        custom_translation_table=EXPORT_TRANSLATIONS, **kwargs)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {first})") from exc
    return program.model


def _write(onnx_model, path: Path) -> None:
    """One DequantizeLinear per consumer, ``onnx.checker``, one write (the proto never re-read from disk)."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(onnx_model)
    unique_dequantize_per_consumer(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _light_optimize(model) -> None:
    """The exporter's clean-up without its pattern rewriter (in place, an ``onnx_ir`` model).

    Inline functions, fold constants (``chunk`` exports as SplitToSequence / SequenceAt, which
    folding turns into one Split), drop dead nodes, lift constants to initializers and share
    identical ones. The exporter's default optimizer adds a rewrite pass whose pattern matching
    grows with the graph: half of a transformer's export time, for nothing onnxruntime does not
    do itself at session start.
    """
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as optimizer

    optimizer.inline(model)
    optimizer.fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.DeduplicateInitializersPass()(model)
    common.RemoveUnusedNodesPass()(model)


def unique_dequantize_per_consumer(model: onnx.ModelProto) -> int:
    """Give every consumer of a DequantizeLinear its own copy (in place); returns copies made.

    The exporter's optimiser merges identical DequantizeLinear nodes, so a
    tensor read by a conv and by a residual add ends up behind one shared DQ.
    onnxruntime fuses ``DQ -> Conv -> Q`` into an integer kernel only when the
    DQ has a single consumer: the QDQ format wants one DQ per consumer.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    new_nodes = []
    copies = 0
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        for k, user in enumerate(users[1:] if node.output[0] not in outputs else users, start=1):
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = f"{node.name}_dup{k}"
            clone.output[0] = f"{node.output[0]}_dup{k}"
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = clone.output[0]
            new_nodes.append(clone)
            copies += 1
    if copies:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return copies


_GEMM_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (0, 1)}


def signed_weights(model: onnx.ModelProto) -> int:
    """Store every uint8 GEMM weight as int8 (in place): the inverse of ``unsigned_weights``; returns how many.

    A DequantizeLinear of a uint8 initializer read by a Conv / Gemm / MatMul as its weight reads
    ``q - 128`` in int8 with zero point ``z - 128`` instead: the same real values. OpenVINO runs
    int8 weights in its integer kernels and leaves uint8 ones in float; onnxruntime on a CPU
    without VNNI wants uint8 (:func:`default_unsigned_weights`): one exported file serves both.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    made: dict[str, str] = {}  # uint8 initializer -> its int8 copy
    count = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        w, z = inits.get(node.input[0]), inits.get(node.input[2])
        users = consumers.get(node.output[0], [])
        if (w is None or z is None or w.data_type != onnx.TensorProto.UINT8
                or z.data_type != onnx.TensorProto.UINT8 or not users
                or not all(k in _GEMM_WEIGHT_INPUTS.get(u.op_type, ()) for u, k in users)):
            continue
        for pos, t in ((0, w), (2, z)):
            if t.name not in made:
                signed = (numpy_helper.to_array(t).astype("int16") - 128).astype("int8")
                made[t.name] = f"{t.name}_s8"
                graph.initializer.append(numpy_helper.from_array(signed, made[t.name]))
            node.input[pos] = made[t.name]
        count += 1
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count
