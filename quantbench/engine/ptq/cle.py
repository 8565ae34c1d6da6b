"""Cross-layer equalization (CLE) with high-bias absorption, on the captured ATen graph.

After Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction"
(DFQ, arXiv 1906.04721), sec. 4.1 and 4.1.1. The input is the float GraphModule after the PTQ
pre-quant passes (:data:`quantbench.engine.passes.prequant.PREQUANT_PTQ`): BatchNorm is folded,
so every convolution / linear reads its weight and bias through ``get_attr`` nodes.

Two weighted ops ``y = W2 f(W1 x + b1) + b2`` form a *pair* when ``f`` is positively homogeneous
per channel (``f(s * h) = s * f(h)`` for a positive per-channel ``s``): then scaling output channel
``i`` of the first layer by ``1 / s_i`` and input channel ``i`` of the second by ``s_i`` leaves the
function unchanged. DFQ chooses ``s_i = sqrt(r1_i * r2_i) / r2_i`` (eq. 12, ``r`` the range of a
channel, here ``max |w|``), which makes both ranges ``sqrt(r1_i * r2_i)``: per-tensor weight
quantization then wastes less of its grid on channels with a small range.

What joins a pair (``_follow``): the first layer's output has exactly one user at every step (no
residual branch, no concat), and every op between is one of

* ``relu`` (the op high-bias absorption needs);
* a clipped ReLU (``relu6``, ``hardtanh(0, m)``): not scale-equivariant. ``relu6="relu"`` turns it
  into a ReLU (what DFQ and AIMET do; the function changes where the activation exceeded ``m``),
  ``relu6="keep"`` leaves such a pair alone (the function is kept exactly);
* any other single-tensor op of the kinds activation, pool, shared, passthrough or binary (with a
  constant second operand) that a numeric probe finds positively homogeneous per channel, with
  the channel index kept: LeakyReLU, max / average pools, a global mean, flatten of ``(N, C, 1, 1)``,
  multiplication by a positive constant ... The probe runs the op once in float64 on random data
  and on the same data with a distinct positive scale per channel, and finds the output axis that
  carries the channels (the empirical test is exact for these linear / piecewise-linear ops and
  rejects a channel shuffle, a concat, a clipped or smooth activation, a channel reduction).

Chains follow the pairs: ``conv -> relu -> depthwise conv -> relu -> pointwise conv`` is two pairs
sharing the depthwise layer, and the depthwise layer's scales compose (DFQ's triples). All pairs
are equalized in chain order, round after round, until no scale moves by more than 1e-6 or
``iterations`` rounds ran. A grouped or depthwise second layer is handled exactly: input channel
``c`` of a conv with ``groups=g`` is column ``c mod (C/g)`` of the output channels of its group, so
scaling it scales only those weights (a depthwise conv's input channel ``i`` is its own filter
``i``, with a depth multiplier the filters ``i*k .. i*k+k-1``). Transposed convolutions are not
touched.

High-bias absorption (DFQ sec. 4.1.1): where the pair is joined by one ReLU (a replaced ReLU6
counts) and every other op between commutes with a per-channel shift (the probe checks that too),
``relu(h - c) + c = relu(h)`` wherever ``h >= c``. BN is already folded, so the per-channel mean and
std of the ReLU's input are measured on ``batches`` (after equalization), ``c = max(0, mean - 3 std)``,
``b1 -= c`` and ``b2 += W2 c`` (``W2`` summed over its kernel; a grouped / depthwise ``W2`` only over
the channels of its group). A layer without a bias gets one (a new parameter, the op's bias argument
is pointed at it). Near the border of a zero-padded second conv the padded taps do not see ``c``, so
no bias is exact there: ``W2 c`` is then the conv of the constant ``c`` averaged over the output
positions at the graph's spatial size (the least-squares constant; DFQ takes the full kernel sum,
which over-corrects at small feature maps: at 1x1 a 3x3 conv sees only its centre tap). The
function changes where ``h < c`` and at those borders. Without ``batches`` nothing is absorbed.

:func:`equalize` rewrites ``gm`` in place: new weight / bias tensors are set on the attributes the
``get_attr`` nodes read (the old tensors are not written to, so a model the graph shares its
parameters with is left alone), replaced ReLU6 nodes call ``aten.relu``, and the graph is
recompiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from quantbench.engine.annotate import FUSABLE_PRODUCERS
from quantbench.engine.errors import require_graph
from quantbench.engine.graph import (
    constant_value,
    conv_groups,
    finish_graph,
    get_attr_tensor,
    op_name,
    set_attr_tensor,
)
from quantbench.engine.ops import HELPER_KINDS, op_kind, ops_of_kind, ops_tagged
from quantbench.errors import ConfigError

__all__ = ["CleReport", "Pow2AlignReport", "align_pow2", "equalize"]

aten = torch.ops.aten

_CONVERGED = 1e-6
"""Equalization stops once no scale of a round differs from 1 by more than this."""
_PROBE_KINDS = ("activation", "pool", "shared", "passthrough", "binary")
"""The op kinds the homogeneity probe may accept between two weighted ops."""


@dataclass
class CleReport:
    """What :func:`equalize` did.

    ``pairs``: weighted-op pairs equalized; ``relu6_replaced``: ReLU6 / ``hardtanh(0, m)`` nodes turned
    into ReLU; ``absorbed``: channels whose high bias was absorbed (``c > 0``); ``chains``: the node
    names of each chain of weighted ops, in graph order; ``pow2``: the report of a :func:`align_pow2` that
    ran after it (the ``cle`` algorithm's ``pow2_align``), else None.
    """

    pairs: int
    relu6_replaced: int
    absorbed: int
    chains: list[list[str]] = field(default_factory=list)
    pow2: Pow2AlignReport | None = None

    def __str__(self) -> str:
        longest = max((len(c) for c in self.chains), default=0)
        text = (f"CLE: {self.pairs} pairs in {len(self.chains)} chains (longest {longest} layers), "
                f"{self.relu6_replaced} ReLU6 -> ReLU, {self.absorbed} channels' high bias absorbed")
        return text if self.pow2 is None else f"{text}; {self.pow2}"


@dataclass
class _Layer:
    """A conv / linear whose weight (and bias) are constants read by get_attr nodes of their own."""

    node: fx.Node
    weight: str
    bias: str | None
    groups: int
    in_axis: int
    out_axis: int

    @property
    def channels_out(self) -> int:
        return int(self.node.meta["val"].shape[self.out_axis])


@dataclass
class _Pair:
    first: _Layer
    second: _Layer
    path: list[fx.Node]
    clipped: list[fx.Node]  # ReLU6 / hardtanh(0, m) nodes on the path (replaced by ReLU)
    relu: fx.Node | None  # the ReLU whose input's statistics give the absorbed bias, if absorbable
    relu_axis: int  # channel axis of that ReLU's input


# -- finding the pairs ----------------------------------------------------------------------------


def _weighted_ops() -> frozenset[str]:
    transposed = {n for n in ops_tagged("conv") if n.startswith("conv_transpose")}
    return ops_of_kind("weighted") - transposed


def _arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _layer(gm: fx.GraphModule, node: fx.Node, weighted: frozenset[str], attr_uses: dict[str, int]) -> _Layer | None:
    if node.op != "call_function" or op_name(node) not in weighted:
        return None
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1 and attr_uses[w.target] == 1):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1
                              and attr_uses[b.target] == 1):
        return None
    weight = get_attr_tensor(gm, w.target)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        return None
    in_rank, out_rank = _rank(node.args[0]), _rank(node)
    if in_rank is None or out_rank is None:
        return None
    if op_name(node) == "linear":
        return _Layer(node, w.target, b.target if b is not None else None, 1, in_rank - 1, out_rank - 1)
    batched = in_rank == weight.dim()  # convNd: (N, C, *spatial) batched, (C, *spatial) unbatched
    axis = 1 if batched else 0
    return _Layer(node, w.target, b.target if b is not None else None, conv_groups(node), axis, axis)


def _concrete(value: Any) -> Any:
    """A size from a node's meta: a symbolic batch size becomes the example's (its hint)."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise ValueError("unbacked symbolic size")
        return int(hint)
    return value


def _probe(gm: fx.GraphModule, node: fx.Node, src: fx.Node, axis: int, channels: int) -> tuple[int | None, bool]:
    """(the output axis carrying input channel ``axis``, or None if ``node`` is not positively homogeneous
    per channel; whether it also commutes with a per-channel shift)."""
    val = src.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(node.meta.get("val"), torch.Tensor):
        return None, False
    try:
        shape = [_concrete(d) for d in val.shape]
    except ValueError:
        return None, False

    def value(a: fx.Node) -> Any:
        if a is src:
            return a
        if op_kind(a) == "shape":
            return _concrete(a.meta.get("val"))
        v = constant_value(gm, a)
        if v is None:
            raise ValueError(f"{a.name} is not a constant")
        return v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    try:
        others = {a: value(a) for a in node.all_input_nodes if a is not src}
    except ValueError:
        return None, False

    def run(x: torch.Tensor) -> Any:
        env = {**others, src: x}
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        with torch.no_grad():
            return node.target(*args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    scale = torch.rand(channels, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    shift = torch.randn(channels, generator=gen, dtype=torch.float64) * 2
    view = [1] * x.dim()
    view[axis] = channels
    try:
        y, ys, yt = run(x), run(x * scale.view(view)), run(x + shift.view(view))
    except Exception:  # an op that does not run on the probe (dtype, shape): not accepted
        return None, False
    if not all(isinstance(t, torch.Tensor) and t.shape == y.shape for t in (y, ys, yt)) or not y.abs().max() > 0:
        return None, False
    found = []
    for j in range(y.dim()):
        if y.shape[j] != channels:
            continue
        out_view = [1] * y.dim()
        out_view[j] = channels
        if torch.allclose(ys, y * scale.view(out_view), rtol=1e-9, atol=1e-9):
            found.append((j, torch.allclose(yt, y + shift.view(out_view), rtol=1e-9, atol=1e-9)))
    return found[0] if len(found) == 1 else (None, False)


def _clipped_relu(node: fx.Node) -> bool:
    """``relu6`` or ``hardtanh(0, m)``: a ReLU but for its clip (not scale-equivariant)."""
    name = op_name(node)
    if name not in ops_tagged("relu_like") or name == "relu":
        return False
    if name != "hardtanh":
        return True
    lo, hi = _arg(node, 1, "min_val"), _arg(node, 2, "max_val")
    lo, hi = -1.0 if lo is None else lo, 1.0 if hi is None else hi
    return isinstance(lo, (int, float)) and lo == 0 and isinstance(hi, (int, float)) and hi > 0


def _follow(gm: fx.GraphModule, first: _Layer, layers: dict[fx.Node, _Layer], relu6: str) -> _Pair | None:
    """The pair that starts at ``first``, or None."""
    out, axis, channels = first.node, first.out_axis, first.channels_out
    path: list[fx.Node] = []
    clipped: list[fx.Node] = []
    relus: list[tuple[fx.Node, int]] = []
    shift_ok = True
    while True:
        if len(out.users) != 1:
            return None
        (user,) = out.users
        second = layers.get(user)
        if second is not None:
            if user.args[0] is not out or axis != second.in_axis:  # (its weight and bias are get_attr nodes)
                return None
            if get_attr_tensor(gm, second.weight).shape[1] * second.groups != channels:
                return None
            relu = relus[0] if len(relus) == 1 and shift_ok else (None, 0)
            return _Pair(first, second, path, clipped, relu[0], relu[1])
        if user.op != "call_function" or not user.args or user.args[0] is not out:
            return None
        if op_name(user) == "relu" or _clipped_relu(user):
            if op_name(user) != "relu":
                if relu6 == "keep":
                    return None
                clipped.append(user)
            relus.append((user, axis))
        elif op_kind(user) in _PROBE_KINDS:
            new_axis, shifts = _probe(gm, user, out, axis, channels)
            if new_axis is None:
                return None
            axis, shift_ok = new_axis, shift_ok and shifts
        else:
            return None
        path.append(user)
        out = user


def _find_pairs(gm: fx.GraphModule, relu6: str) -> list[list[_Pair]]:
    """The pairs, grouped in chains (each chain in graph order)."""
    weighted = _weighted_ops()
    attr_uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_uses[n.target] = attr_uses.get(n.target, 0) + 1
    layers = {}
    for n in gm.graph.nodes:
        layer = _layer(gm, n, weighted, attr_uses)
        if layer is not None:
            layers[n] = layer
    starts: dict[fx.Node, _Pair] = {}
    for layer in layers.values():
        pair = _follow(gm, layer, layers, relu6)
        if pair is not None:
            starts[layer.node] = pair
    seconds = {p.second.node for p in starts.values()}
    chains = []
    for node, pair in starts.items():  # graph order
        if node in seconds:
            continue
        chain = [pair]
        while chain[-1].second.node in starts:
            chain.append(starts[chain[-1].second.node])
        chains.append(chain)
    return chains


# -- equalization ---------------------------------------------------------------------------------


def _columns(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``w`` (out, in/groups, *kernel) as (groups, out/groups, in/groups, kernel): input channel
    ``g * in/groups + c`` is ``[g, :, c, :]``."""
    return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)


def _in_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    return _columns(w, groups).abs().amax(dim=(1, 3)).reshape(-1)


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).abs().amax(dim=1)


def _equalize_pair(pair: _Pair, work: dict[str, torch.Tensor], threshold: float) -> float:
    """One DFQ step on a pair (eq. 12), on the float64 working tensors; returns max |s - 1|."""
    w1, w2 = work[pair.first.weight], work[pair.second.weight]
    r1, r2 = _out_ranges(w1), _in_ranges(w2, pair.second.groups)
    ok = (r1 > threshold) & (r2 > threshold)
    s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
    work[pair.first.weight] = w1 / s.reshape(-1, *([1] * (w1.dim() - 1)))
    if pair.first.bias is not None:
        work[pair.first.bias] = work[pair.first.bias] / s
    g = pair.second.groups
    cols = _columns(w2, g) * s.reshape(g, 1, -1, 1)
    work[pair.second.weight] = cols.reshape(w2.shape)
    return float((s - 1).abs().max()) if s.numel() else 0.0


# -- high-bias absorption -------------------------------------------------------------------------


class _Moments(fx.Interpreter):
    """Runs the graph and accumulates per-channel sums and sums of squares of chosen nodes."""

    def __init__(self, gm: fx.GraphModule, axes: dict[fx.Node, int]) -> None:
        super().__init__(gm)
        self.axes = axes
        self.sums: dict[fx.Node, list] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        axis = self.axes.get(n)
        if axis is not None:
            t = out.detach().double().movedim(axis, 0).reshape(out.shape[axis], -1)
            acc = self.sums.setdefault(n, [0.0, 0.0, 0])
            acc[0] = acc[0] + t.sum(1)
            acc[1] = acc[1] + (t * t).sum(1)
            acc[2] += t.shape[1]
        return out


def _shifts(gm: fx.GraphModule, pairs: list[_Pair], batches: Sequence[Any]) -> dict[int, torch.Tensor]:
    """``c = max(0, mean - 3 std)`` of each absorbable pair's ReLU input, keyed by pair index."""
    axes = {p.relu.args[0]: p.relu_axis for p in pairs if p.relu is not None}
    moments = _Moments(gm, axes)
    with torch.no_grad():
        for batch in batches:
            moments.run(*((batch,) if isinstance(batch, torch.Tensor) else tuple(batch)))
    out = {}
    for i, p in enumerate(pairs):
        if p.relu is None or p.relu.args[0] not in moments.sums:
            continue
        s, sq, n = moments.sums[p.relu.args[0]]
        mean = s / n
        std = (sq / n - mean * mean).clamp(min=0).sqrt()
        out[i] = (mean - 3 * std).clamp(min=0)
    return out


def _through(second: _Layer, w2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """What a constant input ``c`` (per input channel) adds to each output channel of ``second``.

    A linear: ``W2 c``. A conv: ``W2 c`` summed over the kernel where no tap reads padding; with
    zero padding, the border outputs see less of ``c``, so the conv itself is run (float64, batch 1,
    the graph's spatial size) on the constant input and its output averaged over the positions: the
    constant bias nearest (least squares) to what the shift adds. Without padding both are the same.
    """
    node = second.node
    if op_name(node) == "linear":
        return w2 @ c
    val = node.args[0].meta["val"]
    shape = [_concrete(d) for d in val.shape]
    if second.in_axis == 1:
        shape[0] = 1
    view = [1] * len(shape)
    view[second.in_axis] = -1
    const = c.reshape(view).expand(shape)
    args = [const, w2, None, *node.args[3:]]
    with torch.no_grad():
        out = node.target(*args, **{k: v for k, v in node.kwargs.items() if k != "bias"})
    return out.movedim(second.out_axis, 0).reshape(out.shape[second.out_axis], -1).mean(dim=1)


def _absorb(pair: _Pair, c: torch.Tensor, work: dict[str, torch.Tensor], zeros: dict[str, _Layer]) -> None:
    """``b1 -= c``, ``b2 += W2 c`` (:func:`_through`)."""
    for layer in (pair.first, pair.second):
        if layer.bias is None:  # a new bias parameter (zeros), made when the tensors are written back
            layer.bias = f"{layer.weight.rsplit('.', 1)[-1]}__cle_bias"
            work[layer.bias] = torch.zeros(layer.channels_out, dtype=torch.float64)
            zeros[layer.bias] = layer
    work[pair.first.bias] = work[pair.first.bias] - c
    work[pair.second.bias] = work[pair.second.bias] + _through(pair.second, work[pair.second.weight], c)


# -- writing back ---------------------------------------------------------------------------------


def _write(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Set a new tensor on the attribute a get_attr target names (parameter, buffer or plain tensor)."""
    path, _, name = target.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    old = getattr(owner, name)
    new = value.to(dtype=old.dtype, device=old.device)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)


def _add_bias(gm: fx.GraphModule, layer: _Layer, value: torch.Tensor) -> None:
    """Give ``layer`` a new bias parameter and point its op's bias argument at it."""
    weight = get_attr_tensor(gm, layer.weight)
    node = layer.node
    with gm.graph.inserting_before(node):
        name = set_attr_tensor(gm, f"{layer.weight}_cle_bias", value.to(weight.dtype), param=True)
        bias = gm.graph.get_attr(name)
    if "bias" in node.kwargs:
        node.kwargs = {**node.kwargs, "bias": bias}
    else:
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        args[2] = bias
        node.args = tuple(args)
    layer.bias = name


def equalize(gm: fx.GraphModule, *, iterations: int = 20, relu6: str = "relu", absorb_bias: bool = True,
             batches: list[tuple[torch.Tensor, ...]] | None = None, threshold: float = 1e-8) -> CleReport:
    """Cross-layer equalization and high-bias absorption (DFQ, Nagel et al., arXiv 1906.04721), in place.

    Args:
        gm: the float graph after the PTQ pre-quant passes (BatchNorm folded): ``gm =
            run_passes(copy_graph(capture(model, (x,))), PREQUANT_PTQ)``.
        iterations: rounds over all pairs at most (each round equalizes every pair once, in chain order;
            it stops earlier once no scale moves by more than 1e-6).
        relu6: ``"relu"``: a ReLU6 / ``hardtanh(0, m)`` between two layers becomes a ReLU and the pair
            is equalized (DFQ, AIMET); ``"keep"``: such pairs are left alone (the function is exact).
        absorb_bias: absorb high biases across pairs joined by a ReLU (DFQ sec. 4.1.1); needs ``batches``.
        batches: calibration inputs, each a tuple of the graph's input tensors (a single tensor is
            taken as a 1-tuple), to measure the per-channel mean and std of each ReLU's input.
        threshold: a channel whose weight range (max |w|) in either layer is at most this keeps scale 1.

    Returns:
        :class:`CleReport`: pairs equalized, ReLU6 replaced, channels absorbed, the chains.

    Raises:
        CaptureError: ``gm`` is not a GraphModule.
        ConfigError: ``relu6`` is neither ``"relu"`` nor ``"keep"``, ``iterations`` or ``threshold`` negative.
    """
    require_graph(gm, "equalize")
    if relu6 not in ("relu", "keep"):
        raise ConfigError(f"equalize: relu6={relu6!r}: must be 'relu' (ReLU6 becomes ReLU) or 'keep' "
                          f"(pairs joined by a ReLU6 are left alone)")
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"equalize: iterations={iterations!r}: must be a non-negative integer")
    if not (isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold)):
        raise ConfigError(f"equalize: threshold={threshold!r}: must be a finite number >= 0")

    chains = _find_pairs(gm, relu6)
    pairs = [p for chain in chains for p in chain]
    targets = {t for p in pairs for layer in (p.first, p.second) for t in (layer.weight, layer.bias) if t}
    work = {t: get_attr_tensor(gm, t).detach().double() for t in targets}
    for _ in range(iterations):
        moved = max((_equalize_pair(p, work, threshold) for p in pairs), default=0.0)
        if moved <= _CONVERGED:
            break
    for t in targets:
        _write(gm, t, work[t])

    replaced = 0
    for p in pairs:
        for node in p.clipped:
            node.target, node.args, node.kwargs = aten.relu.default, (node.args[0],), {}
            replaced += 1
    finish_graph(gm)

    absorbed = 0
    if absorb_bias and batches and any(p.relu is not None for p in pairs):
        shifts = _shifts(gm, pairs, batches)
        created: dict[str, _Layer] = {}
        changed: set[str] = set()
        for i, c in shifts.items():
            if bool((c > 0).any()):
                _absorb(pairs[i], c, work, created)
                changed |= {pairs[i].first.bias, pairs[i].second.bias}
                absorbed += int((c > 0).sum())
        for t in changed - set(created):
            _write(gm, t, work[t])
        for name, layer in created.items():
            _add_bias(gm, layer, work.pop(name))
        finish_graph(gm)

    return CleReport(pairs=len(pairs), relu6_replaced=replaced, absorbed=absorbed,
                     chains=[[chain[0].first.node.name] + [p.second.node.name for p in chain] for chain in chains])


