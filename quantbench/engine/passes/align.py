"""Alignment passes: fit a fake-quant graph to a power-of-two NPU target (``freeze(target="npu_pow2")``).

The targets, their arithmetic and the check live in :mod:`quantbench.engine.targets`.

They run on the fake-quant copy that :func:`~quantbench.engine.passes.freeze.freeze_graph`
is about to bake, not on the baked graph, for two reasons: the float weights
and biases are still there, so a weight or bias that gets a new position is
quantized once from float (requantizing baked integers would round twice),
and every tensor group is one quantizer module called at each of its sites,
so moving a group's position moves all of its sites together.

Each pass takes and returns the GraphModule (rewritten in place; freeze works
on a copy), says what holds before and after, is idempotent, and ends with
``graph.lint()`` and ``recompile()``. :func:`align_to_target` runs the
rewrites once and the alignment passes to a fixed point: moving a position
to fix one op can move another op's shift out of range.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from quantbench.engine.errors import HardwareError
from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import constant_value, finish_graph, op_name
from quantbench.engine.ops import op_kind, ops_tagged
from quantbench.engine.spec import QuantizationSpec
from quantbench.engine.targets import (
    BINARY_RULES,
    NPU_POOL_OPS,
    SHARED_KINDS,
    HardwareTarget,
    avg_pool_factor,
    check_hardware,
    get_target,
    is_pow2,
    npu_avg_pool2d,
    npu_global_avg_pool,
    npu_hardsigmoid,
    operands,
    quant_of,
)

__all__ = [
    "to_static_pow2_quantizers", "replace_sigmoid_with_hardsigmoid", "replace_silu_with_hardswish",
    "rewrite_avg_pools", "align_concat_scales", "align_pool_scales", "constrain_shift_read",
    "constrain_shift_write", "constrain_shift_cut", "constrain_shift_bias", "REWRITE_PASSES", "ALIGN_PASSES",
    "align_to_target",
]

log = logging.getLogger(__name__)

aten = torch.ops.aten
MAX_ROUNDS = 8


def _static(spec: QuantizationSpec, role: str, name: str, scale: torch.Tensor) -> FakeQuantize:
    mod = FakeQuantize(spec.replace(learnable="none"), role, name)
    mod.scale = scale.detach().float().clone()
    mod.zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    mod.observer_enabled, mod.fake_quant_enabled = False, True
    return mod


def _pow2_bias(gm: fx.GraphModule, node: fx.Node, derived: DerivedBiasFakeQuantize,
               dtype: str) -> FakeQuantizeBase:
    """An own power-of-two quantizer for a bias, its non-overflow scale set from the float bias."""
    bias = constant_value(gm, node.args[0])
    if dtype == "int32" or bias is None:
        return derived
    mod = FakeQuantize(QuantizationSpec(dtype=dtype, scale_type="pow2"), "const", derived.name)
    mod(bias.detach().float())
    mod.update_qparams()
    mod.observer_enabled, mod.fake_quant_enabled = False, True
    return mod


def to_static_pow2_quantizers(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Make every quantizer a static one holding its current power-of-two scale.

    Before: quantizer modules of any kind (static, LSQ, TQT, derived int32
    bias). After: each is a :class:`FakeQuantize` with observer off holding
    the scale freeze would bake, so later passes can move its position; a
    derived int32 bias becomes, for an ``int8`` ``bias_dtype``, an own pow2
    bias quantizer with the non-overflow scale of the float bias. Idempotent.

    Raises:
        HardwareError: naming the first quantizer (graph order) whose scale is
            not a power of two.
    """
    hw = get_target(target)
    new: dict[int, FakeQuantizeBase] = {}
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, FakeQuantizeBase) or id(mod) in new:
            continue
        if isinstance(mod, DerivedBiasFakeQuantize):
            new[id(mod)] = _pow2_bias(gm, node, mod, hw.bias_dtype)
            continue
        scale = mod.qparams()[0]
        if not is_pow2(scale):
            raise HardwareError(
                f"freeze(target={hw.name!r}) needs power-of-two scales, but quantizer '{node.target}' "
                f"({mod.name}) has scale {float(scale.reshape(-1)[0]):.6g}; quantize with a pow2 preset "
                "(e.g. presets.get('int8_pow2'))")
        new[id(mod)] = _static(mod.spec, mod.role, mod.name, scale) if type(mod) is not FakeQuantize else mod
        new[id(mod)].observer_enabled = False  # freeze bakes what the scale is now
    for name, mod in list(gm.named_children()):
        if id(mod) in new and new[id(mod)] is not mod:
            setattr(gm, name, new[id(mod)])
    for mod in new.values():
        if isinstance(mod, DerivedBiasFakeQuantize):
            act, weight = mod.sources
            mod.__dict__["_act"], mod.__dict__["_weight"] = new.get(id(act), act), new.get(id(weight), weight)
    return finish_graph(gm)


