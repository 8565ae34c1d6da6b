"""Whole-graph annotation: which tensors get which quantizer, and which share one.

The annotator walks the ATen graph once and produces a :class:`Plan`:

* every value produced by a compute op gets an output quantizer (its
  *group*), except inside a fused pattern (``conv -> relu``, ``add -> relu``,
  ``conv -> bn [-> relu]`` in QAT), where only the last op's output is
  quantized, as integer kernels compute it;
* in QAT the weight quantizer of a conv followed by BatchNorm sits on the
  BN-folded weight (:mod:`quantbench.engine.passes.qat_bn`); dropout joins
  its input's group and adds no quantizer (it is the identity at inference);
* value-preserving ops (reshape, permute, slice, max pool, nearest upsample,
  ...) put their output in their input's group: same scale, so on integer
  hardware they move integers;
* ``cat`` merges the groups of all its inputs and its output (one shared
  scale, the widest range), as NPUs require;
* weights and constants get their own quantizer; an int32 bias gets a
  derived one (input scale x weight scale);
* where a consumer needs a different spec than its producer gives (mixed
  precision, a float producer), an *edge* quantizer requantizes that input.

Op kinds live in the registry of :mod:`quantbench.engine.ops`, keyed by the
short ATen op name; unknown ops are left in float and listed by the coverage
report with the reason.
Precedence of configs: node name > op type > global (:meth:`Config.for_node`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from quantbench.engine.errors import SpecError
from quantbench.engine.graph import get_attr_tensor, op_name
from quantbench.engine.ops import OP_TYPES, op_kind, ops_tagged
from quantbench.engine.spec import Config, QuantizationSpec
from quantbench.registry import suggest

__all__ = ["FUSABLE_PRODUCERS", "Group", "Plan", "annotate", "check_config_names"]

FUSABLE_PRODUCERS = {"weighted", "norm"}
"""Kinds whose output stays inside a fused pattern when a relu-like op follows them."""


@dataclass(eq=False)
class Group:
    """Tensors that share one quantizer (one scale)."""

    spec: QuantizationSpec
    role: str = "activation"
    members: list[fx.Node] = field(default_factory=list)
    parent: Group | None = None
    module_name: str = ""

    def root(self) -> Group:
        g = self
        while g.parent is not None:
            g = g.parent
        return g


@dataclass
class Plan:
    """The result of annotation, consumed by the insertion pass."""

    value_group: dict[fx.Node, Group] = field(default_factory=dict)
    edge_group: dict[tuple[fx.Node, int, int], Group] = field(default_factory=dict)
    weight_group: dict[tuple[fx.Node, int], Group] = field(default_factory=dict)
    bias: dict[fx.Node, tuple[int, QuantizationSpec]] = field(default_factory=dict)
    fused: set[fx.Node] = field(default_factory=set)
    float_reasons: dict[fx.Node, str] = field(default_factory=dict)

    def group_of(self, node: fx.Node) -> Group | None:
        g = self.value_group.get(node)
        return g.root() if g is not None else None

    def groups(self) -> list[Group]:
        seen: dict[int, Group] = {}
        for g in [*self.value_group.values(), *self.edge_group.values(), *self.weight_group.values()]:
            r = g.root()
            seen.setdefault(id(r), r)
        return list(seen.values())


def _excluded(node: fx.Node, config: Config) -> bool:
    if node.name in config.exclude:
        return True
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    return any(p == ex or p.startswith(ex + ".") for p in paths for ex in config.exclude if ex)


def _fused_producers(graph: fx.Graph, config: Config) -> set[fx.Node]:
    """Nodes whose output stays inside a fused pattern (not quantized)."""
    fused: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if op_name(node) == "bn_qat_output":
            fused.add(node.args[0])  # the conv's output is BN's input: never quantized
        if op_name(node) not in ops_tagged("relu_like") or _excluded(node, config):
            continue
        prev = node.args[0]
        chain = []
        while isinstance(prev, fx.Node) and len(prev.users) == 1 and not _excluded(prev, config):
            kind = op_kind(prev)
            if op_name(prev) == "bn_qat_output":
                chain.append(prev)
                prev = prev.args[0]
                continue
            if kind in FUSABLE_PRODUCERS or (op_name(prev) == "add" and not chain):
                chain.append(prev)
                if kind == "norm" and op_name(prev) == "batch_norm":
                    prev = prev.args[0]
                    continue
            break
        fused.update(chain)
    return fused


def _is_folded_weight(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) == "bn_fold_weight"


def _tensor_args(node: fx.Node) -> list[tuple[int, int, fx.Node]]:
    """(arg index, list index or -1, node) for every tensor input of a node."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            out.append((i, -1, a))
        elif isinstance(a, (list, tuple)):
            out.extend((i, j, b) for j, b in enumerate(a) if isinstance(b, fx.Node))
    return out


