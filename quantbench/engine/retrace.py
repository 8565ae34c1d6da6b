"""The nodes ``torch.export`` + ``run_decompositions`` would rewrite, traced by them alone and spliced back.

:func:`~quantbench.engine.translate.to_onnx` keeps every node of the export-ready graph that the
exporter's two traces leave as it is; the others (the nonlinear kernels, which are Python functions;
ops that always decompose, such as ``flatten``, ``reshape``, ``to``) go through those same two
traces here, on a small program of just them, so the ops that come out are the exporter's own. The
program sees what the whole graph's program would: activations as inputs with their strides (a
reshape decomposes by contiguity), a batch dimension that is the export's ``Dim`` or a multiple of
it, constants as buffers; the sizes it reads are read from the graph's input, where a program traced
whole binds them. Also here: the fake values every node carries (``meta["val"]``, what the
translator reads), propagated under the export's fake mode.
"""

from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch
from torch import fx

from quantbench.engine.graph import get_attr_tensor, quiet_pytree_copies, set_attr_tensor

__all__ = ["ASSERTIONS", "BATCH_RANGE", "PROGRAMS_KEPT", "Untranslatable", "batch_dim", "bind_batch", "fake_context", "propagate",
           "retrace"]

BATCH_RANGE = (1, 65536)
"""The range of a dynamic batch dimension (what the export declares as ``torch.export.Dim``)."""

ASSERTIONS = (  # what the exporter drops before translating (torch.onnx's remove_assertion_nodes)
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
)


class Untranslatable(Exception):
    """The graph needs ``torch.onnx.export`` itself (the message says why)."""


def batch_dim() -> torch.export.Dim:
    """The dynamic batch dimension of an export (one object for every input: they share it)."""
    return torch.export.Dim("batch", min=BATCH_RANGE[0], max=BATCH_RANGE[1])


def fake_context(mode) -> contextlib.ExitStack:
    """``mode`` entered as the exporter enters its own fake runs: with the Python dispatcher (sizes
    stay symbols through the Python kernels) and size-oblivious reasoning about sizes 0 and 1."""
    from torch._dispatch.python import enable_python_dispatcher

    stack = contextlib.ExitStack()
    stack.enter_context(mode)
    stack.enter_context(enable_python_dispatcher())  # as the exporter's own fake runs: SymInts stay symbolic
    stack.enter_context(torch.fx.experimental._config.patch(backed_size_oblivious=True))
    return stack


def propagate(gm: fx.GraphModule, nodes: Iterable[fx.Node], mode) -> None:
    """``meta["val"]`` of each node, from its inputs' values (inside :func:`fake_context`)."""
    consts: dict[str, torch.Tensor] = {}
    for node in nodes:
        if node.op == "get_attr":
            if node.target not in consts:
                consts[node.target] = mode.from_tensor(get_attr_tensor(gm, node.target), static_shapes=True)
            node.meta["val"] = consts[node.target]
        elif node.op == "call_function":
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)


def retrace(gm: fx.GraphModule, pending: list[fx.Node], mode, batch, decompositions: dict,
            table_key: Hashable | None = None) -> None:
    """Replace ``pending`` by what ``torch.export`` + ``run_decompositions`` make of them (in place).

    The traced program reads the activations it needs as inputs (their batch dimension the one
    dynamic ``Dim``, or a multiple of it), the constants as buffers, and computes the sizes it needs
    (``sym_size`` and arithmetic on it) from its inputs, as the whole graph's program does.

    ``table_key`` names ``decompositions`` (equal keys, equal tables); with it, the decomposed program
    is kept (:data:`PROGRAMS_KEPT`, last used first) and reused for a program of the same structure
    (:func:`_structure`): a sweep exports one model under many schemes, and their pending nodes
    (a mean's table lookup, a flatten) differ only in the values the program reads as inputs."""
    nodes = _with_sizes(pending)
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, str] = {}  # buffer of the traced program -> target in gm
    activations = [a for a in inputs if a.op != "get_attr"]
    for i, a in enumerate(activations):
        env[a] = graph.placeholder(f"in_{i}")
    for a in inputs:
        if a.op == "get_attr":
            name = f"attr_{len(attrs)}"
            root.register_buffer(name, get_attr_tensor(gm, a.target).detach())
            attrs[name] = a.target
            env[a] = graph.get_attr(name)
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    outputs = [n for n in pending if isinstance(n.meta.get("val"), torch.Tensor)]
    if any(u not in inside for n in pending if n not in outputs for u in n.users):
        raise Untranslatable("a traced node that is not a tensor is read by the rest of the graph")
    graph.output(tuple(env[n] for n in outputs))
    dim = batch_dim()
    examples, shapes, forms = zip(*(_example(a, batch, dim) for a in activations)) if activations else ((), (), ())
    buffers = tuple((tuple(b.shape), b.stride(), b.dtype) for b in root.buffers())
    key = _structure(graph, (table_key, batch is None, forms, buffers)) if table_key is not None else None
    program = _PROGRAMS.get(key) if key is not None else None
    if program is None:
        try:
            with quiet_pytree_copies():
                program = torch.export.export(fx.GraphModule(root, graph), tuple(examples),
                                              dynamic_shapes=tuple(shapes))
                with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                    program = program.run_decompositions(decompositions)
        except Exception as exc:
            raise Untranslatable(f"tracing {len(pending)} nodes failed ({type(exc).__name__})") from exc
        if key is not None:
            _PROGRAMS[key] = program
            while len(_PROGRAMS) > PROGRAMS_KEPT:
                _PROGRAMS.popitem(last=False)
    else:
        _PROGRAMS.move_to_end(key)
    _splice(gm, program, activations, attrs, outputs, batch)
    try:
        with fake_context(mode):
            propagate(gm, [n for n in gm.graph.nodes if "val" not in n.meta], mode)
    except Exception as exc:  # the traced program assumed something of its inputs the graph's values break
        raise Untranslatable(f"the traced nodes do not fit the graph ({type(exc).__name__})") from exc


