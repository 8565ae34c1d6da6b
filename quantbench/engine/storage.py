"""How the integers of a QDQ graph are stored in ONNX: exact on every runtime and CPU.

The export (:mod:`quantbench.engine.export`) asks this module, node by node, which storage type and
zero point each QuantizeLinear / DequantizeLinear gets:

* int8 activations as uint8 with zero point + 128 (:func:`activation_storage`): the same integers
  shifted, what onnxruntime's x86 integer kernels take; a ReLU's output between integer GEMMs as
  uint8 on 0..127 instead (:func:`nonnegative_activations`), where the QuantizeLinear's saturation
  at 0 is the ReLU;
* GEMM weights int8, or uint8 + 128 on a CPU whose U8S8 kernels saturate
  (:func:`default_unsigned_weights`), and back (:func:`signed_weights`, what OpenVINO reads);
* a grid narrower than its storage (int4, uint4) as QuantizeLinear to 8 bits and an integer Clip
  (:func:`narrow_to_grid`), left out where the readers clamp within the grid anyway (:func:`on_grid`);
* constants and per-channel zero points shifted alike (:func:`shift_constant`, :func:`shift_zero_point`).
"""

from __future__ import annotations

import platform

import onnx
import torch
from torch import fx

from quantbench.engine.graph import get_attr_tensor, op_name, set_attr_tensor
from quantbench.engine.machine import describe
from quantbench.engine.ops import op_kind, ops_of_kind, ops_tagged
from quantbench.engine.passes.integer import int_clamp
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES

__all__ = ["MOVEMENT_KINDS", "ONNX_ACTIVATION_DTYPES", "ONNX_ACTIVATION_STORAGE", "activation_storage",
           "default_unsigned_weights", "is_dq", "narrow_to_grid", "nonnegative_activations", "on_grid",
           "shift_constant", "shift_zero_point", "signed_weights"]


# Storage types that QuantizeLinear (opset <= 20) writes: an activation grid stored in one of them is
# exported exactly, a narrower grid (int4 [-8, 7], uint4 [0, 15]) as QuantizeLinear + an integer Clip.
ONNX_ACTIVATION_STORAGE = ("int8", "uint8")


ONNX_ACTIVATION_DTYPES = frozenset(name for name, t in DTYPES.items() if t.storage_name in ONNX_ACTIVATION_STORAGE)
"""Activation dtypes the export expresses exactly: int8, uint8, and int4 / uint4 (narrowed by a Clip)."""


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
    is :func:`nonnegative_activations` (a ReLU's, on [0, 127]) cannot: 2 x 128 x 128 fits int16."""
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


def nonnegative_activations(gm: fx.GraphModule) -> set[fx.Node]:
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
                elif op_kind(user) in MOVEMENT_KINDS and not any(
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


def activation_storage(node: fx.Node, dtype: str, zp, unsigned_activations: bool,
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


def shift_constant(gm: fx.GraphModule, x: fx.Node) -> fx.Node:
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


MOVEMENT_KINDS = ("passthrough", "tuple_passthrough", "shared")


def is_dq(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is dequantize


def on_grid(q: fx.Node) -> bool:
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
    return is_dq(x) and tuple(x.args[1:7]) == tuple(q.args[1:7])


def narrow_to_grid(gm: fx.GraphModule, node: fx.Node, grid: tuple[int, int], storage: torch.dtype, offset: int,
                    shifted: set[fx.Node], grid_ready: bool) -> tuple[int, int]:
    """A quantize to a grid narrower than its storage (int4 [-8, 7] in int8, uint4 [0, 15] in uint8):
    QuantizeLinear to the full storage type, which saturates there, then an integer ``Clip`` to the
    grid, ``clamp(sat_8bit(v), qmin, qmax) == clamp(v, qmin, qmax)`` bit for bit (the ranges nest).
    The Clip is inserted after ``node`` and read in its place (shifted like it), unless ``grid_ready``
    (:func:`on_grid`). Returns the range the QuantizeLinear itself saturates to."""
    info = torch.iinfo(storage)
    lo, hi = grid[0] + offset, grid[1] + offset
    if (lo, hi) == (info.min, info.max) or grid_ready:
        return info.min, info.max
    with gm.graph.inserting_after(node):
        clip = gm.graph.call_function(torch.ops.quantbench.int_clip.default, (node, lo, hi))
    clip.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(clip, delete_user_cb=lambda user: user is not clip)
    if offset:
        shifted.add(clip)
    return info.min, info.max


def shift_zero_point(gm: fx.GraphModule, node: fx.Node, zp: fx.Node) -> fx.Node:
    """A per-channel zero point tensor moved to the uint8 grid (+ 128), as a new constant."""
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(set_attr_tensor(
            gm, f"{zp.target}_u8", get_attr_tensor(gm, zp.target).to(torch.int32) + 128, param=False))


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