def _is_const(node: fx.Node) -> bool:
    return node.op == "get_attr"


def _rank(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The number of dimensions of a weight node, when it is known before anything runs."""
    val = node.meta.get("val")
    if hasattr(val, "dim"):
        return val.dim()
    if _is_const(node):
        return get_attr_tensor(gm, node.target).dim()
    if _is_folded_weight(node) and isinstance(node.args[0], fx.Node):
        return _rank(gm, node.args[0])
    return None


def _check_ch_axis(spec: QuantizationSpec, rank: int | None, node: fx.Node) -> None:
    """A per-channel axis the weight has (the spec cannot know the rank; an observer would wrap it silently)."""
    if rank is not None and rank > 0 and not -rank <= spec.ch_axis < rank:
        raise SpecError(f"QuantizationSpec.ch_axis={spec.ch_axis} is out of range for the {rank}-d weight of node "
                        f"'{node.name}' ({op_name(node)}); use an axis in [{-rank}, {rank - 1}], e.g. 0 "
                        "(output channels)")


def check_config_names(gm: fx.GraphModule, config: Config) -> None:
    """Refuse, in one line with close matches, a name in ``config`` that can never apply to ``gm``.

    An op type that no annotator knows, a node name the captured graph does not have, or an exclude
    entry that is neither a node name nor a module path (or prefix) of the model would be ignored
    silently: the layer the user meant would be quantized as the global config says.
    """
    for key in config.op_type_quant_config:
        if key not in OP_TYPES:
            raise SpecError("Config.op_type_quant_config: " + suggest(
                key, list(OP_TYPES), "op type", hint="(quantbench.engine.ops.OP_TYPES names them)"))
    nodes = [n.name for n in gm.graph.nodes if n.op == "call_function"]  # what Config.for_node is asked about
    for key in config.node_name_quant_config:
        if key not in nodes:
            raise SpecError("Config.node_name_quant_config: " + suggest(
                key, nodes, "node name", hint="(the names of the captured graph's nodes: print(gm.graph))"))
    paths = {path for n in gm.graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values() if path}
    for ex in config.exclude:
        if ex and ex not in nodes and not any(p == ex or p.startswith(ex + ".") for p in paths):
            raise SpecError("Config.exclude: " + suggest(
                ex, sorted({*nodes, *paths}), "node name or module path",
                hint="(a node of print(gm.graph) or a module path of model.named_modules())"))


class _Annotator:
    def __init__(self, gm: fx.GraphModule, config: Config) -> None:
        self.gm = gm
        self.config = config
        self.plan = Plan()

    def own(self, node: fx.Node, spec: QuantizationSpec) -> Group:
        g = Group(spec, members=[node])
        self.plan.value_group[node] = g
        return g

    def input_group(self, consumer: fx.Node, i: int, j: int, src: fx.Node, spec: QuantizationSpec) -> Group:
        """Make sure input (i, j) of consumer is quantized with spec; return its group."""
        if src.op == "placeholder" and src not in self.plan.value_group:
            return self.own(src, spec)
        g = self.plan.group_of(src)
        if g is not None and g.spec == spec:
            return g
        edge = Group(spec, members=[src])
        self.plan.edge_group[(consumer, i, j)] = edge
        return edge

    def run(self) -> Plan:
        self.plan.fused = _fused_producers(self.gm.graph, self.config)
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            kind = op_kind(node)
            if kind is None:
                self.plan.float_reasons[node] = f"no annotator for op '{op_name(node)}'"
                continue
            if _excluded(node, self.config):
                self.plan.float_reasons[node] = "excluded by config"
                continue
            qc = self.config.for_node(node.name, op_name(node))
            getattr(self, f"_annotate_{kind}")(node, qc)
        return self.plan

    # -- per kind -------------------------------------------------------------
    def _activation_inputs(self, node, qc, skip=()):
        for i, j, src in _tensor_args(node):
            if (i, j) in skip or qc.input_tensors is None:
                continue
            if _is_const(src):
                self._const(node, i, src, qc)
            elif src not in self.plan.fused:
                self.input_group(node, i, j, src, qc.input_tensors)

    def _const(self, node, i, src, qc):
        spec = qc.weight or qc.input_tensors
        if spec is None:
            return
        self.plan.weight_group[(node, i)] = Group(spec.replace(qscheme="per_tensor"), role="const",
                                                  members=[src])

    def _output(self, node, qc):
        if node in self.plan.fused or qc.output_tensors is None:
            return
        self.own(node, qc.output_tensors)

    def _annotate_weighted(self, node, qc):
        self._activation_inputs(node, qc, skip={(1, -1), (2, -1)})
        w = node.args[1] if len(node.args) > 1 else None
        if qc.weight is not None and isinstance(w, fx.Node):
            spec = qc.weight
            if spec.per_channel and op_name(node).startswith("conv_transpose"):
                spec = spec.replace(ch_axis=1)
            if spec.per_channel:
                _check_ch_axis(spec, _rank(self.gm, w), node)
            if _is_const(w) or _is_folded_weight(w):
                self.plan.weight_group[(node, 1)] = Group(spec, role="weight", members=[w])
            else:
                self.input_group(node, 1, -1, w, qc.input_tensors or spec)
        b = node.args[2] if len(node.args) > 2 else None
        if qc.bias is not None and isinstance(b, fx.Node) and (node, 1) in self.plan.weight_group:
            self.plan.bias[node] = (2, qc.bias)
        self._output(node, qc)

    def _annotate_matmul(self, node, qc):
        self._activation_inputs(node, qc)
        self._output(node, qc)

    _annotate_binary = _annotate_matmul
    _annotate_activation = _annotate_matmul
    _annotate_pool = _annotate_matmul

    def _annotate_norm(self, node, qc):
        # BatchNorm parameters are folded into the conv at freeze; LayerNorm / GroupNorm's affine
        # parameters enter their kernel's normalization step (passes/nonlinear.qnorm) exactly, as the
        # BatchNorm folding does: neither is quantized on its own.
        skip = {(k, -1) for k in range(1, 5)}
        self._activation_inputs(node, qc, skip=skip)
        self._output(node, qc)

    def _annotate_cat(self, node, qc):
        if qc.output_tensors is None:
            return
        out = self.own(node, qc.output_tensors)
        for i, j, src in _tensor_args(node):
            g = self.plan.group_of(src)
            if g is None and src.op == "placeholder":
                g = self.own(src, out.spec)
            if g is not None and g.role == "activation":
                if g is not out:
                    g.parent = out
            else:
                self.plan.edge_group[(node, i, j)] = Group(out.spec, members=[src], parent=out)

    def _annotate_shared(self, node, qc):
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return
        g = self.plan.group_of(src)
        if g is None and qc.input_tensors is not None:
            g = self.input_group(node, 0, -1, src, qc.input_tensors)
        if g is not None:
            self.plan.value_group[node] = g
            g.members.append(node)

    def _annotate_passthrough(self, node, qc):
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            return
        g = self.plan.group_of(src)
        if g is not None:
            self.plan.value_group[node] = g
            g.members.append(node)

    _annotate_tuple_passthrough = _annotate_passthrough

    def _annotate_shape(self, node, qc):
        """Shape arithmetic computes no tensor: nothing to quantize."""
    _annotate_dropout = _annotate_passthrough  # the insertion pass adds no quantizer after it

    def _annotate_qat_bn(self, node, qc):
        """QAT BN folding: the conv carries the weight and bias groups; BN's output is the conv's output."""
        if op_name(node) == "bn_qat_output":
            conv = node.args[0]
            self._output(node, self.config.for_node(conv.name, op_name(conv)))


def annotate(gm: fx.GraphModule, config: Config) -> Plan:
    """Annotate every node of ``gm`` per ``config``; the graph is not modified."""
    return _Annotator(gm, config).run()
