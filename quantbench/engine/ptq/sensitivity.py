"""Layer sensitivity: how much each weighted layer's quantization costs the model's output.

A *layer* is a weighted compute node of a fake-quant graph (``conv*``, ``conv_transpose*``,
``linear``, or a ``matmul`` / ``mm`` / ``bmm`` with a constant operand) whose weight is read
through a weight quantizer, together with the quantizers that belong to it
(:func:`find_layers`):

* its weight quantizer (the ``const`` quantizer of a matmul's constant operand);
* its bias quantizer (an int32 bias is a :class:`DerivedBiasFakeQuantize`: it has no switch of its
  own, it rounds only while both its sources, the layer's *input* quantizer and its weight
  quantizer, do; see below);
* the activation quantizer of its output: the module called on the value the layer produces,
  or on the output of the activation fused after it (``conv -> relu -> fq``, ``conv -> bn -> relu``
  in QAT), looking through value-preserving ops (reshape, max pool, nearest upsampling, ...) and
  through requantizing (edge) quantizers.

Ownership of a shared module (one module called at several sites) is decided per module, by
the values it quantizes: it belongs to every layer whose output one of its sites quantizes.
A max pool or a reshape after a layer shares that layer's module, so the module is the layer's.
A ``cat`` gives its inputs and its output one module: when several layers feed a ``cat``
directly, that module belongs to each of them (their rows list it), so switching it quantizes
(or leaves in float) the outputs of all of them at once. A module that quantizes no layer's
output (the model input, an ``add``, a pool, a sigmoid) belongs to no layer: it is off in the
"only" measurement and on in the "all but" one.

Two measurements per layer, each the output SQNR against the float model (the same graph with
every quantizer off) over all outputs of all batches,
``10 log10(sum f^2 / sum (f - q)^2)``:

* ``only``: this layer's quantizers as they are in ``qmodel`` and every other quantizer off;
* ``all_but``: every quantizer as it is in ``qmodel`` except this layer's, which are off.

"As they are" is the state of each quantizer's ``fake_quant_enabled`` flag when the function is
called (all on after :meth:`ModelQuantizer.quantize_model`). Observers are held off while
measuring, and every flag is restored on exit, also when a batch or the metric raises.
A derived int32 bias follows its sources, so in the ``only`` measurement (the layer's input
quantizer belongs to the layer before it and is off) the bias stays in float; its rounding
error is ~2^-31 of the accumulator range, far below anything measured here.

The functions take a fake-quant graph and batches and return plain dataclasses; nothing is
logged or plotted here (the harness does that).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx

from quantbench.engine.errors import QuantizationError, SpecError, require_graph
from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import constant_value, op_name
from quantbench.engine.ops import op_kind, ops_tagged
from quantbench.engine.spec import DTYPES
from quantbench.registry import suggest

__all__ = [
    "LayerInfo",
    "LayerSensitivity",
    "OutputReference",
    "dtype_bits",
    "find_layers",
    "layer_sensitivity",
    "output_sqnr_db",
    "quantizer_state",
    "sensitivity_table",
]

#: Kinds whose output is a rearrangement (or a subset) of their first input's values: a quantizer on
#: their output quantizes the value of the op before them.
_MOVES = frozenset({"passthrough", "shared", "tuple_passthrough", "dropout"})


def dtype_bits(dtype: str) -> int:
    """The width of an integer grid: ``int4`` -> 4, ``uint8`` -> 8."""
    itype = DTYPES[dtype]
    return int(round(math.log2(itype.qmax - itype.qmin + 1)))


# -- the layers of a graph --------------------------------------------------------------------------


@dataclass
class LayerInfo:
    """One weighted layer of a fake-quant graph and the quantizers that belong to it.

    ``weight``, ``bias`` and ``outputs`` are module names (``qmodel.get_submodule(name)``).
    ``macs`` is per sample (dim 0 of the output is the batch), None where the shapes are unknown.
    ``act_bits`` is the width of the quantizer on the layer's activation input (32: float input).
    """

    node: str
    op: str
    params: int
    weight: str
    weight_bits: int
    bias: str | None = None
    outputs: list[str] = field(default_factory=list)
    macs: int | None = None
    act_bits: int = 32

    def quantizers(self, *, weights_only: bool = False) -> list[str]:
        """The module names of this layer: weight, bias, then (unless ``weights_only``) its outputs."""
        names = [self.weight] + ([self.bias] if self.bias else [])
        return names if weights_only else names + [m for m in self.outputs if m not in names]


def _quantizer(gm: fx.GraphModule, node: Any) -> FakeQuantizeBase | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantizeBase):
            return mod
    return None


def _per_sample(val: Any) -> int | None:
    """The number of elements of a meta value without its first (batch) dimension."""
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    try:
        return math.prod(int(d) for d in shape[1:])
    except (TypeError, ValueError, RuntimeError):  # a symbolic size other than the batch
        return None


def _macs(node: fx.Node, weight: torch.Tensor, weight_pos: int) -> int | None:
    """Multiply-accumulates per sample of one weighted node, from its shapes."""
    name = op_name(node)
    if name.startswith("conv_transpose"):  # each input element meets Cout/groups x kernel weights
        src = node.args[0]
        n = _per_sample(src.meta.get("val")) if isinstance(src, fx.Node) else None
        return None if n is None else n * math.prod(weight.shape[1:])
    out = _per_sample(node.meta.get("val"))
    if out is None:
        return None
    if name in ops_tagged("conv"):  # weight (Cout, Cin/groups, k...): one output meets Cin/groups x k weights
        return out * math.prod(weight.shape[1:])
    if name == "linear":  # weight (out, in)
        return out * int(weight.shape[-1])
    # matmul with a constant operand: the contracted dimension
    if weight.dim() == 1:
        k = int(weight.shape[0])
    else:
        k = int(weight.shape[-2] if weight_pos == 1 else weight.shape[-1])
    return out * k


def _weight_input(gm: fx.GraphModule, node: fx.Node) -> tuple[int, fx.Node] | None:
    """(argument position, quantizer node) of a weighted node's quantized constant weight, or None."""
    kind = op_kind(node)
    if kind == "weighted":
        w = node.args[1] if len(node.args) > 1 else None
        mod = _quantizer(gm, w)
        if mod is not None and mod.role == "weight":
            return 1, w
        return None
    if kind == "matmul":
        for i, a in enumerate(node.args[:2]):
            mod = _quantizer(gm, a)
            if mod is not None and mod.role in ("weight", "const") and constant_value(gm, a.args[0]) is not None:
                return i, a
    return None