def replace_sigmoid_with_hardsigmoid(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Compute sigmoid and hardsigmoid as the NPU does (:func:`~quantbench.engine.targets.npu_hardsigmoid`).

    Before: ``aten.sigmoid`` / ``aten.hardsigmoid`` nodes. After: calls of
    ``npu_hardsigmoid`` on the same input, output quantizer unchanged (the
    NPU has no sigmoid; the hard form stays within [0, 1.0002]). A no-op for
    targets without ``hard_activations``. Idempotent.
    """
    if not get_target(target).hard_activations:
        return gm
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) in ops_tagged("sigmoid_like"):
            node.target, node.args, node.kwargs = npu_hardsigmoid, (node.args[0],), {}
    return finish_graph(gm)


def replace_silu_with_hardswish(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Compute SiLU and hardswish as the NPU does: ``x * Q(npu_hardsigmoid(x))``.

    Before: ``aten.silu`` / ``aten.hardswish`` nodes. After: a multiply of the
    input by its NPU hardsigmoid, which the NPU holds as int8 at position
    ``target.hardsigmoid_pos`` (a new quantizer) when the input is quantized;
    the output quantizer is unchanged. A no-op for targets without
    ``hard_activations``. Idempotent (no SiLU is left).
    """
    hw = get_target(target)
    if not hw.hard_activations:
        return gm
    spec = QuantizationSpec(dtype="int8", scale_type="pow2")
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_name(node) not in ops_tagged("swish_like"):
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            gate = gm.graph.call_function(npu_hardsigmoid, (x,))
            if quant_of(gm, x) is not None:
                name = f"activation_fq_{node.name}_hardsigmoid"
                gm.add_submodule(name, _static(spec, "activation", name, torch.tensor(2.0 ** -hw.hardsigmoid_pos)))
                gate = gm.graph.call_module(name, (gate,))
            product = gm.graph.call_function(aten.mul.Tensor, (x, gate))
        product.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
    return finish_graph(gm)


def _spatial_shape(node: fx.Node) -> tuple[int, ...] | None:
    while isinstance(node, fx.Node):
        val = node.meta.get("val")
        if val is not None:
            return tuple(int(d) for d in val.shape)
        node = node.args[0] if node.op == "call_module" and node.args else None
    return None


def _pair(v) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(v[0]), int(v[-1])]


