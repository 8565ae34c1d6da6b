"""Learned rounding: AdaRound layer by layer, and block reconstruction (BRECQ) with QDrop.

AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", arXiv 2004.10568) keeps each weight's scale and learns, per
element, whether ``w / s`` rounds down or up: ``w~ = s * clamp(floor(w / s) +
h(V), qmin, qmax)`` with the rectified sigmoid ``h(V) = clamp(sigmoid(V)
(zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1), minimising the
layer's output error on the calibration data plus ``lambda * sum(1 - |2h - 1|^beta)``,
a regularizer whose exponent ``beta`` is annealed from ``beta_start`` to
``beta_end`` after a warm-up without it, which drives every ``h`` to 0 or 1. The
input is the quantized model's (every earlier layer already rounded), the
target the float model's output, and the loss includes the activation after
the layer (sec. 5 of the paper).

Block reconstruction (Li et al., "BRECQ", arXiv 2102.05426) learns the
rounding of every weight of a block at once against the block's float output,
with the activations inside the block quantized; their steps are learned too
(LSQ's gradient, arXiv 1902.08153) where the scale is a float. QDrop (Wei et
al., arXiv 2203.05740) drops each activation quantization at random (element
by element, with probability ``qdrop``) while reconstructing, the block's input
included, which flattens the loss landscape the quantized model lands in.

The result is written back as a float weight that lies exactly on the grid
(``s * k``), so the weight quantizer, its frozen integers and the exported ONNX
initializer all hold the learned integers ``k``; the scales are not changed
(a power-of-two scale stays one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.engine.fake_quant import FakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import get_attr_tensor
from quantbench.engine.learnable import lsq_fake_quantize, lsq_grad_scale, lsq_min_step
from quantbench.engine.ptq.replay import Block, Replay, blocks, quantizer_modules
from quantbench.progress import progress

__all__ = ["ReconstructionReport", "adaround", "brecq", "reconstruct"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def _view(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if t.dim() == 0 or axis is None:
        return t
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return t.reshape(shape)


class _SoftRound(torch.autograd.Function):
    """``s * (clamp(floor + h(V), lo, hi) - zp)`` and, in the backward pass only, the gradient of the
    rounding regularizer ``reg_weight * sum(1 - |2h - 1|^beta)`` added to ``V``'s.

    One function for both, since the weight tensors are large and the work is memory bound: the
    regularizer's value is never needed, only its gradient, and the few passes over ``V`` are shared.
    """

    @staticmethod
    def forward(ctx, v, floor, scale, zero_point, lo, hi, beta, reg_weight):
        sig = torch.sigmoid(v)
        h = sig.mul(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        q = h.add(floor)
        inside = (q >= lo) & (q <= hi) & (h > 0) & (h < 1)
        ctx.save_for_backward(sig, h, inside, scale)
        ctx.beta, ctx.reg_weight = beta, reg_weight
        return q.clamp_(lo, hi).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        sig, h, inside, scale = ctx.saved_tensors
        grad_h = grad_out * scale
        if ctx.reg_weight:
            t = h.mul(2).sub_(1)
            grad_h.add_(t.abs().pow_(ctx.beta - 1).mul_(torch.sign(t)).mul_(-2 * ctx.beta * ctx.reg_weight))
        dh = sig.mul(1 - sig).mul_(ZETA - GAMMA).mul_(inside)
        return grad_h.mul_(dh), None, None, None, None, None, None, None


class SoftRounding(nn.Module):
    """The learned rounding of one weight: ``s * (clamp(floor(w/s) + h(V) + zp, qmin, qmax) - zp)``."""

    def __init__(self, weight: torch.Tensor, quantizer: FakeQuantizeBase) -> None:
        super().__init__()
        scale, zero_point = quantizer.qparams()
        axis = quantizer.ch_axis
        w = weight.detach().float()
        self.scale = _view(scale.to(w.device, torch.float32), w, axis)
        self.zero_point = _view(zero_point.to(w.device, torch.float32), w, axis)
        self.qmin, self.qmax = quantizer.spec.qmin, quantizer.spec.qmax
        ratio = w / self.scale
        self.floor = torch.floor(ratio) + self.zero_point
        rest = (ratio + self.zero_point - self.floor).clamp(1e-4, 1 - 1e-4)
        # h(V) = rest at the start: V = -log((zeta - gamma) / (rest - gamma) - 1)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.beta, self.reg_weight = 2.0, 0.0  # the regularizer's exponent and weight for this step

    def forward(self, _module: Any = None, _weight: Any = None) -> torch.Tensor:
        return _SoftRound.apply(self.v, self.floor, self.scale, self.zero_point, self.qmin, self.qmax,
                                self.beta, self.reg_weight)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The weight with every element rounded the way it learned (``h >= 1/2``, i.e. ``V >= 0``)."""
        q = (self.floor + (self.v >= 0).float()).clamp(self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


class LearnedStep(nn.Module):
    """An activation quantizer's float step, learned with LSQ's gradient during reconstruction."""

    def __init__(self, quantizer: FakeQuantize) -> None:
        super().__init__()
        self.step = nn.Parameter(quantizer.scale.detach().clone().float())
        self.qmin, self.qmax = quantizer.spec.qmin, quantizer.spec.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = lsq_grad_scale(max(1, x[0].numel()), self.qmax)
        step = self.step.abs().clamp_min(lsq_min_step())
        return lsq_fake_quantize(x, step, self.qmin, self.qmax, g, None)


@dataclass
class ReconstructionReport:
    """What one learned-rounding pass did, per block (for logs and MLflow)."""

    algorithm: str
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{self.algorithm}: {len(self.rows)} blocks in {self.seconds:.1f} s"]
        lines += [f"  {r['block']}: {r['layers']} layers, loss {r['loss_start']:.4g} -> {r['loss_end']:.4g}, "
                  f"{r['flipped']:.1%} rounded away from nearest" for r in self.rows]
        return "\n".join(lines)


def _learnable_steps(replay: Replay, block: Block, act_lr: float) -> dict[str, LearnedStep]:
    """Activation quantizers used only inside this block, with a float scale and no zero point."""
    if act_lr <= 0:
        return {}
    gm = replay.gm
    inside = set(block.nodes)
    out = {}
    for name, module in quantizer_modules(gm, block.nodes).items():
        sites = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if not all(s in inside for s in sites):
            continue
        if type(module) is FakeQuantize and module.spec.scale_type == "float" and module.spec.symmetric \
                and module.scale.dim() == 0:
            out[name] = LearnedStep(module).to(module.scale.device)
    return out


def reconstruct(replay: Replay, block: Block, *, iters: int, batch_size: int, lr: float, reg_weight: float,
                warmup: float, beta_start: float, beta_end: float, seed: int, qdrop: float = 0.0,
                act_lr: float = 0.0) -> dict:
    """Learn the rounding of every weight of ``block`` (see the module docstring); returns its row."""
    gm = replay.gm
    replay.advance_to(block.nodes[0])
    q_in = {n: replay.values(n, quantized=True) for n in block.inputs}
    fp_in = {n: replay.values(n, quantized=False) for n in block.inputs}
    with torch.no_grad():
        targets = replay.run(block.nodes, fp_in, quantized=False, wanted=block.outputs)
    samples = next(iter(q_in.values())).shape[0]
    device = targets[0].device
    rounding = {layer.weight_fq.target: SoftRounding(get_attr_tensor(gm, layer.weight.target),
                                                     gm.get_submodule(layer.weight_fq.target))
                for layer in block.layers}
    steps = _learnable_steps(replay, block, act_lr)
    act_quantizers = quantizer_modules(gm, block.nodes)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {"drop": 0.0}

    def act_override(name: str):
        def apply(module: FakeQuantizeBase, x: torch.Tensor) -> torch.Tensor:
            y = steps[name](x) if name in steps else module(x)
            if state["drop"] > 0:
                keep_float = torch.rand(x.shape, generator=gen, device=x.device) < state["drop"]
                y = torch.where(keep_float, x, y)
            return y
        return apply

    replay.overrides = {**{k: v for k, v in rounding.items()},
                        **{name: act_override(name) for name in act_quantizers}}
    params = [{"params": [r.v for r in rounding.values()], "lr": lr}]
    if steps:
        params.append({"params": [s.step for s in steps.values()], "lr": act_lr})
    optimizer = torch.optim.Adam(params, fused=True)  # one kernel over V: the step is memory bound
    warm = int(warmup * iters)
    first = last = float("nan")
    try:
        for t in range(iters):
            idx = torch.randint(samples, (min(batch_size, samples),), generator=gen, device=device)
            inputs = {}
            for n in block.inputs:
                x = q_in[n][idx]
                if qdrop > 0:
                    x = torch.where(torch.rand(x.shape, generator=gen, device=x.device) < qdrop, fp_in[n][idx], x)
                inputs[n] = x
            state["drop"] = qdrop
            outs = replay.run(block.nodes, inputs, quantized=True, wanted=block.outputs)
            rec = sum((o.float() - tgt[idx].float()).pow(2).flatten(1).sum(1).mean() for o, tgt in zip(outs, targets))
            if t >= warm:  # the regularizer, annealed: its gradient joins V's in the backward pass
                beta = beta_end + (beta_start - beta_end) * (1 - (t - warm) / max(1, iters - warm))
                for r in rounding.values():
                    r.beta, r.reg_weight = beta, reg_weight
            optimizer.zero_grad(set_to_none=True)
            rec.backward()
            optimizer.step()
            if t == 0:
                first = rec.item()
            last = rec.detach()  # read once at the end: no device sync per step
        state["drop"] = 0.0
        flipped = total = 0
        with torch.no_grad():
            for layer in block.layers:
                r = rounding[layer.weight_fq.target]
                weight = get_attr_tensor(gm, layer.weight.target)
                nearest = torch.round(weight.detach().float() / r.scale)
                new = r.hard_weight()
                flipped += int((torch.round(new / r.scale) != nearest).sum())
                total += new.numel()
                weight.data.copy_(new.to(weight.dtype))
            for name, step in steps.items():
                module = gm.get_submodule(name)
                module.scale = step.step.detach().abs().clamp_min(lsq_min_step()).to(module.scale)
    finally:
        replay.overrides = {}
    return {"block": block.name, "layers": len(block.layers), "loss_start": first, "loss_end": float(last),
            "flipped": flipped / max(1, total), "learned_steps": len(steps)}


def _run(name: str, gm, batches, block_list: list[Block], options: dict[str, Any]) -> ReconstructionReport:
    start = time.perf_counter()
    replay = Replay(gm, batches)
    report = ReconstructionReport(name)
    for block in progress(block_list, desc=name, unit="block"):
        report.rows.append(reconstruct(replay, block, **options))
        log.debug("%s %s", name, report.rows[-1])
    report.seconds = time.perf_counter() - start
    return report


def adaround(gm, batches, *, iters: int = 1000, batch_size: int = 32, lr: float = 1e-2, reg_weight: float = 0.01,
             warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0, seed: int = 0
             ) -> ReconstructionReport:
    """AdaRound every weighted layer of a calibrated fake-quant graph, in graph order (in place)."""
    layer_blocks = blocks(gm, layerwise=True, include_output_quantizer=False)
    return _run("adaround", gm, batches, layer_blocks,
                dict(iters=iters, batch_size=batch_size, lr=lr, reg_weight=reg_weight, warmup=warmup,
                     beta_start=beta_start, beta_end=beta_end, seed=seed))


def brecq(gm, batches, *, iters: int = 2000, batch_size: int = 32, lr: float = 1e-2, act_lr: float = 4e-5,
          reg_weight: float = 0.01, warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0,
          qdrop: float = 0.5, max_block_layers: int = 4, seed: int = 0) -> ReconstructionReport:
    """Block reconstruction (with QDrop when ``qdrop > 0``) of a calibrated fake-quant graph (in place)."""
    block_list = blocks(gm, max_layers=max_block_layers, include_output_quantizer=True)
    return _run("brecq", gm, batches, block_list,
                dict(iters=iters, batch_size=batch_size, lr=lr, act_lr=act_lr, reg_weight=reg_weight,
                     warmup=warmup, beta_start=beta_start, beta_end=beta_end, qdrop=qdrop, seed=seed))