def _producer(gm: fx.GraphModule, value: Any, layers: dict[fx.Node, LayerInfo]) -> fx.Node | None:
    """The layer whose output ``value`` is (through quantizers, fused activations and moves), or None."""
    seen = set()
    while isinstance(value, fx.Node) and value not in seen:
        seen.add(value)
        if value in layers:
            return value
        if _quantizer(gm, value) is not None:
            value = value.args[0]
            continue
        if value.op != "call_function" or not value.args or not isinstance(value.args[0], fx.Node):
            return None
        src = value.args[0]
        if src.meta.get("qb_fused") or op_kind(value) in _MOVES:
            value = src
            continue
        return None
    return None


def find_layers(qmodel: fx.GraphModule) -> list[LayerInfo]:
    """Every weighted layer of a fake-quant graph with its quantizers, in graph order (see the module doc)."""
    require_graph(qmodel, "find_layers", quantized=True)
    layers: dict[fx.Node, LayerInfo] = {}
    for node in qmodel.graph.nodes:
        found = _weight_input(qmodel, node) if node.op == "call_function" else None
        if found is None:
            continue
        pos, wq = found
        wmod = _quantizer(qmodel, wq)
        weight = constant_value(qmodel, wq.args[0])
        if weight is None:  # a weight computed from activations is no layer's parameter
            continue
        bias = None
        if op_kind(node) == "weighted" and len(node.args) > 2 and _quantizer(qmodel, node.args[2]) is not None:
            bias = node.args[2].target
        act = node.args[1 - pos] if op_kind(node) == "matmul" else node.args[0]
        amod = _quantizer(qmodel, act)
        layers[node] = LayerInfo(
            node=node.name, op=op_name(node), params=int(weight.numel()), weight=wq.target,
            weight_bits=dtype_bits(wmod.spec.dtype), bias=bias, macs=_macs(node, weight, pos),
            act_bits=dtype_bits(amod.spec.dtype) if amod is not None and amod.role == "activation" else 32)
    for node in qmodel.graph.nodes:
        mod = _quantizer(qmodel, node)
        if mod is None or mod.role != "activation" or isinstance(mod, DerivedBiasFakeQuantize):
            continue
        owner = _producer(qmodel, node.args[0], layers)
        if owner is not None and node.target not in layers[owner].outputs:
            layers[owner].outputs.append(node.target)
    return list(layers.values())


# -- switching quantizers ---------------------------------------------------------------------------


def _switchable(qmodel: torch.nn.Module) -> dict[str, FakeQuantizeBase]:
    return {name: m for name, m in qmodel.named_modules()
            if isinstance(m, FakeQuantizeBase) and not isinstance(m, DerivedBiasFakeQuantize)}


