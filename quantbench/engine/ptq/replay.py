"""Replay: a fake-quant graph run node by node over the calibration set, float and quantized in lockstep.

The weight algorithms (bias correction, AdaRound, block reconstruction) work
layer by layer, or block by block, in graph order: each needs the values that
reach its layer in the *quantized* model (with every earlier layer already
corrected) and the values the *float* model computes there. :class:`Replay`
holds both, for every calibration batch, and frees a value after its last
user, so the memory is the live activations of the calibration set, twice.

The float values are the same graph with every quantizer the identity (after
BN folding that is the float model), reading the weights and biases as they
were when the replay started. Constant subgraphs (a weight and its
quantizer) are evaluated when used, never cached, so a weight an algorithm has
just rewritten is read as it is now.

:func:`weighted_layers` names the layers an algorithm edits; :func:`blocks`
cuts the graph into reconstruction blocks where a single value crosses (the
end of a residual block and its equivalents), from the graph alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx

from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import get_attr_tensor, op_name
from quantbench.engine.ops import op_kind

__all__ = ["Block", "Layer", "Replay", "blocks", "weighted_layers"]

#: A call_module override: (module, input) -> output, used instead of the module in quantized mode.
Override = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _constant_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes that read no input: parameters and what is computed from them alone (a weight's quantizer)."""
    constant: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_module") and n.all_input_nodes
                                  and all(a in constant for a in n.all_input_nodes)):
            constant.add(n)
    return constant


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantizeBase)


@dataclass
class Layer:
    """A weighted op whose weight is a parameter read through its own weight quantizer."""

    node: fx.Node
    weight: fx.Node  # the get_attr of the float weight
    weight_fq: fx.Node  # the call_module quantizing it
    bias: fx.Node | None = None  # the get_attr of the float bias
    out_axis: int = 1  # the output's channel axis

    @property
    def name(self) -> str:
        return self.node.name


def weighted_layers(gm: fx.GraphModule) -> list[Layer]:
    """Convolutions, linears and matmuls of a fake-quant graph with a quantized parameter weight, in order."""
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_kind(node) != "weighted" or len(node.args) < 2:
            continue
        fq = node.args[1]
        if not (isinstance(fq, fx.Node) and _is_quantizer(gm, fq)) or fq.args[0].op != "get_attr":
            continue
        if not isinstance(gm.get_submodule(fq.target), FakeQuantizeBase) or \
                gm.get_submodule(fq.target).role != "weight":
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, fx.Node) and _is_quantizer(gm, bias):
            bias = bias.args[0]
        bias = bias if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        out_axis = -1 if "linear" in op_name(node) else 1
        layers.append(Layer(node, fq.args[0], fq, bias, out_axis))
    return layers


@dataclass
class Block:
    """Nodes reconstructed together: their external inputs and the values they hand on."""

    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)

    @property
    def name(self) -> str:
        names = [layer.name for layer in self.layers]
        return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


class Replay:
    """Both models' values of every live node over the calibration batches (see the module docstring).

    Args:
        gm: the fake-quant graph (``quantize_model``'s result); its quantizers are used as they are set.
        batches: calibration inputs, one tuple of tensors per batch.
    """

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.gm = gm
        self.batches = batches
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.constant = _constant_nodes(self.nodes)
        self.last_use = {}
        for i, n in enumerate(gm.graph.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.fp: dict[fx.Node, list[torch.Tensor]] = {}
        self.q: dict[fx.Node, list[torch.Tensor]] = {}
        self.position = 0
        self.overrides: dict[str, Override] = {}
        # The float model is the graph as it is now: an algorithm rewrites weights and biases in place
        # (on the grid, corrected), so the float side reads a copy taken before it starts.
        self.float_attrs = {n.target: get_attr_tensor(gm, n.target).detach().clone()
                            for n in self.nodes if n.op == "get_attr"}

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, node: fx.Node, env: dict[fx.Node, Any], quantized: bool) -> Any:
        """``node``'s value given the values of its (non-constant) inputs in ``env``."""
        def value(a: fx.Node) -> Any:
            if a in env:
                return env[a]
            if a in self.constant:
                return self.evaluate(a, env, quantized)
            raise KeyError(f"replay: no value for {a.name} (needed by {node.name})")

        if node.op == "get_attr":
            return get_attr_tensor(self.gm, node.target) if quantized else self.float_attrs[node.target]
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, FakeQuantizeBase):
                if not quantized:
                    return args[0]
                if node.target in self.overrides:
                    return self.overrides[node.target](module, args[0])
            return module(*args, **kwargs)
        raise RuntimeError(f"replay cannot evaluate {node.op} node {node.name}")

    def _step(self) -> None:
        node = self.nodes[self.position]
        if node.op == "placeholder":
            k = sum(1 for n in self.nodes[: self.position] if n.op == "placeholder")
            values = [b[k] for b in self.batches]
            self.fp[node], self.q[node] = values, values
        elif node not in self.constant:
            with torch.no_grad():
                for env, quantized in ((self.fp, False), (self.q, True)):
                    env[node] = [self.evaluate(node, {a: env[a][b] for a in node.all_input_nodes if a in env},
                                               quantized) for b in range(len(self.batches))]
        for a in node.all_input_nodes:
            if self.last_use.get(a) == self.position:
                self.fp.pop(a, None)
                self.q.pop(a, None)
        self.position += 1

    def advance_to(self, node: fx.Node | None) -> None:
        """Compute every node before ``node`` (None: to the end)."""
        stop = len(self.nodes) if node is None else self.index[node]
        while self.position < stop:
            self._step()

    def values(self, node: fx.Node, quantized: bool) -> torch.Tensor:
        """Every batch's value of ``node``, concatenated along the batch axis."""
        env = self.q if quantized else self.fp
        if node not in env and node in self.constant:
            return self.evaluate(node, {}, quantized)
        return torch.cat(env[node], 0)

    def run(self, nodes: Iterable[fx.Node], inputs: dict[fx.Node, torch.Tensor], quantized: bool,
            wanted: Iterable[fx.Node]) -> list[torch.Tensor]:
        """Evaluate ``nodes`` (in order) from the given input values; the values of ``wanted``."""
        env = dict(inputs)
        for n in nodes:
            if n not in self.constant:
                env[n] = self.evaluate(n, env, quantized)
        return [env[w] if w in env else self.evaluate(w, env, quantized) for w in wanted]