PROGRAMS_KEPT = 32
"""How many decomposed programs :func:`retrace` keeps for reuse (each a few nodes)."""
_PROGRAMS: OrderedDict[tuple, torch.export.ExportedProgram] = OrderedDict()
_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _structure(graph: fx.Graph, context: tuple) -> tuple | None:
    """What the traced program of ``graph`` depends on, hashable: each node's op, target and arguments
    (nodes as their positions, literals with their types), with ``context`` (the decomposition table's
    key, the inputs' shapes, strides, dtypes and batch dimensions, the buffers' shapes and dtypes; their
    values are fake while tracing, so never part of it). None when an argument is not a plain literal:
    such a program is traced each time."""
    position: dict[fx.Node, int] = {}

    def literal(a):
        if isinstance(a, fx.Node):
            return ("node", position[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *(literal(x) for x in a))
        if isinstance(a, dict):
            return ("dict", *((k, literal(v)) for k, v in sorted(a.items())))
        if isinstance(a, slice):
            return ("slice", literal(a.start), literal(a.stop), literal(a.step))
        if isinstance(a, _LITERALS) and not (isinstance(a, float) and a != a):  # NaN never equals itself
            return (type(a), a)
        raise TypeError(type(a).__name__)

    nodes = []
    try:
        for i, node in enumerate(graph.nodes):
            position[node] = i
            target = node.target if node.op == "call_function" else str(node.target)
            nodes.append((node.op, target, literal(node.args), literal(dict(node.kwargs))))
        key = (tuple(nodes), context)
        hash(key)
    except TypeError:  # an argument that is no literal, a target that is not hashable
        return None
    return key


def _with_sizes(pending: list[fx.Node]) -> list[fx.Node]:
    """``pending`` and the size computations (``sym_size``, arithmetic on sizes) they read, in graph order."""
    inside = set(pending)
    stack = list(pending)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in inside and a.op == "call_function" and isinstance(a.meta.get("val"), torch.SymInt):
                inside.add(a)
                stack.append(a)
    order = {n: i for i, n in enumerate(pending[0].graph.nodes)}
    return sorted(inside, key=order.__getitem__)


def _example(node: fx.Node, batch, dim) -> tuple[torch.Tensor, dict | None, tuple]:
    """A real example of ``node``'s value (zeros), its dynamic shape for ``torch.export`` (a size
    ``a * batch + b`` is the batch ``Dim`` so derived) and its form for :func:`_structure`."""
    import sympy

    val = node.meta["val"]
    if not isinstance(val, torch.Tensor):
        raise Untranslatable(f"node {node.name}: an input that is not a tensor")
    shape, spec, form = [], {}, []
    for d, size in enumerate(val.shape):
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            poly = sympy.Poly(expr, batch) if batch is not None and expr.free_symbols == {batch} else None
            if poly is None or poly.degree() != 1 or not all(c.is_Integer for c in poly.all_coeffs()):
                raise Untranslatable(f"node {node.name}: dimension {d} is {size}, not a multiple of the batch")
            a, b = (int(c) for c in poly.all_coeffs())
            spec[d] = dim if (a, b) == (1, 0) else (dim * a + b if b else dim * a)
            form.append((d, a, b))
            size = size.node.hint
        shape.append(int(size))
    # the strides too: a reshape of a transposed tensor decomposes to a copy and a view, of a
    # contiguous one to a view alone
    stride = [int(st.node.hint) if isinstance(st, torch.SymInt) else int(st) for st in val.stride()]
    return (torch.empty_strided(shape, stride, dtype=val.dtype).zero_(), (spec or None),
            (tuple(shape), tuple(stride), val.dtype, tuple(form)))


def _splice(gm: fx.GraphModule, program, inputs: list[fx.Node], attrs: dict[str, str], outputs: list[fx.Node],
            batch) -> None:
    """Copy the traced program's nodes into ``gm`` in place of ``outputs`` (and the nodes before them).

    A size the program reads that is the batch is read from the graph's input, as in a program
    traced whole (where torch.export binds each symbol where it first appears, the input)."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = program.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
        raise Untranslatable("the traced nodes write to their inputs")
    graph = gm.graph
    end = next(n for n in graph.nodes if n.op == "output")
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, fx.Node] = {}
    user = iter(inputs)
    for spec, ph in zip(signature.input_specs, placeholders):
        with graph.inserting_before(end):
            if spec.kind == InputKind.USER_INPUT:
                env[ph] = next(user)
            elif spec.target in attrs:
                env[ph] = graph.get_attr(attrs[spec.target])
            else:  # a tensor the traced code made (a constant of the nonlinear kernels)
                value = program.constants.get(spec.target, program.state_dict.get(spec.target))
                if not isinstance(value, torch.Tensor):
                    raise Untranslatable(f"traced input {spec.target} is not a tensor")
                env[ph] = graph.get_attr(set_attr_tensor(gm, spec.target, value, param=False))
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int and batch is not None:
            size = env[node.args[0]].meta["val"].shape[node.args[1]]
            if isinstance(size, torch.SymInt):  # computed from the input's batch, not read where the program did
                env[node] = _size_of(graph, size.node.expr, batch, end)
                continue
        if node.op == "call_function" and node.target not in ASSERTIONS:
            with graph.inserting_before(end):
                env[node] = graph.node_copy(node, env.__getitem__)
                env[node].meta.pop("val", None)
        elif node.op == "output":
            results = node.args[0]
    for old, new in zip(outputs, results, strict=True):
        old.replace_all_uses_with(env[new])
    replaced = set(outputs)
    for node in reversed(list(graph.nodes)):  # the replaced nodes, the tuples they read, unused sizes
        if node.op in ("call_function", "get_attr") and not node.users and (node in replaced or not node.is_impure()):
            graph.erase_node(node)
    _topological(graph)


def _size_of(graph: fx.Graph, expr, batch, before: fx.Node) -> fx.Node:
    """A node computing the size ``a * batch + b`` from the graph's input (``sym_size`` and arithmetic).

    The traced program reads a size from the first of its inputs that has it, which in the graph may
    come after the node that needs it: a program traced whole reads it from the input."""
    import sympy

    node = _batch_size(graph, batch)
    if expr == batch:
        return node
    poly = sympy.Poly(expr, batch) if expr.free_symbols == {batch} else None
    if poly is None or poly.degree() != 1:
        raise Untranslatable(f"a size {expr} that is not a multiple of the batch")
    a, b = (int(c) for c in poly.all_coeffs())
    with graph.inserting_before(before):
        if a != 1:
            node = graph.call_function(operator.mul, (node, a))
        if b:
            node = graph.call_function(operator.add, (node, b))
    return node


def bind_batch(graph: fx.Graph, batch) -> None:
    """Read every size that is the batch from the graph's input (one ``sym_size`` node), as a program
    traced whole does: torch.export binds a symbol once, where it first appears."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int \
                and isinstance(node.meta.get("val"), torch.SymInt) and node.meta["val"].node.expr == batch:
            shared = _batch_size(graph, batch)
            if shared is not node:
                node.replace_all_uses_with(shared)
                graph.erase_node(node)


def _batch_size(graph: fx.Graph, batch) -> fx.Node:
    """``sym_size(x, 0)`` of the first input whose dim 0 is the batch, one node after the inputs."""
    last_input = next(n for n in reversed(graph.nodes) if n.op == "placeholder")
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int \
                and node.args[0].op == "placeholder" and node.args[1] == 0:
            last_input.append(node)  # before anything that reads it
            return node
    source = next(n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta["val"], torch.Tensor)
                  and n.meta["val"].dim() and isinstance(n.meta["val"].shape[0], torch.SymInt)
                  and n.meta["val"].shape[0].node.expr == batch)
    with graph.inserting_after(last_input):
        node = graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
    node.meta["val"] = source.meta["val"].shape[0]
    return node


def _topological(graph: fx.Graph) -> None:
    """Order the nodes so that each follows its inputs, otherwise as they were."""
    order: list[fx.Node] = []
    done: set[fx.Node] = set()
    active: set[fx.Node] = set()
    for root in list(graph.nodes):
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if ready:
                active.discard(node)
                done.add(node)
                order.append(node)
            elif node not in done:
                if node in active:
                    raise Untranslatable(f"the spliced graph has a cycle through {node.name}")
                active.add(node)
                stack.append((node, True))
                stack += [(a, False) for a in reversed(node.all_input_nodes) if a not in done]
    end = order[-1]
    for node in order[:-1]:
        end.prepend(node)


