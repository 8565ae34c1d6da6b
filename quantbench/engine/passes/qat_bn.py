"""BatchNorm in QAT: simulated folding while training, real folding at freeze.

Integer hardware runs ``conv -> batch_norm`` as one conv whose weight is
``w * gamma / sigma`` and whose bias is ``(b - mu) * gamma / sigma + beta``.
QAT must therefore quantize *that* weight, yet keep BatchNorm's batch
statistics while training (Jacob et al., arXiv 1712.05877, sec. 3.2;
Krishnamoorthi, arXiv 1806.08342, sec. 3.2). :func:`simulate_bn_folding`
rewrites the graph like PyTorch's QAT conv-bn modules, with the int32 bias
in the loop::

    f = gamma * rsqrt(running_var + eps)          # live BN buffers, every forward
    y = conv(x_q, q_w(w * f), q_b((b - mu) * f + beta))   # bn_fold_weight, bn_fold_bias
    out = bn_qat_output(y, ...)                   # train: BN((y - q_b) / f + b); eval: y

In training BN normalises with the batch statistics and updates the running
ones, so the weight quantizer sees the running-folded weight while the
output is rescaled by ``sigma_running / sigma_batch`` (the paper's
correction). In eval, or with BN frozen, the graph *is* the folded conv with
its int32 bias, which :func:`fold_qat_batchnorm` makes permanent at freeze:
eval-mode QAT and the frozen graph compute the same thing.
"""

from __future__ import annotations

import torch
from torch import fx

from quantbench.engine.graph import constant_value, conv_groups, finish_graph, op_name, set_attr_tensor
from quantbench.engine.ops import ops_of_kind, ops_tagged
from quantbench.engine.passes.prequant import remove_dropout

__all__ = [
    "BATCH_STATS_ARG",
    "QAT_BN_OPS",
    "bn_fold_bias",
    "bn_fold_weight",
    "bn_qat_output",
    "fold_qat_batchnorm",
    "simulate_bn_folding",
]


