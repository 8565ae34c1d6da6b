"""Pre-quantization passes: pure GraphModule -> GraphModule rewrites.

Each pass takes the ATen graph that :func:`quantbench.engine.capture` returns
and rewrites it in place, returning the same module for chaining. Each is
idempotent: running it twice is a no-op the second time. Each ends with
``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import torch
from torch import fx

from quantbench.engine.graph import conv_groups, finish_graph, get_attr_tensor, op_name, set_attr_tensor
from quantbench.engine.ops import ops_of_kind, ops_tagged
from quantbench.engine.passes.fold import (
    decompose_sdpa,
    fold_constants,
    fold_layer_scale,
    fold_shape_constants,
)

__all__ = [
    "BN_STATS_META",
    "functionalize_inplace",
    "remove_dropout",
    "fold_bn",
    "bn_to_affine",
    "lift_scalar_constants",
    "sub_to_add",
    "PREQUANT_PTQ",
    "PREQUANT_PTQ_KEEP_BN",
    "PREQUANT_QAT",
    "run_passes",
]

aten = torch.ops.aten


def functionalize_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace in-place activations (``hardtanh_``, ``relu_``...) by their out-of-place form.

    Before: in-place ops may appear (mobilenet's ``ReLU6(inplace=True)``).
    After: none whose input has a single user, so quantizers can sit between
    ops without being overwritten. Idempotent.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._opname
        if not name.endswith("_") or name.startswith("_") or len(node.args) == 0:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        functional = getattr(aten, name[:-1], None)
        overload = getattr(functional, node.target._overloadname, None) if functional is not None else None
        if overload is not None:
            node.target = overload
    return finish_graph(gm)


def remove_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dropout nodes (identity at inference). Idempotent."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and op_name(node) in ops_of_kind("dropout"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return finish_graph(gm)


def _bn_params(gm: fx.GraphModule, bn: fx.Node, channels: int):
    args = list(bn.args) + [None] * (9 - len(bn.args))
    _, w, b, mean, var, _, _, eps, _ = args[:9]
    mean_t = get_attr_tensor(gm, mean.target).detach().float()
    var_t = get_attr_tensor(gm, var.target).detach().float()
    gamma = get_attr_tensor(gm, w.target).detach().float() if w is not None else torch.ones(channels)
    beta = get_attr_tensor(gm, b.target).detach().float() if b is not None else torch.zeros(channels)
    inv_std = torch.rsqrt(var_t + float(eps if eps is not None else 1e-5))
    return gamma, beta, mean_t, inv_std


#: Node meta ``fold_bn`` leaves on a convolution: the folded BatchNorm's ``beta`` and ``|gamma|`` (the
#: mean and standard deviation BN gives each output channel) and the folded ``weight_norm`` / ``bias``.
BN_STATS_META = "qb_bn_output_stats"


def _channel_norms(weight: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """The L2 norm of each output channel's weights (a conv's dim 0; a transposed conv's per group)."""
    w = weight.detach().float()
    if transposed:
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2).reshape(groups * w.shape[1], -1)
    return w.reshape(w.shape[0], -1).norm(dim=1)


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold an inference BatchNorm that follows a conv into the conv's weight and bias.

    Before: ``conv -> batch_norm(training=False)`` where the conv has one user
    and its weight is a constant. After: one conv with ``w * gamma/sigma`` and
    ``(b - mu) * gamma/sigma + beta``; the BN node is gone. Running it twice
    folds nothing more. Used for PTQ; QAT keeps BN and simulates folding
    (Jacob et al., arXiv 1712.05877, sec. 3.2).
    """
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or op_name(bn) != "batch_norm":
            continue
        conv = bn.args[0]
        if not (isinstance(conv, fx.Node) and op_name(conv) in ops_tagged("conv") and len(conv.users) == 1):
            continue
        w_node = conv.args[1]
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            continue
        transposed = op_name(conv).startswith("conv_transpose")
        weight = get_attr_tensor(gm, w_node.target).detach().float()
        out_ch = weight.shape[1] * conv_groups(conv) if transposed else weight.shape[0]
        gamma, beta, mean, inv_std = _bn_params(gm, bn, out_ch)
        factor = gamma * inv_std
        if transposed:
            groups = conv_groups(conv)
            w = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
            w = w * factor.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
            new_w = w.reshape(weight.shape)
        else:
            new_w = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
        b_node = conv.args[2] if len(conv.args) > 2 else None
        bias = get_attr_tensor(gm, b_node.target).detach().float() if b_node is not None else torch.zeros(out_ch)
        new_b = (bias - mean) * factor + beta
        with gm.graph.inserting_before(conv):
            w_name = set_attr_tensor(gm, f"{w_node.target}_bnfold", new_w, param=True)
            b_name = set_attr_tensor(gm, f"{w_node.target.rsplit('.', 1)[0]}.bias_bnfold", new_b, param=True)
            nw = gm.graph.get_attr(w_name)
            nb = gm.graph.get_attr(b_name)
        # What BN says of each output channel (mean beta, std |gamma|), and the folded weight's channel
        # norms and bias, so a later rescaling of the channel (equalization) can be traced back to it.
        conv.meta[BN_STATS_META] = {"beta": beta.detach().clone(), "gamma": gamma.detach().abs().clone(),
                                    "weight_norm": _channel_norms(new_w, transposed, conv_groups(conv)),
                                    "bias": new_b.detach().clone()}
        args = list(conv.args)
        args += [None] * max(0, 3 - len(args))
        args[1], args[2] = nw, nb
        conv.args = tuple(args)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
    return finish_graph(gm)


def bn_to_affine(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn an inference BatchNorm that could not be folded into ``x * a + b``.

    Integer hardware has no BatchNorm; as a per-channel multiply and add with
    constant tensors it quantizes like any other elementwise op. Before: a
    ``batch_norm(training=False)`` node; after: ``add(mul(x, a), b)`` with
    ``a, b`` shaped ``(C, 1, ..., 1)``. Idempotent.
    """
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or op_name(bn) != "batch_norm":
            continue
        if len(bn.args) > 5 and bn.args[5]:
            continue  # training-mode BN (QAT) is left alone
        x = bn.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if val is None or val.dim() < 2:
            continue
        channels = val.shape[1]
        gamma, beta, mean, inv_std = _bn_params(gm, bn, channels)
        shape = (channels, *([1] * (val.dim() - 2)))
        a = (gamma * inv_std).reshape(shape)
        b = (beta - mean * gamma * inv_std).reshape(shape)
        with gm.graph.inserting_before(bn):
            an = gm.graph.get_attr(set_attr_tensor(gm, f"{bn.name}_scale", a, param=False))
            bnode = gm.graph.get_attr(set_attr_tensor(gm, f"{bn.name}_shift", b, param=False))
            mul = gm.graph.call_function(aten.mul.Tensor, (x, an))
            add = gm.graph.call_function(aten.add.Tensor, (mul, bnode))
        mul.meta["val"] = val
        add.meta["val"] = val
        bn.replace_all_uses_with(add)
        gm.graph.erase_node(bn)
    return finish_graph(gm)


