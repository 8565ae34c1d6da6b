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

:func:`align_pow2` (quantbench's own, on DFQ's equivariance) is for power-of-two scales: one positive scalar
per group of tensors (a pair as above, joined by a ReLU6 / ``hardtanh(0, m)`` / ``clamp(0, m)`` too, whose clip
scales with it, or a residual stream) chosen so that the per-tensor ranges land just under powers of two
times ``qmax``; the function is kept exactly.
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


# -- power-of-two alignment -----------------------------------------------------------------------

_POW2_GRID = 256
"""Log-spaced scale candidates in [1, 2) per group and round (each tensor's own breakpoint added)."""
_POW2_MARGIN = 2.0 ** -10
"""Relative headroom kept under a power-of-two boundary: the objective sees every range this much wider, so a
range placed just under a boundary stays under it after float32 rounding of the scaled weights and of the
activations computed with them."""


@dataclass
class Pow2AlignReport:
    """What :func:`align_pow2` did.

    ``links``: groups scaled (a group is a CLE pair, or a residual stream: see :func:`align_pow2`);
    ``gain_db``: predicted improvement, in dB, of the mean relative grid noise ``1 / u^2`` over the tensors the
    groups move (``u = range / (qmax * pow2 scale)``, the grid utilisation); ``rows``: one per group:
    ``producers`` / ``consumers`` (weighted-op node names), ``scale`` (the factor ``s``), ``bounds`` (the clips
    of its ReLU6 / ``hardtanh(0, m)`` / ``clamp(0, m)`` nodes, as scaled), ``u_before`` / ``u_after`` (tensor ->
    utilisation; ``weight:<op>`` and ``act:<node>``; a weight between two groups appears in both rows).
    """

    links: int
    gain_db: float
    rows: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        def mean(key: str) -> float:
            us = {k: v for r in self.rows for k, v in r[key].items()}
            return sum(us.values()) / len(us) if us else float("nan")

        clips = sum(len(r["bounds"]) for r in self.rows if r["scale"] != 1.0)
        return (f"pow2 alignment: {self.links} groups, {clips} clip bounds scaled, mean grid utilisation "
                f"{mean('u_before'):.3f} -> {mean('u_after'):.3f}, predicted {self.gain_db:+.2f} dB")


def _upper_bound(node: fx.Node) -> float | None:
    """The clip ``m`` of a ReLU clipped at ``[0, m]`` (``relu6``, ``hardtanh(0, m)``, ``clamp(0, m)``), else None."""
    if node.op != "call_function":
        return None
    if _clipped_relu(node):
        if op_name(node) != "hardtanh":
            return 6.0  # relu6
        hi = _arg(node, 2, "max_val")
        return 1.0 if hi is None else float(hi)
    if op_name(node) == "clamp":
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if (isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo == 0
                and isinstance(hi, (int, float)) and not isinstance(hi, bool) and hi > 0):
            return float(hi)
    return None


def _set_bound(node: fx.Node, bound: float) -> None:
    """Clip ``node`` (relu6 / hardtanh(0, m) / clamp(0, m)) at ``[0, bound]``: a relu6 becomes a hardtanh."""
    if op_name(node) == "clamp":
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        kwargs = dict(node.kwargs)
        if args[1] is None:
            args[1] = kwargs.pop("min", 0.0)
        kwargs.pop("max", None)
        args[2] = bound
        node.args, node.kwargs = tuple(args), kwargs
        return
    node.target, node.args, node.kwargs = aten.hardtanh.default, (node.args[0], 0.0, bound), {}


def _constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    return op_kind(node) == "shape" or constant_value(gm, node) is not None


