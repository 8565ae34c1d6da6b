"""An export-ready graph to an ONNX model with torch's own translator, without re-tracing all of it.

``torch.onnx.export(dynamo=True)`` runs ``torch.export`` on the module it is given, then
``run_decompositions`` over the whole program: two full traces (proxy tensors, functionalization)
of a graph that is ATen already, some 10 ms a node and three quarters of the export time of a small
CNN. What the translation reads is only the program's nodes, their fake values and its signature.
So :func:`to_onnx` gives it exactly those:

* fake values through the graph in one ``FakeTensorMode`` run, the batch dimension a symbol with
  the range ``torch.export.Dim("batch", min=1, max=65536)`` gives it;
* every node that neither trace changes (an op registered with the translator, functional, and
  either not CompositeImplicitAutograd or one ``run_decompositions`` preserves) kept as it is; the
  others, the nonlinear kernels (Python functions) and ops such as ``flatten``, ``reshape``, ``to``,
  traced by those same two on a small program of just them (:mod:`quantbench.engine.retrace`);
* the exporter's type-promotion pass where it would insert a cast; the program's signature as
  torch.export writes it (constants lifted, in its order); nodes named as it names them;
* the registry of ONNX functions built for the graph's ops only (the exporter builds and
  signature-checks all of torchlib's, some 500, on every call): the same functions, in the same
  order, for those ops.

The ONNX graph is the exporter's, node for node, but for the integer ops that compute a size which
is a multiple of the batch (``4 * batch`` where the exporter writes ``batch * 2 * 2``). A graph this cannot take raises
:class:`Untranslatable` and :func:`~quantbench.engine.export.export_onnx` runs ``torch.onnx.export``
itself. torch's translator, registry and decomposition helpers have no public entry point short of
``torch.onnx.export``: this module and :mod:`~quantbench.engine.retrace` are the one place that
reaches into them.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import fx

from quantbench.engine.graph import get_attr_tensor
from quantbench.engine.retrace import (
    ASSERTIONS,
    BATCH_RANGE,
    Untranslatable,
    batch_dim,
    bind_batch,
    fake_context,
    propagate,
    retrace,
)

__all__ = ["Untranslatable", "batch_dim", "timed", "to_onnx"]


def to_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, dynamic_batch: bool,
            opset: int | None, translations: dict, timings: dict[str, float] | None = None) -> object:
    """The ``onnx_ir`` model ``torch.onnx.export(gm, ..., optimize=False)`` returns, without its two traces.

    ``gm`` is consumed (its graph is rewritten in place): pass a copy. ``translations`` are the
    custom ONNX functions (``custom_translation_table``). ``timings`` (optional) gets the seconds of
    each stage added: ``fake_values``, ``retrace``, ``registry``, ``translate``. Raises
    :class:`Untranslatable`.
    """
    from torch.onnx._internal.exporter import _flags

    # as inside torch.onnx.export: torch.onnx.is_in_onnx_export() is True while nodes are traced
    run = _flags.set_onnx_exporting_flag(_to_onnx)
    try:
        return run(gm, tuple(example_inputs), dynamic_batch, opset, translations,
                   {} if timings is None else timings)
    except Untranslatable:
        raise
    except Exception as exc:  # whatever the exporter's own path may still handle: it gets the graph
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Untranslatable(f"{type(exc).__name__}: {first}") from exc


def _to_onnx(gm, example_inputs, dynamic_batch, opset, translations, timings):
    """:func:`to_onnx`'s stages, timed (the opsets as ``torch.onnx.export`` picks them)."""
    from torch.onnx import _constants as onnx_constants
    from torch.onnx._internal.exporter import _constants

    opset_version = opset if opset is not None else onnx_constants.ONNX_DEFAULT_OPSET
    registry_opset = max(opset_version, _constants.TORCHLIB_OPSET)
    with timed(timings, "registry"):
        _strip(gm)
        known = _Registered(registry_opset, translations)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        if 2 * sum(not _final(n, known) for n in calls) > len(calls):  # a float graph's BN, in-place ReLUs
            raise Untranslatable("the exporter's traces rewrite most of the graph: as cheap to trace it whole")
    with timed(timings, "fake_values"):
        mode, batch = _fake_inputs(gm, example_inputs, dynamic_batch)
        with fake_context(mode):
            propagate(gm, gm.graph.nodes, mode)
        if batch is not None:
            bind_batch(gm.graph, batch)
        pending = _pending(gm, known)
    with timed(timings, "retrace"):
        if pending:
            retrace(gm, pending, mode, batch, _decomposition_table(known), table_key=known.opset)
        program = _program(gm, batch)
        _promote_types(program.graph_module)
    with timed(timings, "registry"):
        registry = _registry({n.target for n in program.graph.nodes if n.op == "call_function"}, known)
    with timed(timings, "translate"):
        model = _translate(program, registry, opset_version)
        if batch is not None:  # the symbol's name in the file is the Dim's, as torch.onnx.export renames it
            _rename_batch(model, example_inputs)
    return model


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