def _factor(gamma: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    f = torch.rsqrt(running_var + eps)
    return f if gamma is None else gamma * f


def _out_channel_view(factor: torch.Tensor, weight: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """``factor`` (C_out,) shaped to multiply ``weight`` along its output channels."""
    ones = [1] * (weight.dim() - 2)
    if not transposed:
        return factor.reshape(-1, 1, *ones)
    # conv_transpose weights are (C_in, C_out / groups, k...): output channel g * C_out/groups + j.
    per_group = weight.shape[1]
    view = factor.reshape(groups, 1, per_group, *ones).expand(groups, weight.shape[0] // groups, per_group,
                                                              *ones)
    return view.reshape(weight.shape[0], per_group, *ones)


def bn_fold_weight(weight: torch.Tensor, gamma: torch.Tensor | None, running_var: torch.Tensor, eps: float,
                   transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """The conv weight folded with BN's running statistics: ``w * gamma / sqrt(running_var + eps)``.

    Differentiable in ``weight`` and ``gamma``; the running variance is a buffer.
    """
    return weight * _out_channel_view(_factor(gamma, running_var, eps), weight, transposed, groups)


def bn_fold_bias(bias: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                 running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                 batch_stats: bool = False) -> torch.Tensor:
    """The conv bias folded with BN's running statistics: ``(b - mu) * gamma / sigma + beta``.

    With ``batch_stats`` (training with batch-statistics BN, argument 6, which
    :mod:`quantbench.engine.qat` switches) the result is not differentiated:
    BN removes any per-channel shift of its input, so that gradient is
    exactly zero, and not tracking it spares the conv its bias-gradient pass.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not batch_stats):
        b = -running_mean if bias is None else bias - running_mean
        b = b * _factor(gamma, running_var, eps)
        return b if beta is None else b + beta


def bn_qat_output(y: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                  running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float | None,
                  eps: float, bias: torch.Tensor | None, folded_bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm after a conv that ran with the folded weight and the (quantized) folded bias.

    ``y = conv(x, q(w * f), q(b_fold))``. Not training (eval, or BN frozen):
    that already is the BN output, ``y`` is returned as is: the frozen
    integer conv computes exactly this. Training: the fold is undone,
    ``z = (y - b_fold) / f + b`` is BN's input in the float model up to the
    weight's quantization, and BN normalises it with the batch statistics
    (updating the running ones), which applies the paper's
    ``sigma_running / sigma_batch`` correction. A channel with ``gamma == 0``
    (zero folded weight) is divided by 1 instead of 0; its output stays ``beta``.

    ``f`` and the shift are not differentiated here: batch-statistics BN is
    invariant to a per-channel shift of its input and to the magnitude of a
    per-channel scale, so those gradients are zero (up to BN's eps); not
    tracking them saves several passes over the activation per layer.

    The arguments follow ``aten.batch_norm`` (``training`` at index 5, which
    :mod:`quantbench.engine.qat` switches; a BN captured from a module with
    ``momentum=None`` has momentum 0 in the graph and keeps its running
    statistics).
    """
    if not training:
        return y
    with torch.no_grad():
        f = _factor(gamma, running_var, eps)
        f = torch.where(f == 0, torch.ones_like(f), f)
        shift = -folded_bias / f if bias is None else bias - folded_bias / f
        # BN normalises y / f exactly as y / f + shift; only the running mean sees the shift, so
        # it is tracked in the shifted frame (a C-vector) instead of adding it to the activation.
        mean_frame = running_mean - shift
    out = torch.nn.functional.batch_norm(y / f.reshape(1, -1, *([1] * (y.dim() - 2))), mean_frame, running_var,
                                         gamma, beta, True, 0.1 if momentum is None else momentum, eps)
    with torch.no_grad():
        running_mean.copy_(mean_frame + shift)
    return out


QAT_BN_OPS = ops_of_kind("qat_bn")
"""The op names of the functions above (registered in :mod:`quantbench.engine.ops` as kind ``qat_bn``)."""
BATCH_STATS_ARG = {"batch_norm": 5, bn_qat_output.__name__: 5, bn_fold_bias.__name__: 6}
"""Ops whose argument at that index says "BatchNorm uses batch statistics" (switched by train/eval).
All three take the running mean at index 3 (None: BN without running statistics, left alone)."""


def _bn_args(bn: fx.Node) -> list:
    return list(bn.args) + [None] * (9 - len(bn.args))


def _foldable(bn: fx.Node) -> bool:
    if bn.op != "call_function" or op_name(bn) != "batch_norm":
        return False
    conv = bn.args[0]
    _, _, _, mean, var, *_ = _bn_args(bn)
    return (isinstance(conv, fx.Node) and op_name(conv) in ops_tagged("conv") and len(conv.users) == 1
            and isinstance(conv.args[1], fx.Node) and conv.args[1].op == "get_attr"
            and isinstance(mean, fx.Node) and mean.op == "get_attr"
            and isinstance(var, fx.Node) and var.op == "get_attr")


def simulate_bn_folding(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``conv -> batch_norm`` so the conv computes with the BN-folded weight and bias (QAT).

    Before: ``batch_norm(conv(x, w, b), gamma, beta, mu, var, training, m, eps)``
    with a constant ``w``, the conv's only user the BN. After:
    ``bn_qat_output(conv(x, bn_fold_weight(w, ...), bn_fold_bias(b, ...)),
    gamma, beta, mu, var, training, m, eps, b, bn_fold_bias(...))``: the
    annotator puts the weight quantizer on ``bn_fold_weight`` and the int32
    bias quantizer on ``bn_fold_bias``, as on a plain conv. Same output in
    float. Idempotent: a rewritten conv is no longer followed by ``batch_norm``.
    """
    graph = gm.graph
    for bn in list(graph.nodes):
        if not _foldable(bn):
            continue
        conv = bn.args[0]
        _, gamma, beta, mean, var, training, momentum, eps, _ = _bn_args(bn)
        eps = float(eps if eps is not None else 1e-5)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        w, b = args[1], args[2]
        transposed = op_name(conv).startswith("conv_transpose")
        with graph.inserting_before(conv):
            wf = graph.create_node("call_function", bn_fold_weight,
                                   (w, gamma, var, eps, transposed, conv_groups(conv)), name=f"{w.name}_folded")
            bf = graph.create_node("call_function", bn_fold_bias,
                                   (b, gamma, beta, mean, var, eps, bool(training)), name=f"{w.name}_folded_bias")
        wf.meta["val"] = w.meta.get("val")
        args[1], args[2] = wf, bf
        conv.args = tuple(args)
        with graph.inserting_after(bn):
            out = graph.call_function(bn_qat_output, (conv, gamma, beta, mean, var, bool(training), momentum,
                                                      eps, b, bf))
        out.meta = dict(bn.meta)
        bn.replace_all_uses_with(out)
        graph.erase_node(bn)
    return finish_graph(gm)


def fold_qat_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold the simulated conv-BN pairs of a QAT graph for good: the first step of freezing it.

    Before: a QAT graph from :func:`simulate_bn_folding` (quantizers inserted),
    in train or eval mode. After: an inference graph, computing what the QAT
    graph computes in eval mode: each ``bn_qat_output`` is gone (in eval it is
    the identity), each folded weight and bias is a constant computed from the
    running statistics as they are now, read by the same quantizers (so it is
    baked with the learned scales); every other BatchNorm uses its running
    statistics; dropout is gone. A PTQ graph is unchanged except for those
    last two rules. Running it twice is a no-op.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is bn_qat_output:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in (bn_fold_weight, bn_fold_bias):
            value = constant_value(gm, node).detach()
            with graph.inserting_before(node):
                const = graph.get_attr(set_attr_tensor(gm, node.name, value, param=True))
            const.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(const)
            graph.erase_node(node)
        elif op_name(node) == "batch_norm" and len(node.args) > 5 and node.args[5]:
            node.update_arg(5, False)
    gm = remove_dropout(gm)
    return finish_graph(gm)