def _scalar_homogeneous(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Whether ``node(s * x) = s * node(x)`` for a positive scalar ``s`` on all of ``inputs`` (its non-constant
    tensor inputs), others held: a numeric probe in float64, as :func:`_probe` (exact for the linear and
    piecewise-linear ops it accepts; rejects ``x * y``, ``x + constant``, normalisations, smooth activations)."""
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    gen = torch.Generator().manual_seed(0)
    try:
        xs = {}
        for a in inputs:
            val = a.meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
                return False
            xs[a] = torch.randn([_concrete(d) for d in val.shape], generator=gen, dtype=torch.float64) * 4
        others = {}
        for a in node.all_input_nodes:
            if a in xs:
                continue
            v = _concrete(a.meta.get("val")) if op_kind(a) == "shape" else constant_value(gm, a)
            others[a] = v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    except ValueError:
        return False

    def run(scale: float) -> Any:
        env = {**others, **{a: x * scale for a, x in xs.items()}}
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        with torch.no_grad():
            return node.target(*args, **kwargs)

    try:
        y, ys = run(1.0), run(1.7)
    except Exception:  # an op that does not run on the probe (dtype, shape): not accepted
        return False
    return (isinstance(y, torch.Tensor) and isinstance(ys, torch.Tensor) and y.is_floating_point()
            and y.shape == ys.shape and bool(y.abs().max() > 0)
            and torch.allclose(ys, y * 1.7, rtol=1e-9, atol=1e-9))


@dataclass
class _Group:
    """Tensors that one positive scalar scales together: the outputs of its producers (weighted ops whose weight
    and bias it multiplies) and of the scale-equivariant ops they feed; its consumers' weights are divided."""

    members: list[fx.Node] = field(default_factory=list)
    producers: list[fx.Node] = field(default_factory=list)
    consumers: list[fx.Node] = field(default_factory=list)
    clips: list[fx.Node] = field(default_factory=list)
    valid: bool = True


def _find_groups(gm: fx.GraphModule) -> tuple[list[_Group], dict[fx.Node, _Layer]]:
    """The groups whose every tensor can be scaled by one scalar with the function kept, and the weighted ops.

    A weighted op whose weight and bias are its own constants starts a group at its output. An op joins the
    group of its inputs when all its non-constant inputs are in groups (which it merges) and it is scale-
    equivariant: ``relu``, a clip at ``[0, m]`` (``m`` scales with the group) or any op the scalar probe
    accepts (pools, reshapes, ``x + y``, concat, multiplication by a constant). A group is kept when every user
    of its tensors is in it, reads only its shape, or is a weighted op (of the same kind) taking it as its data
    input (that op's weight is divided by the scalar); one that reaches a graph output or any other op is not.
    A CLE pair (:func:`equalize`) is such a group with one producer and one consumer; a residual stream (the
    projections that write it, the adds, the convolutions that read it) is another.
    """
    weighted = _weighted_ops()
    attr_uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_uses[n.target] = attr_uses.get(n.target, 0) + 1
    layers: dict[fx.Node, _Layer] = {}
    parent: dict[fx.Node, fx.Node] = {}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in gm.graph.nodes:
        layer = _layer(gm, n, weighted, attr_uses)
        if layer is not None:
            layers[n] = layer
            parent[n] = n
            continue
        if n.op != "call_function" or op_kind(n) == "shape":
            continue
        inputs = [a for a in n.all_input_nodes if not _constant(gm, a)]
        if not inputs or any(a not in parent for a in inputs):
            continue
        if not (op_name(n) == "relu" or _upper_bound(n) is not None or _scalar_homogeneous(gm, n, inputs)):
            continue
        parent[n] = n
        for a in inputs:
            parent[root(a)] = root(n)

    groups: dict[fx.Node, _Group] = {}
    for n in parent:  # graph order
        g = groups.setdefault(root(n), _Group())
        g.members.append(n)
        if n in layers:
            g.producers.append(n)
        elif _upper_bound(n) is not None and op_name(n) != "relu":
            g.clips.append(n)
        for user in n.users:
            if user in parent and user not in layers:
                continue  # in the group (an equivariant op joins its inputs' group)
            if op_kind(user) == "shape":
                continue
            if (user in layers and user.args[0] is n and n not in user.args[1:]
                    and n not in user.kwargs.values()):
                if user not in g.consumers:
                    g.consumers.append(user)
                continue
            g.valid = False  # a graph output, or an op that is not scale-equivariant
    return [g for g in groups.values() if g.valid and g.consumers], layers


def _own_quantizer(node: fx.Node) -> bool:
    """Whether ``node``'s output gets a quantizer (a grid) of its own: not one fused into a following ReLU-like op
    (the annotator's fused pattern), not one that joins its input's group (max pool, reshape: same scale, a range
    no wider than the input's), not a concat input (the concat's one grid covers them)."""
    kind = op_kind(node)
    if node.op == "call_function" and (kind == "shared" or kind in HELPER_KINDS):
        return False
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) in ops_tagged("relu_like") and (
            kind in FUSABLE_PRODUCERS or op_name(node) == "add"):
        return False
    return not (users and all(op_kind(u) == "cat" for u in users))


class _Ranges(fx.Interpreter):
    """Runs the graph and records ``max |x|`` of chosen nodes."""

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.amax: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.nodes and isinstance(out, torch.Tensor) and out.numel():
            self.amax[n] = max(self.amax.get(n, 0.0), float(out.detach().abs().max()))
        return out


@dataclass
class _Term:
    """A per-tensor range the scalars move: ``range * s[up] / s[down]``."""

    name: str
    range: float
    qmax: int
    up: int | None  # group whose scale multiplies the range (a weight's output group, an activation's group)
    down: int | None  # group whose scale divides it (a weight's input group)

    def at(self, s: list[float]) -> float:
        return self.range * (s[self.up] if self.up is not None else 1.0) / (s[self.down] if self.down is not None
                                                                            else 1.0)