# -- the graph's fake values ------------------------------------------------------------------------


def _strip(gm: fx.GraphModule) -> None:
    """Drop assertion nodes and the unlifted module's input guard; refuse any other module call."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTIONS:
            gm.graph.erase_node(node)
        elif node.op in ("call_module", "call_method"):
            if node.users or node.op == "call_method":
                raise Untranslatable(f"node {node.name} is a {node.op}")
            gm.graph.erase_node(node)  # _guards_fn: shape checks of the torch module, no value


def _fake_inputs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool):
    """Fake values of the placeholders: the batch (dim 0) one shared symbol when ``dynamic_batch``."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
        StrictMinMaxConstraint,
    )
    from torch.utils._sympy.value_ranges import ValueRanges

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise Untranslatable("the graph's inputs are not the example tensors")
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)  # kernels read module-level tensors
    batch = None
    for node, x in zip(placeholders, example_inputs):
        if not dynamic_batch or x.dim() == 0:
            node.meta["val"] = mode.from_tensor(x, static_shapes=True)
        elif batch is None:
            static = [DimDynamic.STATIC] * (x.dim() - 1)
            context = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC, *static],
                constraint_sizes=[StrictMinMaxConstraint(vr=ValueRanges(*BATCH_RANGE), warn_only=False),
                                  *[None] * len(static)])
            node.meta["val"] = mode.from_tensor(x, source=LocalSource(node.name), symbolic_context=context)
            batch = node.meta["val"].shape[0]
        else:
            if x.shape[0] != example_inputs[0].shape[0] or not x.is_contiguous():
                raise Untranslatable("inputs of different batch sizes, or not contiguous")
            with mode:
                node.meta["val"] = torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return mode, (batch.node.expr if batch is not None else None)


# -- which nodes the exporter's traces would rewrite ----------------------------------------------


class _Registered:
    """Which ops torch's ONNX registry has a function for at an opset (by qualified name, as the
    registry keys them), and their entries, built only for the ops asked about."""

    _metas: dict[tuple[object, int], list] = {}  # (op, registry opset) -> OnnxDecompMeta, per process

    def __init__(self, opset: int, translations: dict) -> None:
        from onnxscript.function_libs.torch_lib import ops as _ops  # noqa: F401  (registers torchlib)
        from onnxscript.function_libs.torch_lib.registration import default_registry
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry

        self.opset = opset
        self.translations = translations
        self.final: dict[object, bool] = {}  # op -> whether its nodes are kept (:func:`_final`)
        self._torchlib = default_registry
        self._internal = [m for m in _torchlib_registry.get_torchlib_ops() if m.opset_introduced <= opset]
        self._internal_names = {m.fx_target.name() for m in self._internal
                                if isinstance(m.fx_target, torch._ops.OpOverload)}

    def __contains__(self, op) -> bool:  # what create_onnx_friendly_decomposition_table asks, of every op
        if op in self.translations:
            return True
        if isinstance(op, torch._ops.OpOverload):  # by name, without building the entries
            return op.name() in self._torchlib or op.name() in self._internal_names
        return bool(self.metas(op))

    def metas(self, op) -> list:
        """``from_torchlib``'s entries for ``op`` (before its per-opset clean-up), in its order."""
        key = (op, self.opset)
        if key not in self._metas:
            self._metas[key] = self._build(op)
        return self._metas[key]

    def _build(self, op) -> list:
        from torch.onnx._internal.exporter import _registration

        if isinstance(op, torch._ops.OpOverload):
            name = op.name()
            found = [m for m in self._internal
                     if isinstance(m.fx_target, torch._ops.OpOverload) and m.fx_target.name() == name]
        elif callable(op) and getattr(op, "__module__", None) in ("_operator", "math"):
            name = f"{op.__module__}::{op.__name__}"
            found = [m for m in self._internal if m.fx_target is op]
            if name in self._torchlib and _registration._get_overload(name) is not op:
                return found
        else:
            return []
        if name in self._torchlib:
            entry = self._torchlib[name]
            for fn, is_complex in [*((f, False) for f in entry.overloads), *((f, True) for f in entry.complex)]:
                found.append(_registration.OnnxDecompMeta(onnx_function=fn, fx_target=op, signature=None,
                                                          is_custom=False, is_complex=is_complex))
        return found