def _users_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    return any(u not in inside for u in node.users)


def _finish_block(nodes: list[fx.Node], constant: set[fx.Node], layers: dict[fx.Node, Layer]) -> Block:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in constant and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if _users_outside(n, inside)]
    return Block(nodes, inputs, outputs, [layers[n] for n in nodes if n in layers])


def _layer_chain(gm: fx.GraphModule, layer: Layer, include_output_quantizer: bool) -> list[fx.Node]:
    """A weighted op and the single-user activations after it, up to (and maybe with) its output quantizer."""
    chain = [layer.node]
    node = layer.node
    while len(node.users) == 1:
        (user,) = node.users
        if _is_quantizer(gm, user):
            if include_output_quantizer:
                chain.append(user)
            break
        if user.op != "call_function" or op_kind(user) != "activation":
            break
        chain.append(user)
        node = user
    return chain


def blocks(gm: fx.GraphModule, *, max_layers: int = 4, layerwise: bool = False,
           include_output_quantizer: bool = True) -> list[Block]:
    """Reconstruction blocks of a fake-quant graph, in order.

    ``layerwise``: one block per weighted layer (the op and its activation, AdaRound's unit).
    Otherwise the graph is cut wherever one value alone crosses from the nodes before to the nodes
    after (a residual block's output, a plain layer's output), consecutive pieces are merged while
    they hold at most ``max_layers`` weighted layers, and a piece holding more (a multi-branch head)
    is reconstructed layer by layer.
    """
    replay_nodes = [n for n in gm.graph.nodes if n.op != "output"]
    constant = _constant_nodes(replay_nodes)
    layer_of = {layer.node: layer for layer in weighted_layers(gm)}
    if layerwise:
        return [_finish_block(_layer_chain(gm, layer, include_output_quantizer), constant, layer_of)
                for layer in layer_of.values()]
    order = [n for n in replay_nodes if n not in constant and n.op != "placeholder"]
    position = {n: i for i, n in enumerate(order)}
    last_user = {n: max((position.get(u, len(order)) for u in n.users), default=-1) for n in order}
    placeholders = [n for n in replay_nodes if n.op == "placeholder"]
    ph_last = max((position.get(u, len(order)) for p in placeholders for u in p.users), default=-1)
    pieces: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    live: set[fx.Node] = set()  # the values computed so far that a later node still reads
    for i, n in enumerate(order):
        current.append(n)
        live = {m for m in live if last_user[m] > i} | ({n} if last_user[n] > i else set())
        if live == {n} and ph_last <= i and _is_quantizer(gm, n):
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    out: list[Block] = []
    merged: list[fx.Node] = []
    merged_layers = 0
    for piece in pieces:
        n_layers = sum(1 for n in piece if n in layer_of)
        if n_layers > max_layers:
            if merged:
                out.append(_finish_block(merged, constant, layer_of))
                merged, merged_layers = [], 0
            inside_layers = [layer_of[n] for n in piece if n in layer_of]
            out.extend(_finish_block(_layer_chain(gm, layer, include_output_quantizer), constant,
                                     layer_of) for layer in inside_layers)
            continue
        if merged and merged_layers + n_layers > max_layers:
            out.append(_finish_block(merged, constant, layer_of))
            merged, merged_layers = [], 0
        merged.extend(piece)
        merged_layers += n_layers
    if merged:
        out.append(_finish_block(merged, constant, layer_of))
    return [b for b in out if b.layers]


def quantizer_modules(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> dict[str, FakeQuantizeBase]:
    """The activation quantizers called by ``nodes`` (derived bias quantizers excluded), by module name."""
    out = {}
    for n in nodes:
        if _is_quantizer(gm, n):
            m = gm.get_submodule(n.target)
            if m.role == "activation" and not isinstance(m, DerivedBiasFakeQuantize):
                out[n.target] = m
    return out