def _utilisation(r: torch.Tensor, qmax: Any, margin: float = 0.0) -> torch.Tensor:
    """``u = r / (qmax * 2^e)``, ``2^e`` the non-overflow pow2 scale of the range ``r * (1 + margin)``."""
    w = r * (1 + margin)
    e = torch.ceil(torch.log2(w / qmax))
    e = torch.where(w > qmax * torch.exp2(e), e + 1, e)  # log2 is inexact: fixed up by exact tests
    e = torch.where(w <= qmax * torch.exp2(e - 1), e - 1, e)
    return r / (qmax * torch.exp2(e))


def _to_octave(s: torch.Tensor) -> torch.Tensor:
    """``s * 2^k`` in [1, 2) (exact: a power-of-two factor)."""
    return s * torch.exp2(-torch.floor(torch.log2(s)))


def _descend(terms: list[_Term], touched: list[list[int]], rounds: int) -> list[float]:
    """Coordinate descent on ``sum 1/u^2``: per group, the best of the grid, the breakpoints and its current scale."""
    s = [1.0] * len(touched)
    grid = torch.exp2(torch.arange(_POW2_GRID, dtype=torch.float64) / _POW2_GRID)
    for _ in range(rounds):
        for k, idx in enumerate(touched):
            if not idx:
                continue
            mine = [terms[i] for i in idx]
            up = torch.tensor([t.up == k for t in mine])
            base = torch.tensor([t.at(s) / (s[k] if t.up == k else 1 / s[k]) for t in mine],
                                dtype=torch.float64)  # each range at s_k = 1
            qmax = torch.tensor([float(t.qmax) for t in mine], dtype=torch.float64)
            # the s_k that puts one tensor two margins under a boundary qmax * 2^j (range * s, or range / s)
            edge = torch.where(up, qmax / (base * (1 + 2 * _POW2_MARGIN)), base * (1 + 2 * _POW2_MARGIN) / qmax)
            cand = torch.cat([grid, _to_octave(edge), torch.tensor([s[k]], dtype=torch.float64)])
            r = torch.where(up[:, None], base[:, None] * cand[None, :], base[:, None] / cand[None, :])
            cost = _utilisation(r, qmax[:, None], _POW2_MARGIN).pow(-2).sum(0)
            best = int(torch.argmin(cost))
            if float(cost[best]) < float(cost[-1]) * (1 - 1e-12):  # moves only when that lowers the sum
                s[k] = float(cand[best])
    return s