def _final(node: fx.Node, known: _Registered) -> bool:
    """A node both traces keep as it is and the translator takes: a registered functional op,
    not CompositeImplicitAutograd unless ``run_decompositions`` preserves it."""
    from torch._export.utils import _check_valid_to_preserve, _is_cia_op

    op = node.target
    if op is operator.getitem:
        return node.args[0].op != "call_function" or _final(node.args[0], known)
    if op not in known.final:
        if not isinstance(op, torch._ops.OpOverload):
            known.final[op] = op in known  # a builtin on sizes (operator.mul) the registry has a function for
        else:
            known.final[op] = (op in known and not op._schema.is_mutable
                               and (not _is_cia_op(op) or _check_valid_to_preserve(op)))
    return known.final[op]


def _pending(gm: fx.GraphModule, known: _Registered) -> list[fx.Node]:
    """The nodes that are not :func:`_final`, in graph order (a tuple only with the getitems reading it)."""
    pending = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and not _final(node, known):
            if isinstance(node.meta.get("val"), (tuple, list)) and not all(
                    u.target is operator.getitem for u in node.users):
                raise Untranslatable(f"node {node.name}: a tuple read other than by getitem")
            pending.append(node)
    return pending


_TABLES: dict[int, dict] = {}


def _decomposition_table(known: _Registered) -> dict:
    """The exporter's decomposition table (every default decomposition of an op with no ONNX function)."""
    if known.opset not in _TABLES:
        from torch.onnx._internal.exporter import _decomp

        _TABLES[known.opset] = _decomp.create_onnx_friendly_decomposition_table(known)
    return dict(_TABLES[known.opset])


# -- types, signature, translation -----------------------------------------------------------------


def _promote_types(gm: fx.GraphModule) -> None:
    """The exporter's explicit type promotion, run only if some node's inputs would be cast."""
    from torch.onnx._internal.exporter import _fx_passes
    from torch.onnx._internal.fx.passes import type_promotion

    table = type_promotion.TypePromotionTable()
    for node in gm.graph.nodes:
        rule = node.op == "call_function" and type_promotion.get_type_promotion_rule(node, table)
        if rule and _would_promote(node, rule):
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                _fx_passes.insert_type_promotion_nodes(gm)
            return


def _would_promote(node: fx.Node, rule) -> bool:
    """Whether the exporter's ``_maybe_promote_node`` would cast an input of ``node`` (its test, on the values)."""
    from torch.onnx._internal.fx import type_utils

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
    info = rule.preview_type_promotion(args, kwargs)

    def differs(value, dtype) -> bool:
        if dtype is None:
            return False
        if isinstance(value, torch.Tensor):
            return value.dtype != dtype
        if isinstance(value, (tuple, list)):
            return any(differs(v, dtype) for v in value)
        return type_utils.from_scalar_type_to_torch_dtype(type(value)) not in (None, dtype)

    return (any(differs(a, info.args_dtypes.get(i)) for i, a in enumerate(args))
            or any(differs(v, info.kwargs_dtypes.get(k)) for k, v in kwargs.items()))