@contextlib.contextmanager
def quantizer_state(qmodel: torch.nn.Module, *, only: Iterable[str] | None = None,
                    off: Iterable[str] = ()) -> Iterator[torch.nn.Module]:
    """Switch quantizers off for a block; every flag is restored on exit (also on an exception).

    ``only``: the named quantizers keep their state and all others are off (``only=()``: the
    float model). ``off``: the named quantizers are off, the others keep their state. Observers
    are off inside the block. Derived bias quantizers follow their sources (they have no switch).
    Unknown names raise :class:`SpecError`.
    """
    modules = _switchable(qmodel)
    keep = None if only is None else set(only)
    drop = set(off)
    every = {name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantizeBase)}
    for name in sorted((keep or set()) | drop):
        if name not in every:
            raise SpecError("quantizer_state: " + suggest(name, sorted(modules), "quantizer module"))
    state = [(m, m.observer_enabled, m.fake_quant_enabled) for m in modules.values()]
    try:
        for name, m in modules.items():
            m.observer_enabled = False
            if (keep is not None and name not in keep) or name in drop:
                m.fake_quant_enabled = False
        yield qmodel
    finally:
        for m, obs, fq in state:
            m.observer_enabled, m.fake_quant_enabled = obs, fq


# -- measuring the output ---------------------------------------------------------------------------


def _inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model inputs of a batch, read as calibration reads it: a tensor, a tuple of tensors, or (inputs, target)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return (batch[0],)  # (inputs, target): the target is ignored
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(b, torch.Tensor) for b in batch):
        return tuple(batch)
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
        return tuple(batch[0])
    raise SpecError(f"cannot read model inputs from a batch of type {type(batch).__name__}; a batch is a tensor, "
                    "a tuple of tensors or an (inputs, target) pair")


def _flat(out: Any) -> torch.Tensor:
    """All tensors of a model output (a tensor, or nested tuples / lists / dicts of them), flattened, concatenated."""
    leaves: list[torch.Tensor] = []

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            leaves.append(v.detach().reshape(-1).float())
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for k in v:
                visit(v[k])

    visit(out)
    if not leaves:
        raise QuantizationError("the model returned no tensor to compare")
    return torch.cat(leaves)