def align_pow2(gm: fx.GraphModule, *, batches: list[tuple[torch.Tensor, ...]], weight_qmax: int = 127,
               act_qmax: int = 127, rounds: int = 3) -> Pow2AlignReport:
    """Scale groups of tensors by one factor each that puts their ranges just under powers of two, in place.

    A per-tensor power-of-two scale (``2^ceil(log2(range / qmax))``) uses ``u = range / (qmax * scale)`` of its
    grid, ``u`` in (0.5, 1]: a range just above a power of two times ``qmax`` wastes almost a bit (a ReLU6
    output, range 6, on int8: u = 6 / 7.94 = 0.76). The scale-equivariance is DFQ's (Nagel et al.,
    arXiv 1906.04721): in ``W2 f(W1 x + b1)`` with ``f`` positively homogeneous, ``W1 *= s, b1 *= s, W2 /= s``
    keeps the function. With one scalar ``s`` per pair (not per channel) a clipped ReLU (``relu6``,
    ``hardtanh(0, m)``, ``clamp(0, m)``) joins the pair too, exactly: its clip scales with it
    (``min(max(y, 0), m) * s = min(max(y * s, 0), m * s)``), where CLE must replace it by a ReLU. The groups
    (:func:`_find_groups`) are the pairs of :func:`equalize` and, more generally, every set of tensors one
    scalar moves with the function kept: a residual stream (the projections that write it scaled, the
    convolutions that read it divided) is one group.

    The choice of the scalars is quantbench's own (not DFQ's): per group, ``s`` in [1, 2) (a factor 2 moves
    every range by one exponent and changes nothing) minimising the sum of ``1 / u^2`` (relative noise power)
    over the tensors it moves: the per-tensor range ``max |w|`` of each producer's and consumer's weight, and of
    each activation in the group that gets a quantizer of its own (measured once on ``batches`` on the float
    graph, what the activation observer sees; a clip bounds it). A weight between two groups moves with both,
    so the scalars are found by coordinate descent: ``rounds`` sweeps over the groups, each a 1-D search over
    256 log-spaced values of [1, 2) and the points that put one of the group's tensors just under a boundary
    (a relative margin of 2^-10 is kept for float rounding); a scalar only moves when that lowers the sum, so the
    predicted noise never rises.

    Only per-tensor ranges are modelled: per-channel weight grids and activation ranges the observer clips
    (percentile, MSE) are not. Run it after :func:`equalize` (CLE balances channels; this scales whole tensors)
    and before quantizers are inserted.

    Args:
        gm: the float graph after the PTQ pre-quant passes (BatchNorm folded), as for :func:`equalize`.
        batches: calibration inputs (each a tuple of the graph's inputs, a single tensor a 1-tuple) to measure
            the activation ranges.
        weight_qmax: the largest integer of the weight grid (127 for int8, 7 for int4).
        act_qmax: ... of the activation grid.
        rounds: coordinate-descent sweeps over the groups.

    Returns:
        :class:`Pow2AlignReport`: groups scaled, predicted gain, one row per group.

    Raises:
        CaptureError: ``gm`` is not a GraphModule.
        ConfigError: no ``batches``, a ``qmax`` below 1, ``rounds`` negative.
    """
    require_graph(gm, "align_pow2")
    for key, value in (("weight_qmax", weight_qmax), ("act_qmax", act_qmax)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"align_pow2: {key}={value!r}: must be a positive int (the grid's largest integer)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"align_pow2: rounds={rounds!r}: must be a non-negative integer")
    if not batches:
        raise ConfigError("align_pow2: needs calibration batches (to measure the activation ranges)")

    groups, layers = _find_groups(gm)
    if not groups:
        return Pow2AlignReport(links=0, gain_db=0.0)
    out_group = {p: k for k, g in enumerate(groups) for p in g.producers}
    in_group = {c: k for k, g in enumerate(groups) for c in g.consumers}
    acts = {k: [n for n in g.members if _own_quantizer(n)] for k, g in enumerate(groups)}
    recorder = _Ranges(gm, {n for ns in acts.values() for n in ns})
    with torch.no_grad():
        for batch in batches:
            recorder.run(*((batch,) if isinstance(batch, torch.Tensor) else tuple(batch)))

    terms: list[_Term] = []
    touched: list[list[int]] = [[] for _ in groups]  # group -> the terms it moves

    def add(name: str, r: float, qmax: int, up: int | None, down: int | None) -> None:
        if r > 0 and math.isfinite(r):
            terms.append(_Term(name, r, qmax, up, down))
            for k in (up, down):
                if k is not None:
                    touched[k].append(len(terms) - 1)

    for node in [n for n in layers if n in out_group or n in in_group]:
        add(f"weight:{node.name}", float(get_attr_tensor(gm, layers[node].weight).detach().abs().max()),
            weight_qmax, out_group.get(node), in_group.get(node))
    for k, nodes in acts.items():
        for n in nodes:
            add(f"act:{n.name}", recorder.amax.get(n, 0.0), act_qmax, k, None)

    s = _descend(terms, touched, rounds)

    # apply: a weight scales by s_out / s_in, a bias by s_out, a clip by its group's s
    for node, layer in layers.items():
        up = s[out_group[node]] if node in out_group else 1.0
        down = s[in_group[node]] if node in in_group else 1.0
        if up == 1.0 and down == 1.0:
            continue
        _write(gm, layer.weight, get_attr_tensor(gm, layer.weight).detach().double() * (up / down))
        if layer.bias is not None and up != 1.0:
            _write(gm, layer.bias, get_attr_tensor(gm, layer.bias).detach().double() * up)
    for k, g in enumerate(groups):
        for n in g.clips:
            if s[k] != 1.0:
                _set_bound(n, _upper_bound(n) * s[k])
    finish_graph(gm)

    one = [1.0] * len(groups)
    before = {t.name: float(_utilisation(torch.tensor(t.at(one), dtype=torch.float64), t.qmax)) for t in terms}
    after = {t.name: float(_utilisation(torch.tensor(t.at(s), dtype=torch.float64), t.qmax)) for t in terms}
    rows = []
    for k, g in enumerate(groups):
        names = [terms[i].name for i in touched[k]]
        rows.append({"producers": [n.name for n in g.producers], "consumers": [n.name for n in g.consumers],
                     "scale": s[k], "bounds": [_upper_bound(n) for n in g.clips],
                     "u_before": {n: before[n] for n in names}, "u_after": {n: after[n] for n in names}})
    noise = [sum(u ** -2 for u in us.values()) for us in (before, after)]
    gain = 10 * math.log10(noise[0] / noise[1]) if terms else 0.0
    return Pow2AlignReport(links=len(groups), gain_db=gain, rows=rows)