def lift_scalar_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Make Python-number operands of add/sub/mul/div tensor constants.

    ``x + 10`` exports as ``aten.add.Tensor(x, 10)``: on integer hardware the
    10 must be an integer too, so it becomes a 0-d constant (a buffer read by a
    ``get_attr`` node) that the annotator quantizes like a weight.
    ``rsub(x, c)`` becomes ``sub(c, x)``. Idempotent (no scalars remain).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or op_name(node) not in ops_of_kind("binary") | {"rsub"}:  # operator.mul: shape arithmetic
            continue
        args = list(node.args[:2])
        if not any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            continue
        if not any(isinstance(a, fx.Node) for a in args):
            continue
        for i, a in enumerate(args):
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                with gm.graph.inserting_before(node):
                    name = set_attr_tensor(gm, f"{node.name}_const", torch.tensor(float(a)), param=False)
                    args[i] = gm.graph.get_attr(name)
                    args[i].meta["val"] = torch.tensor(float(a))
        if op_name(node) == "rsub":
            node.target = aten.sub.Tensor
            args = [args[1], args[0]]
        elif not str(node.target).endswith(".Tensor"):
            node.target = getattr(aten, op_name(node)).Tensor
        node.args = (*args, *node.args[2:])
    return finish_graph(gm)


def _numel(gm: fx.GraphModule, node) -> int | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return get_attr_tensor(gm, node.target).numel()
    return None


def sub_to_add(gm: fx.GraphModule) -> fx.GraphModule:
    """Write a subtraction of tensors as an addition: ``a - b`` -> ``a + (-b)``.

    Integer runtimes add quantized tensors (onnxruntime's QLinearAdd) but have no
    quantized subtraction, so ``DQ -> Sub -> Q`` would run in float. Before: ``sub``
    nodes (a scalar constant operand excepted: that is a table once frozen). After:
    a constant ``b`` is negated in place of the constant (exact); an activation ``b``
    goes through ``neg``, an elementwise op that gets its own quantizer and becomes a
    table (an exact integer negation for a symmetric grid). Idempotent (no such sub is left).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_name(node) != "sub" or len(node.args) != 2:
            continue
        a, b = node.args
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1 or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if _numel(gm, a) == 1 or _numel(gm, b) == 1:
            continue
        with gm.graph.inserting_before(node):
            if b.op == "get_attr":
                neg = gm.graph.get_attr(set_attr_tensor(gm, f"{node.name}_neg", -get_attr_tensor(gm, b.target).detach(),
                                                        param=False))
            else:
                neg = gm.graph.call_function(aten.neg.default, (b,))
                neg.meta["val"] = b.meta.get("val")
                neg.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            add = gm.graph.call_function(aten.add.Tensor, (a, neg))
        add.meta.update(node.meta)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
    return finish_graph(gm)


PREQUANT_PTQ = (functionalize_inplace, remove_dropout, fold_constants, decompose_sdpa, fold_bn,
                fold_layer_scale, bn_to_affine, lift_scalar_constants, sub_to_add)
PREQUANT_PTQ_KEEP_BN = (functionalize_inplace, remove_dropout, fold_constants, decompose_sdpa,
                        fold_layer_scale, lift_scalar_constants, sub_to_add)
# QAT keeps dropout (switched by quantbench.engine.qat), BatchNorm and layer scale (gamma is trained); the
# quantizer appends passes.qat_bn.simulate_bn_folding to this list.
PREQUANT_QAT = (functionalize_inplace, fold_shape_constants, decompose_sdpa, lift_scalar_constants, sub_to_add)


def run_passes(gm: fx.GraphModule, passes) -> fx.GraphModule:
    """Run a pipeline of passes top to bottom."""
    for p in passes:
        gm = p(gm)
    return gm