def _device(module: torch.nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


class OutputReference:
    """Some batches and the float model's outputs on them: the reference every SQNR here is measured against.

    The float model is ``qmodel`` with every quantizer off (after BN folding that is the float
    network). ``batches`` is read once (a DataLoader, a list of tensors or of (inputs, target)
    pairs); at most ``max_batches`` are kept.
    """

    def __init__(self, qmodel: fx.GraphModule, batches: Iterable[Any], *, max_batches: int | None = None) -> None:
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        device = _device(qmodel)
        self.inputs: list[tuple[torch.Tensor, ...]] = []
        for batch in batches:
            if max_batches is not None and len(self.inputs) >= max_batches:
                break
            self.inputs.append(tuple(t.to(device) if device is not None else t for t in _inputs(batch)))
        if not self.inputs:
            raise SpecError("sensitivity needs at least one batch of inputs; got none")
        with quantizer_state(qmodel, only=()):
            self.outputs = [_flat(o) for o in self._run(qmodel)]
        self.signal = float(sum(o.double().pow(2).sum().item() for o in self.outputs))

    @torch.no_grad()
    def _run(self, qmodel: fx.GraphModule) -> Iterator[Any]:
        for x in self.inputs:
            yield qmodel(*x)

    def noise(self, qmodel: fx.GraphModule) -> float:
        """``sum (f - q)^2`` over every output of every batch, with the quantizers as they are now."""
        total = 0.0
        for ref, out in zip(self.outputs, self._run(qmodel)):
            out = _flat(out)
            if out.shape != ref.shape:
                raise QuantizationError(f"the model's outputs changed size ({out.numel()} values, the float "
                                        f"reference had {ref.numel()})")
            total += (ref.double() - out.double()).pow(2).sum().item()
        return total

    def db(self, noise: float) -> float:
        """SQNR in dB of a noise power against this reference (inf for no noise)."""
        if noise <= 0:
            return math.inf
        return 10 * math.log10(max(self.signal, 1e-30) / noise)

    def sqnr_db(self, qmodel: fx.GraphModule) -> float:
        """The output SQNR of ``qmodel`` as its quantizers are now."""
        return self.db(self.noise(qmodel))


def output_sqnr_db(qmodel: fx.GraphModule, batches: Iterable[Any], *, max_batches: int | None = None) -> float:
    """Output SQNR (dB) of a fake-quant graph against the same graph with every quantizer off.

    All outputs of all batches pooled: ``10 log10(sum f^2 / sum (f - q)^2)``.
    """
    require_graph(qmodel, "output_sqnr_db", quantized=True)
    ref = OutputReference(qmodel, batches, max_batches=max_batches)
    with quantizer_state(qmodel):  # observers held off, so measuring changes no scale
        return ref.sqnr_db(qmodel)


# -- sensitivity ------------------------------------------------------------------------------------


@dataclass
class LayerSensitivity:
    """The sensitivity figures of one layer (see the module doc for the measurements)."""

    node: str  # the weighted op's node name in the quantized graph
    op: str  # short op name
    params: int  # number of weight elements
    quantizers: list[str]  # module names of the quantizers that belong to this layer
    only_sqnr_db: float  # output SQNR vs float with ONLY this layer quantized (all other quantizers off)
    all_but_sqnr_db: float  # output SQNR vs float with every quantizer on EXCEPT this layer's
    only_metric: float | None = None
    all_but_metric: float | None = None


def _select(all_layers: list[LayerInfo], names: list[str] | None, api: str) -> list[LayerInfo]:
    if names is None:
        return all_layers
    if isinstance(names, str):
        raise SpecError(f"{api}: layers must be a list of node names, not a string")
    by_name = {layer.node: layer for layer in all_layers}
    for name in names:
        if name not in by_name:
            raise SpecError(f"{api}: " + suggest(name, list(by_name), "weighted layer",
                                                 hint="(find_layers(qmodel) names them)"))
    wanted = set(names)
    return [layer for layer in all_layers if layer.node in wanted]


def _predict_fn(qmodel: fx.GraphModule) -> Callable[..., Any]:
    def predict(*x: torch.Tensor) -> Any:
        with torch.no_grad():
            return qmodel(*x)

    return predict


def layer_sensitivity(qmodel: fx.GraphModule, batches: Iterable[Any], *, layers: list[str] | None = None,
                      metric: Callable[[Callable], float] | None = None, weights_only: bool = False,
                      max_batches: int | None = None) -> list[LayerSensitivity]:
    """Per weighted layer: the output SQNR with only it quantized, and with all but it quantized.

    Args:
        qmodel: the fake-quant graph of ``ModelQuantizer(config).quantize_model(gm, calib)``;
            its flags are restored on return. It runs in the mode it is in: a QAT graph belongs in
            eval mode (:func:`quantbench.engine.qat.eval_mode`), as ``quantize_model`` leaves it.
        batches: input batches (tensors, tuples of tensors or (inputs, target) pairs), read once;
            every measurement runs all of them.
        layers: node names of the layers to measure (default: every one :func:`find_layers` finds).
        metric: ``metric(predict_fn) -> float``, a task metric; ``predict_fn`` maps an input tensor
            to the model's outputs under ``no_grad`` in the state being measured. When given, the
            ``*_metric`` fields are filled (two calls per layer).
        weights_only: a layer's quantizers are its weight (and bias) quantizer only.
        max_batches: use at most this many batches.

    Returns:
        One row per layer, the layer that alone hurts most (lowest ``only_sqnr_db``) first; ties
        in graph order.
    """
    require_graph(qmodel, "layer_sensitivity", quantized=True)
    all_layers = find_layers(qmodel)
    if not all_layers:
        raise QuantizationError("layer_sensitivity: the graph has no weighted layer with a weight quantizer "
                                "(conv, linear or matmul with a quantized constant operand)")
    chosen = _select(all_layers, layers, "layer_sensitivity")
    ref = OutputReference(qmodel, batches, max_batches=max_batches)
    predict = _predict_fn(qmodel)
    rows = []
    for layer in chosen:
        names = layer.quantizers(weights_only=weights_only)
        with quantizer_state(qmodel, only=names):
            only = ref.sqnr_db(qmodel)
            only_metric = float(metric(predict)) if metric is not None else None
        with quantizer_state(qmodel, off=names):
            all_but = ref.sqnr_db(qmodel)
            all_but_metric = float(metric(predict)) if metric is not None else None
        rows.append(LayerSensitivity(layer.node, layer.op, layer.params, names, only, all_but,
                                     only_metric, all_but_metric))
    order = {layer.node: i for i, layer in enumerate(chosen)}
    rows.sort(key=lambda r: (r.only_sqnr_db, order[r.node]))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return "inf" if math.isinf(v) else f"{v:.2f}"


def sensitivity_table(rows: list[LayerSensitivity]) -> str:
    """The rows as a markdown table (in the order given)."""
    metric = any(r.only_metric is not None or r.all_but_metric is not None for r in rows)
    head = ["#", "node", "op", "params", "only SQNR (dB)", "all-but SQNR (dB)"]
    if metric:
        head += ["only metric", "all-but metric"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in ("#", "params") or "(" in h
                                                            or "metric" in h else "---" for h in head) + "|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), f"`{r.node}`", r.op, f"{r.params:,}", _fmt(r.only_sqnr_db), _fmt(r.all_but_sqnr_db)]
        if metric:
            cells += [_fmt(r.only_metric), _fmt(r.all_but_metric)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
