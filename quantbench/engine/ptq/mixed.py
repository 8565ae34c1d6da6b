"""Mixed-precision weights: which layers go back from low to high bits, under a size or bit-op budget.

The flow::

    q_low = ModelQuantizer(presets.get("w4a8_float")).quantize_model(gm, calib)   # every weight at 4 bits
    alloc = allocate_bits(q_low, calib, low_bits=4, high_bits=8, budget=0.75)     # 75 % of the 8-bit size
    config = mixed_precision_config(presets.get("w4a8_float"), alloc, gm=gm)       # promoted nodes at int8
    q_mixed = ModelQuantizer(config).quantize_model(gm, calib)

**Sensitivity.** Each weighted layer of ``qmodel_low``
(:func:`~quantbench.engine.ptq.sensitivity.find_layers`) gets an estimate of the output noise
(``sum (f - q)^2`` against the float model, over all outputs of all batches) that its low-bit
weight causes, i.e. what promoting it removes. Independent noise sources add at the output, so
the estimates of several layers add too: the allocation maximises the summed estimate.

* ``sensitivity="only"`` (default): the output noise with *only* this layer's weight (and bias)
  quantizer on, every other quantizer off: the layer's weight noise in isolation, as HAWQ's
  Hessian trace or AIMET's per-layer AMP sensitivity see it.
* ``sensitivity="all_but"``: the noise that disappears when this layer's weight quantizer alone is
  switched off in the all-low model, ``N_low - N_without_layer`` (0 when that does not help).

Float weights stand in for high-bit ones: going from 4 to 8 bits lowers a weight's rounding noise
256-fold (24 dB). "only" is the default because it stays additive where the quantized model is far
from the float one: measured at 32x32 on random-init torchvision ResNet-18 / MobileNetV2 (W4A8,
output SQNR of the re-quantized mixed model at budget 0.75), "only" gave 10.3 / 3.0 dB and
"all_but" 2.9 / -1.9 dB (all-4-bit 0.3 / -2.9, all-8-bit 14.8 / 3.9); where the 4-bit model is
close to the float one (a trained digits CNN at 15.6 dB) both chose the same layers.

**Cost.** ``cost="size"``: the weight bits of the weighted layers, ``params x bits``.
``cost="bops"``: bit operations, ``MACs x activation bits x weight bits`` (MACs per sample from
the node's output shape and its weight's shape; activation bits from the quantizer on the layer's
input, 32 where the input is float). ``reference_cost`` is every layer at ``high_bits``, and
``budget`` is a fraction of it: with 4 / 8 bits, all-low costs 0.5 and ``budget=0.75`` allows 75 % of
the all-8-bit figure. Only the weighted layers count: other constants keep their bits.

**Choice.** Every layer starts at ``low_bits``; a promotion costs ``cost_high - cost_low``.

* ``method="knapsack"`` (default): the set of promotions of the largest summed noise estimate whose extra cost
  fits the budget, a 0/1 knapsack solved by dynamic programming over the extra cost quantised into
  10,000 steps of the all-high extra (each layer's cost rounded up, so the result never exceeds the
  budget). The optimum can only grow with the budget.
* ``method="greedy"``: layers by noise estimate per unit of extra cost, best first (ties in graph order); each
  is promoted if it still fits, else skipped.

A layer whose estimate is 0 (its float weights remove no output noise) is never promoted, so the
budget is a ceiling, not a target. Both methods are deterministic.

**Weights only.** Mixed precision here changes weight bits only; activations stay as the config
says. onnxruntime's integer kernels (QLinearConv, QGemm, QLinearMatMul) take 8-bit activations, and
int4 weights are stored in int8 containers (exact), so a W4/W8 mix exports and runs as the W4A8
model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from torch import fx

from quantbench.engine.annotate import check_config_names
from quantbench.engine.errors import QuantizationError, SpecError, require_graph
from quantbench.engine.ptq.sensitivity import (
    LayerInfo,
    OutputReference,
    dtype_bits,
    find_layers,
    quantizer_state,
)
from quantbench.engine.spec import DTYPES, Config

__all__ = ["BitAllocation", "COSTS", "METHODS", "SENSITIVITIES", "allocate_bits", "mixed_precision_config"]

COSTS = ("size", "bops")
METHODS = ("knapsack", "greedy")
SENSITIVITIES = ("only", "all_but")
_STEPS = 10_000  # knapsack resolution: steps of the all-high extra cost


@dataclass
class BitAllocation:
    """Weight bits per weighted layer and what they cost.

    ``cost``, ``budget`` and ``reference_cost`` are in the unit of ``measure`` (weight bits for
    ``"size"``, bit operations per sample for ``"bops"``); ``fraction`` is ``cost / reference_cost``.
    ``rows`` (graph order) hold per layer: ``node``, ``op``, ``params``, ``macs``, ``act_bits``,
    ``bits``, ``sqnr_db`` (the output SQNR of the sensitivity measurement: only this layer's weight
    quantized for ``"only"``, everything but it for ``"all_but"``), ``noise`` (the estimated output
    noise its low-bit weight causes, what promoting it removes), ``noise_share`` (that over the sum
    of every layer's), ``cost_low`` and ``cost_high``.
    """

    bits: dict[str, int]  # weighted node name -> weight bits
    cost: float  # the budget measure of this allocation
    budget: float  # the allowed cost
    reference_cost: float  # cost with every layer at high_bits
    rows: list[dict] = field(default_factory=list)
    low_bits: int = 4
    high_bits: int = 8
    measure: str = "size"
    sensitivity: str = "only"
    low_sqnr_db: float = math.nan  # output SQNR of qmodel_low as given (every layer at low bits)

    @property
    def fraction(self) -> float:
        """The allocation's cost as a fraction of every layer at high bits."""
        return self.cost / self.reference_cost if self.reference_cost else 1.0

    @property
    def promoted(self) -> list[str]:
        """The nodes at more than ``low_bits``, in graph order."""
        return [r["node"] for r in self.rows if r["bits"] > self.low_bits]

    def ops(self) -> dict[str, str]:
        """Node name -> short op name (what :meth:`Config.for_node` is asked with)."""
        return {r["node"]: r["op"] for r in self.rows}


def _check_args(low_bits: Any, high_bits: Any, budget: Any, cost: Any, method: Any, sensitivity: Any) -> None:
    for name, v in (("low_bits", low_bits), ("high_bits", high_bits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"allocate_bits: {name}={v!r} must be a positive int (e.g. 4 or 8)")
    if high_bits <= low_bits:
        raise SpecError(f"allocate_bits: high_bits={high_bits} must be above low_bits={low_bits}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise SpecError(f"allocate_bits: budget={budget!r} must be a positive fraction of the all-high-bits cost "
                        "(e.g. 0.75)")
    if cost not in COSTS:
        raise SpecError(f"allocate_bits: cost={cost!r} is not one of {list(COSTS)}")
    if method not in METHODS:
        raise SpecError(f"allocate_bits: method={method!r} is not one of {list(METHODS)}")
    if sensitivity not in SENSITIVITIES:
        raise SpecError(f"allocate_bits: sensitivity={sensitivity!r} is not one of {list(SENSITIVITIES)}")


def _layer_cost(layer: LayerInfo, bits: int, measure: str) -> float:
    if measure == "size":
        return float(layer.params * bits)
    if layer.macs is None:
        raise SpecError(f"allocate_bits: cost='bops' needs the output shape of node '{layer.node}' ({layer.op}), "
                        "which the graph does not record; use cost='size'")
    return float(layer.macs * layer.act_bits * bits)


def _knapsack(gains: list[float], extra: list[float], allowed: float) -> set[int]:
    """The items of the largest summed value whose summed extra cost is at most ``allowed`` (0/1, DP)."""
    items = [i for i, (g, c) in enumerate(zip(gains, extra)) if g > 0 and c > 0]
    free = {i for i, (g, c) in enumerate(zip(gains, extra)) if g > 0 and c <= 0}
    if sum(extra[i] for i in items) <= allowed:
        return set(items) | free
    unit = sum(e for e in extra if e > 0) / _STEPS
    cap = int(math.floor(allowed / unit + 1e-9))
    if cap <= 0:
        return free
    weight = {i: max(1, math.ceil(extra[i] / unit - 1e-9)) for i in items}
    best = np.zeros(cap + 1)
    take = np.zeros((len(items), cap + 1), dtype=bool)
    for k, i in enumerate(items):
        w = weight[i]
        if w > cap:
            continue
        candidate = best[:-w] + gains[i]
        better = candidate > best[w:]
        take[k, w:] = better
        best[w:] = np.where(better, candidate, best[w:])
    chosen, c = set(), cap
    for k in range(len(items) - 1, -1, -1):
        if take[k, c]:
            chosen.add(items[k])
            c -= weight[items[k]]
    return chosen | free


def _greedy(gains: list[float], extra: list[float], allowed: float) -> set[int]:
    """Best value per unit of extra cost first; each promoted if it still fits, else skipped."""
    order = sorted((i for i, g in enumerate(gains) if g > 0),
                   key=lambda i: (-(gains[i] / extra[i]) if extra[i] > 0 else -math.inf, i))
    chosen, used = set(), 0.0
    for i in order:
        if used + extra[i] <= allowed * (1 + 1e-12):
            chosen.add(i)
            used += max(extra[i], 0.0)
    return chosen


def allocate_bits(qmodel_low: fx.GraphModule, batches: Iterable[Any], *, low_bits: int = 4, high_bits: int = 8,
                  budget: float = 0.75, cost: str = "size", method: str = "knapsack",
                  sensitivity: str = "only", max_batches: int | None = None) -> BitAllocation:
    """Choose which weighted layers of a low-bit model go to high bits within a budget (see the module doc).

    Args:
        qmodel_low: the fake-quant graph with every weight at ``low_bits`` (e.g. a ``w4a8_*`` preset's
            ``quantize_model`` output); its quantizer flags are restored on return.
        batches: input batches (tensors or (inputs, target) pairs), read once.
        low_bits / high_bits: the two weight widths; :func:`mixed_precision_config` needs an engine type
            of each (int4 / uint4, int8 / uint8, int16).
        budget: the allowed cost as a fraction of every layer at ``high_bits`` (at least the all-low
            fraction, ``low_bits / high_bits`` for ``"size"``).
        cost: ``"size"`` (weight bits) or ``"bops"`` (MACs x activation bits x weight bits).
        method: ``"knapsack"`` (largest summed estimate) or ``"greedy"`` (estimate per cost, best first).
        sensitivity: ``"only"`` (each layer's weight noise in isolation) or ``"all_but"`` (the noise
            switching it off removes from the all-low model).
        max_batches: use at most this many batches.

    Raises:
        SpecError: a bad argument, a budget below the all-low cost, or a layer whose weights are not
            ``low_bits`` wide in ``qmodel_low``.
    """
    require_graph(qmodel_low, "allocate_bits", quantized=True)
    _check_args(low_bits, high_bits, budget, cost, method, sensitivity)
    layers = find_layers(qmodel_low)
    if not layers:
        raise QuantizationError("allocate_bits: the graph has no weighted layer with a weight quantizer")
    wrong = [f"{lay.node} ({lay.weight_bits}-bit)" for lay in layers if lay.weight_bits != low_bits]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise SpecError(f"allocate_bits: qmodel_low must have every weight at low_bits={low_bits}, but "
                        f"{', '.join(wrong[:3])}{more} are not; quantize with a {low_bits}-bit weight config "
                        "(e.g. presets.get('w4a8_float')) or pass low_bits to match")
    cost_low = [_layer_cost(lay, low_bits, cost) for lay in layers]
    cost_high = [_layer_cost(lay, high_bits, cost) for lay in layers]
    reference, base = sum(cost_high), sum(cost_low)
    allowed = budget * reference
    if allowed < base * (1 - 1e-12):
        raise SpecError(f"allocate_bits: budget={budget} is below the cost of every layer at {low_bits} bits "
                        f"({base / reference:.4g} of the {high_bits}-bit {cost}); raise it")

    ref = OutputReference(qmodel_low, batches, max_batches=max_batches)
    with quantizer_state(qmodel_low):  # observers off, flags restored
        n_low = ref.noise(qmodel_low)
    measured, gains = [], []
    for lay in layers:
        names = lay.quantizers(weights_only=True)
        with quantizer_state(qmodel_low, **({"only": names} if sensitivity == "only" else {"off": names})):
            n = ref.noise(qmodel_low)
        measured.append(n)
        gains.append(n if sensitivity == "only" else max(n_low - n, 0.0))
    extra = [h - lo for h, lo in zip(cost_high, cost_low)]
    pick = _knapsack if method == "knapsack" else _greedy
    chosen = pick(gains, extra, allowed - base)

    bits, rows, total = {}, [], 0.0
    gain_sum = sum(gains)
    for i, lay in enumerate(layers):
        b = high_bits if i in chosen else low_bits
        bits[lay.node] = b
        total += cost_high[i] if i in chosen else cost_low[i]
        rows.append({"node": lay.node, "op": lay.op, "params": lay.params, "macs": lay.macs,
                     "act_bits": lay.act_bits, "bits": b, "sqnr_db": ref.db(measured[i]), "noise": gains[i],
                     "noise_share": gains[i] / gain_sum if gain_sum > 0 else 0.0,
                     "cost_low": cost_low[i], "cost_high": cost_high[i]})
    return BitAllocation(bits=bits, cost=total, budget=allowed, reference_cost=reference, rows=rows,
                         low_bits=low_bits, high_bits=high_bits, measure=cost, sensitivity=sensitivity,
                         low_sqnr_db=ref.db(n_low))


def _dtype(bits: int, signed: bool, node: str) -> str:
    name = f"{'int' if signed else 'uint'}{bits}"
    if name not in DTYPES or name == "int32":
        raise SpecError(f"mixed_precision_config: node '{node}' would need a {bits}-bit "
                        f"{'signed' if signed else 'unsigned'} weight type, which the engine does not have "
                        f"(weight types: {sorted(d for d in DTYPES if d != 'int32')})")
    return name


def mixed_precision_config(config: Config, allocation: BitAllocation, *, gm: fx.GraphModule | None = None) -> Config:
    """``config`` with a node-name override for every layer whose allocated weight bits differ from it.

    Each override is ``config.for_node(node, op)`` (so an existing override is kept and refined) with
    the weight spec's dtype set to the allocated width, signed or unsigned as that spec is
    (``int4`` -> ``int8``, ``uint4`` -> ``uint8``); everything else, activations included, stays as
    ``config`` says. onnxruntime's integer kernels are 8-bit in their activations; mixed
    precision here is a weights-only choice.

    The node names are those of the fake-quant graph's weighted nodes. The pre-quant passes
    (BN folding, layer-scale folding, constant folding) rewrite a weighted node's arguments but
    keep the node and its name, so they are names of the captured graph too, which is what a
    Config may use (:func:`~quantbench.engine.annotate.check_config_names`). Given the captured
    graph ``gm``, the result is checked against it here; otherwise ``quantize_model`` checks it.
    """
    if not isinstance(config, Config):
        raise SpecError(f"mixed_precision_config needs a quantbench.engine Config, got {type(config).__name__}")
    if not isinstance(allocation, BitAllocation):
        raise SpecError(f"mixed_precision_config needs the BitAllocation of allocate_bits, got "
                        f"{type(allocation).__name__}")
    ops = allocation.ops()
    overrides = {}
    for node, bits in allocation.bits.items():
        qc = config.for_node(node, ops.get(node, ""))
        if qc.weight is None:
            raise SpecError(f"mixed_precision_config: the config leaves the weight of node '{node}' in float; "
                            "use the config that quantized the model the allocation was made on")
        if dtype_bits(qc.weight.dtype) == bits:
            continue
        dtype = _dtype(bits, qc.weight.itype.signed, node)
        overrides[node] = qc.replace(weight=qc.weight.replace(dtype=dtype))
    mixed = config.replace(node_name_quant_config={**config.node_name_quant_config, **overrides})
    if gm is not None:
        require_graph(gm, "mixed_precision_config")
        check_config_names(gm, mixed)
    return mixed