def _registry(targets: Iterable[object], known: _Registered):
    """``ONNXRegistry.from_torchlib`` cut to ``targets`` (plus the custom translations)."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry()
    registry._opset_version = known.opset
    for op in targets:
        for meta in known.metas(op):
            registry._register(meta.fx_target, meta)
    registry._cleanup_registry_based_on_opset_version()
    for op, function in known.translations.items():
        registry.register_op(op, function, is_complex=False)
    return registry


def _program(gm: fx.GraphModule, batch) -> torch.export.ExportedProgram:
    """``gm`` as the program torch.export makes of it: parameters, buffers and constants lifted to
    placeholders (in that order, before the inputs), nodes named after their ops."""
    from torch.export import graph_signature as sig
    from torch.utils._sympy.value_ranges import ValueRanges

    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    attrs = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr"))
    kinds = {t: "p" if t in params else "b" if t in buffers else "c" for t in attrs}
    attrs.sort(key=lambda t: "pbc".index(kinds[t]))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    lifted = {t: graph.placeholder(f"{kinds[t]}_{t.replace('.', '_').lower()}") for t in attrs}
    input_kind = {"p": sig.InputKind.PARAMETER, "b": sig.InputKind.BUFFER, "c": sig.InputKind.CONSTANT_TENSOR}
    specs = [sig.InputSpec(input_kind[kinds[t]], sig.TensorArgument(ph.name), t,
                           persistent=True if kinds[t] == "b" else None) for t, ph in lifted.items()]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            specs.append(sig.InputSpec(sig.InputKind.USER_INPUT, sig.TensorArgument(env[node].name), None))
        elif node.op == "get_attr":
            env[node] = lifted[node.target]
        elif node.op == "call_function":
            env[node] = graph.create_node("call_function", node.target, *fx.node.map_arg(
                (node.args, node.kwargs), env.__getitem__), name=_node_name(node.target))
        else:
            continue
        env[node].meta.update(node.meta)
        env[node].meta.setdefault("nn_module_stack", {})  # the translator records it (a warning without)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    if not all(isinstance(r, fx.Node) and isinstance(r.meta.get("val"), torch.Tensor) for r in results):
        raise Untranslatable("an output that is not a tensor")
    graph.output(tuple(env[r] for r in results))
    outputs = [sig.OutputSpec(sig.OutputKind.USER_OUTPUT, sig.TensorArgument(env[r].name), None) for r in results]
    state = {t: get_attr_tensor(gm, t) for t in attrs if kinds[t] != "c"}
    constants = {t: get_attr_tensor(gm, t) for t in attrs if kinds[t] == "c"}
    ranges = {batch: ValueRanges(*BATCH_RANGE)} if batch is not None else {}
    call = torch.export.ModuleCallEntry("", torch.export.ModuleCallSignature([], [], None, None))
    return torch.export.ExportedProgram(torch.nn.Module(), graph, sig.ExportGraphSignature(specs, outputs), state,
                                        ranges, [call], constants=constants)


def _node_name(target) -> str | None:
    """torch.export's name for a node calling ``target`` (the op's name without its overload)."""
    if isinstance(target, torch._ops.OpOverload):
        return "sym_size_int" if target is torch.ops.aten.sym_size.int else target.overloadpacket.__name__
    return None


def _translate(program, registry, opset_version: int) -> object:
    """What ``torch.onnx._internal.exporter._core.export`` does after its decompositions (``optimize=False``)."""
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import _core

    model = _core._exported_program_to_onnx_program(program, registry=registry).model
    return onnxscript_apis.convert_version(model, opset_version)


def _rename_batch(model, example_inputs: Sequence[torch.Tensor]) -> None:
    """The batch symbol renamed after the ``Dim`` in every shape, as ``torch.onnx.export`` does."""
    from torch.onnx._internal.exporter import _dynamic_shapes, _ir_passes

    dim = batch_dim()
    shapes = tuple({0: dim} if t.dim() > 0 else None for t in example_inputs)
    _ir_passes.rename_axis(model, _dynamic_shapes.create_rename_mapping(model.graph.inputs, shapes))

