"""Bias correction: remove the expected output shift that weight quantization causes.

Quantizing a weight ``W`` to ``W~`` changes a layer's output by ``(W~ - W) x``,
whose expectation over the data is in general not zero: a biased error that
the following layers accumulate (Nagel et al., "Data-Free Quantization", arXiv
1906.04721, sec. 4.2). The correction adds ``E[(W - W~) x]`` to the bias, per
output channel.

``empirical`` measures it on the calibration data, layer by layer in graph
order, with the input the *quantized* model gives that layer (every earlier
layer already corrected): ``E[op(x~, W) - op(x~, W~)]``. ``analytic`` is data
free for a layer whose input is the activation of a BatchNorm-folded
convolution: under BN's assumption that output is ``N(beta, gamma^2)`` per
channel, so ``E[x]`` is the mean of a (clipped) normal, through a ReLU, a ReLU6
or nothing (the paper's eq. 13-15); other layers are corrected empirically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from quantbench.engine.graph import conv_groups, get_attr_tensor, op_name
from quantbench.engine.ops import op_kind, ops_tagged
from quantbench.engine.passes.prequant import BN_STATS_META
from quantbench.engine.ptq.replay import Layer, Replay, weighted_layers

__all__ = ["BiasCorrectionReport", "correct_bias"]


@dataclass
class BiasCorrectionReport:
    """Per corrected layer: the mean |shift| before and after (measured on the calibration data)."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"bias correction: {len(self.rows)} layers in {self.seconds:.1f} s"]
        lines += [f"  {r['layer']} ({r['how']}): mean |E[error]| {r['shift_before']:.3g} -> {r['shift_after']:.3g}"
                  for r in self.rows]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _channel_sum(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    axis = axis % y.dim()
    dims = [d for d in range(y.dim()) if d != axis]
    return y.double().sum(dims), y.numel() // y.shape[axis]


def _shift(replay: Replay, layer: Layer) -> torch.Tensor:
    """``E[op(x~, W) - op(x~, W~)]`` per output channel over the calibration batches."""
    node = layer.node
    total, count = None, 0
    with torch.no_grad():
        for b in range(len(replay.batches)):
            env = {a: replay.q[a][b] for a in node.all_input_nodes if a in replay.q}
            y_q = replay.evaluate(node, env, quantized=True)
            replay.overrides[layer.weight_fq.target] = lambda _module, w: w
            try:
                y_f = replay.evaluate(node, env, quantized=True)
            finally:
                replay.overrides.pop(layer.weight_fq.target, None)
            s, n = _channel_sum(y_f - y_q, layer.out_axis)
            total = s if total is None else total + s
            count += n
    return total / max(1, count)


def _normal_mean_through(act: str, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[f(z)], z ~ N(mu, sigma^2), for f = identity, ReLU, or clip to [0, 6]."""
    if act == "none":
        return mu
    sigma = sigma.clamp_min(1e-12)
    norm = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))

    def relu_mean(m: torch.Tensor) -> torch.Tensor:  # E[max(z - shift, 0)] with m the shifted mean
        a = m / sigma
        return m * norm.cdf(a) + sigma * torch.exp(norm.log_prob(a))

    if act == "relu":
        return relu_mean(mu)
    return relu_mean(mu) - relu_mean(mu - 6.0)  # min(max(z, 0), 6) = relu(z) - relu(z - 6)


def _parameter(arg) -> fx.Node | None:
    """The get_attr behind an argument (through its quantizer), or None."""
    if isinstance(arg, fx.Node) and arg.op == "call_module":
        arg = arg.args[0]
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _analytic_input_mean(gm: fx.GraphModule, layer: Layer) -> torch.Tensor | None:
    """E[x] per input channel from the BN statistics of the conv feeding ``layer``, or None."""
    x = layer.node.args[0]
    act = "none"
    while isinstance(x, fx.Node):
        if x.op == "call_module":  # a quantizer: its rounding error is zero-mean to first order
            x = x.args[0]
            continue
        if op_kind(x) == "activation":
            name = op_name(x)
            if name not in ops_tagged("relu_like") or act != "none":
                return None
            bounds = tuple(x.args[1:3]) if len(x.args) >= 3 else (0.0, 6.0 if name == "relu6" else math.inf)
            if name == "relu" or bounds == (0.0, math.inf):
                act = "relu"
            elif bounds == (0.0, 6.0):
                act = "relu6"
            else:
                return None
            x = x.args[0]
            continue
        stats = x.meta.get(BN_STATS_META)
        if stats is None or len(x.args) < 3:
            return None
        weight_node, bias_node = _parameter(x.args[1]), _parameter(x.args[2])
        if weight_node is None or bias_node is None:
            return None
        # The channel may have been rescaled (equalization: w / s, b / s) and its bias lowered (high-bias
        # absorption: b - c) since BN was folded; both are read off the folded weight and bias.
        w = get_attr_tensor(gm, weight_node.target).detach().double()
        bias = get_attr_tensor(gm, bias_node.target).detach().double()
        s = stats["weight_norm"].double() / w.reshape(w.shape[0], -1).norm(dim=1).clamp_min(1e-30)
        absorbed = stats["bias"].double() / s - bias
        mu = stats["beta"].double() / s - absorbed
        return _normal_mean_through(act, mu, stats["gamma"].double() / s)
    return None


def _analytic_shift(gm: fx.GraphModule, layer: Layer) -> torch.Tensor | None:
    if op_name(layer.node) not in ops_tagged("integer_kernel") or op_name(layer.node) == "conv3d":
        return None
    mean = _analytic_input_mean(gm, layer)
    if mean is None:
        return None
    w = get_attr_tensor(gm, layer.weight.target).detach().double()
    wq = gm.get_submodule(layer.weight_fq.target)(w.float()).double()
    err = w - wq  # (out, in/groups, k...)
    groups = conv_groups(layer.node) if op_name(layer.node) != "linear" else 1
    if err.dim() == 2:
        return err @ mean if mean.numel() == err.shape[1] else None
    summed = err.flatten(2).sum(2)  # (out, in/groups)
    if groups == 1:
        return summed @ mean if mean.numel() == summed.shape[1] else None
    per_group_out = summed.shape[0] // groups
    if mean.numel() != summed.shape[1] * groups:
        return None
    m = mean.reshape(groups, -1)  # (groups, in/groups)
    return (summed.reshape(groups, per_group_out, -1) * m[:, None, :]).sum(-1).reshape(-1)


def correct_bias(gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]], *, mode: str = "empirical"
                 ) -> BiasCorrectionReport:
    """Correct every weighted layer's bias of a calibrated fake-quant graph, in graph order (in place)."""
    start = time.perf_counter()
    replay = Replay(gm, batches)
    report = BiasCorrectionReport()
    layers = weighted_layers(gm)
    # Before any bias moves: a producer's corrected bias would read as a shift of its BN mean.
    analytic = {layer.name: _analytic_shift(gm, layer) for layer in layers} if mode == "analytic" else {}
    for layer in layers:
        if layer.bias is None:
            report.skipped.append((layer.name, "no bias to correct"))
            continue
        replay.advance_to(layer.node)
        measured = _shift(replay, layer)
        how, shift = "empirical", measured
        predicted = analytic.get(layer.name)
        if predicted is not None and predicted.shape == measured.shape:
            how, shift = "analytic", predicted
        bias = get_attr_tensor(gm, layer.bias.target)
        with torch.no_grad():
            bias.add_(shift.to(bias.dtype).to(bias.device))
        # What is left of the measured shift (the bias quantizer then rounds on the int32 grid, s_x * s_w).
        report.rows.append({"layer": layer.name, "how": how, "shift_before": float(measured.abs().mean()),
                            "shift_after": float((measured - shift).abs().mean())})
    replay.advance_to(None)
    report.seconds = time.perf_counter() - start
    return report

