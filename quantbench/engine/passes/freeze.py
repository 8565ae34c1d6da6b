"""Freeze: fake-quant graph -> plain GraphModule of integer tensors and Q/DQ calls.

Before: a graph from :meth:`ModelQuantizer.quantize_model` whose quantizer
modules hold scales (calibrated or learned). After: no quantizer modules;
each activation quantizer call is a :func:`quantbench.engine.qdq.quantize` /
:func:`~quantbench.engine.qdq.dequantize` pair with the scale baked in;
weights, constants and biases are integer buffers (int8 / int4-in-int8 /
int32) read through ``dequantize``. The float weights are gone. Freezing a
frozen graph is a no-op (there are no quantizers left).

Targets: ``ort`` bakes the scales as they are (generic QDQ for onnxruntime,
int32 bias); a hardware target (a name of
:data:`quantbench.engine.targets.TARGETS`, e.g. ``npu_pow2``, or a
:class:`~quantbench.engine.targets.HardwareTarget`) first aligns the
fake-quant copy to that power-of-two NPU
(:func:`~quantbench.engine.passes.align.align_to_target`: its shift ranges,
shared scales, int8 bias, average pool and hardsigmoid arithmetic), then
bakes it the same way.
"""

from __future__ import annotations

import torch
from torch import fx

from quantbench.engine.fake_quant import FakeQuantizeBase
from quantbench.engine.finite import check_finite_quantizers
from quantbench.engine.graph import copy_graph, get_attr_tensor, set_attr_tensor
from quantbench.engine.ops import op_kind
from quantbench.engine.passes.align import align_to_target
from quantbench.engine.passes.integer import fuse_integer_kernels
from quantbench.engine.passes.nonlinear import fuse_nonlinear_kernels
from quantbench.engine.passes.qat_bn import fold_qat_batchnorm
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.targets import TARGETS, HardwareTarget, get_target
from quantbench.registry import UnknownNameError, suggest

__all__ = ["freeze_graph", "bake_quantizers", "freeze_targets"]


def freeze_targets() -> list[str]:
    """The target names :func:`freeze_graph` takes: ``ort`` and every registered hardware target."""
    return ["ort", *TARGETS.list()]


def _qdq_args(gm: fx.GraphModule, mod: FakeQuantizeBase, base: str) -> tuple:
    scale, zp = mod.qparams()
    spec = mod.spec
    if scale.dim() == 0:
        s_arg, z_arg, axis = float(scale), int(zp), None
    else:
        axis = 0 if mod.role == "bias" else spec.ch_axis
        s_arg = gm.graph.get_attr(set_attr_tensor(gm, f"{base}_scale", scale.float(), param=False))
        z_arg = gm.graph.get_attr(set_attr_tensor(gm, f"{base}_zero_point", zp.to(torch.int32), param=False))
    return s_arg, z_arg, axis, spec.qmin, spec.qmax, spec.dtype, spec.round_method


def _movement_chain(node: fx.Node) -> list[fx.Node] | None:
    """The value-preserving ops (reshape, expand, ...) from ``node`` up to a constant, or None."""
    chain = []
    while node.op == "call_function" and op_kind(node) == "passthrough" and node.args \
            and isinstance(node.args[0], fx.Node) \
            and not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        chain.append(node)
        node = node.args[0]
    return chain if chain and node.op == "get_attr" else None


def bake_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every quantizer call by baked integers / Q-DQ calls (in place)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, FakeQuantizeBase):
            continue
        src = node.args[0]
        base = f"{node.name}"
        chain = _movement_chain(src) if mod.spec.qscheme == "per_tensor" else None
        with graph.inserting_before(node):
            args = _qdq_args(gm, mod, base)
            if chain:
                # A constant behind reshapes / expands (a class token): quantize the constant, move integers.
                root = chain[-1].args[0]
                tensor = get_attr_tensor(gm, root.target).detach().float()
                q = quantize(tensor, *args)
                moved = graph.get_attr(set_attr_tensor(gm, f"{base}_int", q, param=False))
                for step in reversed(chain):
                    moved = graph.call_function(step.target, (moved, *step.args[1:]), dict(step.kwargs))
                out = graph.call_function(dequantize, (moved, *args))
            elif src.op == "get_attr":
                # Constant: quantize now, keep only the integer tensor.
                tensor = get_attr_tensor(gm, src.target).detach().float()
                s, z, axis = args[0], args[1], args[2]
                if isinstance(s, fx.Node):
                    s, z = get_attr_tensor(gm, s.target), get_attr_tensor(gm, z.target)
                q = quantize(tensor, s, z, axis, *args[3:])
                qnode = graph.get_attr(set_attr_tensor(gm, f"{base}_int", q, param=False))
                out = graph.call_function(dequantize, (qnode, *args))
            else:
                q = graph.call_function(quantize, (src, *args))
                out = graph.call_function(dequantize, (q, *args))
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    return gm


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(recurse=False)]:
        if name not in used:
            delattr(gm, name)
    for name in [n for n, _ in gm.named_buffers(recurse=False)]:
        if name not in used:
            delattr(gm, name)
    for mod_name, mod in list(gm.named_children()):
        if mod_name == "_guards_fn":
            continue
        if not any(t == mod_name or t.startswith(mod_name + ".") for t in used) and not list(mod.children()):
            if not any(n.op == "call_module" and n.target == mod_name for n in gm.graph.nodes):
                delattr(gm, mod_name)


def freeze_graph(qmodel: fx.GraphModule, target: str | HardwareTarget = "ort") -> fx.GraphModule:
    """A frozen copy of ``qmodel`` for the given target (see module docstring).

    ``target`` is a name of :func:`freeze_targets` or a
    :class:`~quantbench.engine.targets.HardwareTarget` (e.g. an NPU variant
    with an int32 bias).

    Raises:
        UnknownNameError: an unknown target name (a ``ValueError``; the message lists close matches).
    """
    if not isinstance(target, HardwareTarget) and target not in freeze_targets():
        raise UnknownNameError(suggest(str(target), freeze_targets(), "freeze target"))
    check_finite_quantizers(qmodel, "freeze")
    frozen = copy_graph(qmodel)
    frozen = fold_qat_batchnorm(frozen)
    if target != "ort":
        frozen = align_to_target(frozen, get_target(target))
    frozen = bake_quantizers(frozen)
    frozen = fuse_integer_kernels(frozen)
    frozen = fuse_nonlinear_kernels(frozen)
    frozen.meta["qb_frozen_target"] = get_target(target).name if target != "ort" else target
    return frozen
