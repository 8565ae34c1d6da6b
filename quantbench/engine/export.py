"""QDQ ONNX export with the translator of the dynamo-based ``torch.onnx.export``.

A frozen graph's :func:`~quantbench.engine.qdq.quantize` /
:func:`~quantbench.engine.qdq.dequantize` calls are swapped for
``quantized_decomposed`` ops, which the exporter translates to ONNX
QuantizeLinear / DequantizeLinear. Integer weights stay integer initializers
feeding DequantizeLinear (what onnxruntime fuses into integer kernels); the
int32 bias keeps scale = input scale x weight scale. An activation grid
narrower than its 8-bit storage (int4 [-8, 7], uint4 [0, 15]: W4A4) is
QuantizeLinear to the storage type followed by an integer ``Clip`` to the grid
(:func:`narrow_to_grid`): the same integers, and onnxruntime still fuses
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
from pathlib import Path

import onnx
import torch
from torch import fx

from quantbench.engine.errors import CaptureError, ExportError, example_tuple
from quantbench.engine.finite import check_finite_qdq
from quantbench.engine.graph import copy_graph, op_name, quiet_pytree_copies
from quantbench.engine.ops import op_kind, ops_tagged
from quantbench.engine.passes.integer import expand_integer_kernels, int_clamp
from quantbench.engine.passes.nonlinear import EXPORT_TRANSLATIONS, NONLINEAR_KERNELS, export_offsets
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES
from quantbench.engine.storage import (
    MOVEMENT_KINDS,
    ONNX_ACTIVATION_DTYPES,
    activation_storage,
    default_unsigned_weights,
    is_dq,
    narrow_to_grid,
    nonnegative_activations,
    on_grid,
    shift_constant,
    shift_zero_point,
)
from quantbench.engine.translate import Untranslatable, batch_dim, timed, to_onnx
from quantbench.quiet import quiet_loggers

__all__ = ["export_onnx", "ExportError", "ONNX_ACTIVATION_DTYPES", "default_unsigned_weights"]

log = logging.getLogger(__name__)


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
    if node.op != "call_function" or not node.args or not is_dq(node.args[0]):
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


def _swap_to_decomposed(gm: fx.GraphModule, unsigned_activations: bool = True,
                        unsigned_weights: bool = False) -> fx.GraphModule:
    ops = _decomposed_ops()
    shifted: set[fx.Node] = set()
    nonnegative = nonnegative_activations(gm) if unsigned_activations else set()
    grid_ready = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is quantize and on_grid(n)}
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
        if node.op == "call_function" and op_kind(node) in MOVEMENT_KINDS and node.args \
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
        storage, zp, new_min, new_max = activation_storage(node, dtype, zp, unsigned_activations, unsigned_weights,
                                                            nonnegative)
        grid = (qmin, qmax)
        if new_min is not None:
            qmin, qmax = new_min, new_max
            shifted.add(node)
            x = shift_constant(gm, x)
            if isinstance(zp, fx.Node):
                zp = shift_zero_point(gm, node, zp)
        if axis is None:
            target = ops.quantize_per_tensor.default if is_q else ops.dequantize_per_tensor.default
            if is_q:
                qmin, qmax = narrow_to_grid(gm, node, grid, storage, 128 if node in shifted else 0, shifted,
                                             node in grid_ready)
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