def _npu_pool_call(node: fx.Node) -> tuple | None:
    """(function, args) computing an average pool node as the NPU does, or None if it cannot."""
    name, x = op_name(node), node.args[0]
    shape = _spatial_shape(x)
    if shape is None or len(shape) != 4:
        return None
    if name == "mean":
        if len(node.args) < 2:
            return None  # a mean over every element is no pooling
        dims = sorted(int(d) % 4 for d in node.args[1])
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if dims != [2, 3] or node.kwargs.get("dtype") is not None:
            return None
        return npu_global_avg_pool, (x, [2, 3], keepdim, *avg_pool_factor(*shape[2:], table=False))
    if name == "adaptive_avg_pool2d":
        out = _pair(node.args[1])
        if out == [1, 1]:
            return npu_global_avg_pool, (x, [2, 3], True, *avg_pool_factor(*shape[2:]))
        if shape[2] % out[0] or shape[3] % out[1]:
            return None
        kernel = [shape[2] // out[0], shape[3] // out[1]]
        return npu_avg_pool2d, (x, kernel, kernel, [0, 0], *avg_pool_factor(*kernel))
    args = list(node.args) + [None] * (7 - len(node.args))
    kernel = _pair(args[1])
    stride = _pair(args[2]) if args[2] else kernel
    padding = _pair(args[3]) if args[3] is not None else [0, 0]
    if args[4] or args[6] is not None:
        return None  # ceil_mode windows and divisor overrides have no fixed NPU divisor
    return npu_avg_pool2d, (x, kernel, stride, padding, *avg_pool_factor(*kernel))


def rewrite_avg_pools(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Compute average pools as the NPU does: window sum times ``multiplier / 2^shift``.

    Before: ``avg_pool2d``, ``adaptive_avg_pool2d`` (output size dividing the
    input) and ``mean`` over H, W of 4-D tensors. After: calls of
    ``npu_avg_pool2d`` / ``npu_global_avg_pool`` with the factor of
    :func:`~quantbench.engine.targets.avg_pool_factor` (e.g. 7x7: 21/1024),
    zero padding counted as on the NPU. Other pools are left (and reported by
    ``check_hardware``). Idempotent.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node) not in ops_tagged("avg_pool"):
            continue
        call = _npu_pool_call(node)
        if call is not None:
            node.target, node.args, node.kwargs = call[0], call[1], {}
    return finish_graph(gm)


def _merge_quantizers(gm: fx.GraphModule, names: list[str]) -> bool:
    """Make every call of the quantizers ``names`` use the first one, at the widest (coarsest) scale."""
    names = list(dict.fromkeys(names))
    mods = [gm.get_submodule(n) for n in names]
    if len(names) < 2 or any(type(m) is not FakeQuantize or m.spec != mods[0].spec for m in mods):
        return False
    keep = mods[0]
    keep.scale = torch.stack([m.scale for m in mods]).amax(0)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names[1:]:
            node.target = names[0]
    for mod in gm.modules():
        if isinstance(mod, DerivedBiasFakeQuantize) and any(mod.sources[0] is m for m in mods[1:]):
            mod.__dict__["_act"] = keep
    gm.delete_all_unused_submodules()
    return True


def _align(gm: fx.GraphModule, wanted) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not wanted(node):
            continue
        ops = operands(gm, node)
        quants = [q for q in [*ops.inputs, ops.output] if q is not None]
        if ops.output is not None and len(quants) > 1 and all(q.module is not None for q in quants):
            _merge_quantizers(gm, [ops.output.name if op_name(node) == "cat" else quants[0].name,
                                   *(q.name for q in quants)])
    return finish_graph(gm)


def align_concat_scales(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Give a concat's inputs and output one quantizer, at the widest of their scales.

    Before: concat groups are shared by annotation, except where a mixed
    config left an input its own quantizer. After: every ``cat`` reads and
    writes one quantizer module. Idempotent.
    """
    return _align(gm, lambda n: op_name(n) == "cat")


def align_pool_scales(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Give pools, slices, reshapes and other value-preserving ops their input's quantizer.

    Before: max pool / reshape / slice share their input's group by
    annotation; an (NPU) average pool has its own output quantizer. After:
    each such op's output uses its input's quantizer module, at the wider of
    the two scales (an average never exceeds its input's range, so that is
    the input's). Idempotent.
    """
    def wanted(node: fx.Node) -> bool:
        return (op_kind(node) in SHARED_KINDS or op_name(node) in NPU_POOL_OPS) and op_name(node) != "cat"

    return _align(gm, wanted)


def _move(q, pos: torch.Tensor, ops, constraint: str) -> None:
    before = q.pos
    if q.set_pos(pos):
        log.debug("%s of %s: position of '%s' %s -> %s", constraint, ops.node.name, q.name,
                  before.tolist(), q.pos.tolist())


def _binary_ops(gm: fx.GraphModule, rule: str):
    """The fully quantized elementwise ops that the NPU constrains by ``rule`` (:data:`BINARY_RULES`)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and rule in BINARY_RULES.get(op_name(node), ()):
            ops = operands(gm, node)
            if ops.output is not None and ops.inputs and all(q is not None for q in ops.inputs):
                yield ops


def constrain_shift_read(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Bring ``max(pos_in) - min(pos_in)`` of every add / sub within ``target.add_read``.

    Before: any positions. After: the finest input of an out-of-range add is
    coarsened to ``min(pos_in) + high`` (its range grows, nothing clips).
    Idempotent.
    """
    hw = get_target(target)
    for ops in _binary_ops(gm, "shift_read"):
        pos = [float(q.pos.max()) for q in ops.inputs]
        if max(pos) - min(pos) > hw.add_read[1] and ops.inputs[pos.index(max(pos))].settable:
            _move(ops.inputs[pos.index(max(pos))], torch.tensor(min(pos) + hw.add_read[1]), ops, "shift_read")
    return finish_graph(gm)


def constrain_shift_write(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Bring the write shift of every add (``min(pos_in) - pos_out``) and mul (``sum(pos_in) - pos_out``) in range.

    Before: any positions. After: an out-of-range output position is moved
    to the nearest end of ``target.add_write`` / ``target.mul_write`` (the
    output is requantized; its inputs keep their grids). Idempotent.
    """
    hw = get_target(target)
    for ops in _binary_ops(gm, "shift_write"):
        pos = [q.pos.max() for q in ops.inputs]
        base, (lo, hi) = (min(pos), hw.add_write) if ops.op == "add" else (sum(pos), hw.mul_write)
        shift = base - ops.output.pos
        if ops.output.settable and not lo <= float(shift) <= hi:
            _move(ops.output, base - shift.clamp(lo, hi), ops, "shift_write")
    return finish_graph(gm)


def _weighted_ops(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) in ops_tagged("integer_kernel"):
            ops = operands(gm, node)
            if ops.output is not None and len(ops.inputs) > 1 and None not in ops.inputs[:2]:
                yield ops


def constrain_shift_cut(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Bring ``shift_cut = pos_w + pos_in - pos_out`` of every conv / linear within ``target.shift_cut``.

    Before: any positions. After: the weight position (per channel for
    per-channel weights) is moved so the shift lands on the nearest end of
    the range; freeze then quantizes the float weights with the new scale (a
    coarser one loses small weights, a finer one clips large ones, as on the
    NPU). Idempotent.
    """
    hw = get_target(target)
    lo, hi = hw.shift_cut
    for ops in _weighted_ops(gm):
        x, w, y = ops.inputs[0], ops.inputs[1], ops.output
        if w.settable:
            _move(w, (w.pos + x.pos - y.pos).clamp(lo, hi) + y.pos - x.pos, ops, "shift_cut")
    return finish_graph(gm)


def constrain_shift_bias(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Bring ``shift_bias = pos_w + pos_in - pos_bias`` of every conv / linear in range.

    Before: any positions (run after :func:`constrain_shift_cut`, whose shift
    sets the lower bound). After: the bias position is the nearest one that
    keeps every channel's shift in ``target.shift_bias_range``; freeze
    quantizes the float bias with it. A derived int32 bias always has
    ``shift_bias = 0`` and is left alone. Idempotent.
    """
    hw = get_target(target)
    for ops in _weighted_ops(gm):
        x, w, y = ops.inputs[0], ops.inputs[1], ops.output
        b = ops.inputs[2] if len(ops.inputs) > 2 else None
        if b is None or not b.settable:
            continue
        lo, hi = hw.shift_bias_range(w.pos + x.pos - y.pos)
        acc = w.pos + x.pos
        low, high = float((acc - hi).max()), float((acc - lo).min())
        _move(b, b.pos.clamp(low, max(low, high)), ops, "shift_bias")
    return finish_graph(gm)


REWRITE_PASSES = (to_static_pow2_quantizers, replace_sigmoid_with_hardsigmoid, replace_silu_with_hardswish,
                  rewrite_avg_pools)
ALIGN_PASSES = (align_concat_scales, align_pool_scales, constrain_shift_read, constrain_shift_write,
                constrain_shift_cut, constrain_shift_bias)


def align_to_target(gm: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> fx.GraphModule:
    """Run :data:`REWRITE_PASSES` once, then :data:`ALIGN_PASSES` until ``check_hardware`` finds nothing.

    Before: a fake-quant graph with pow2 scales. After: the same graph with
    the NPU's forms and positions; what is left (e.g. an adaptive pool whose
    windows differ in size) is logged as a warning.
    """
    hw = get_target(target)
    for p in REWRITE_PASSES:
        gm = p(gm, hw)
    for _ in range(MAX_ROUNDS):
        for p in ALIGN_PASSES:
            gm = p(gm, hw)
        left = check_hardware(gm, hw)
        if not left:
            return gm
    log.warning("%d constraint(s) of %s still violated after freeze, first: %s", len(left), hw.name, left[0])
    return gm
