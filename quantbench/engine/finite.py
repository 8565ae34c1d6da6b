"""NaN / inf checks of quantizer state: QAT that diverges stops at once, naming the quantizer.

A learned step (LSQ, arXiv 1902.08153) or log2 threshold (TQT, arXiv
1903.08066) that an optimizer drives to NaN or inf poisons every later
step silently: the loss may stay finite for a while (a clamp hides it), BN
statistics fill with NaN, and the failure surfaces much later as
``ValueError: cannot convert float NaN to integer`` deep inside freeze or
export. These checks name the culprit in one line instead::

    qat step 3: quantizer activation_fq_conv2d_3 (conv2d_3) has a NaN scale; lower ...

* :class:`QuantizerGuard`: the training loop's per-step check. The
  quantizers are found once; each step their own tensors (LSQ steps, TQT
  log2 thresholds, static scales) are concatenated into one finiteness flag
  that stays on the device, so the loop folds it into the host sync it
  already makes for its loss check. Only when something is non-finite does
  it look at each quantizer, to name the first bad one.
* :func:`check_finite_quantizers`: the same, plus each quantizer's effective
  scale (``qparams``; catches a finite ``log2_t`` whose ``2^ceil(log2_t)``
  overflows); :func:`~quantbench.engine.passes.freeze.freeze_graph` calls it.
* :func:`check_finite_qdq`: the scales and zero points baked into a frozen
  graph's Q/DQ calls and integer kernels; :func:`~quantbench.engine.export.export_onnx`
  calls it.

Every check raises :class:`~quantbench.engine.errors.NonFiniteError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx, nn

from quantbench.engine.errors import NonFiniteError
from quantbench.engine.fake_quant import FakeQuantizeBase
from quantbench.engine.graph import get_attr_tensor
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES

__all__ = ["QuantizerGuard", "check_finite_qdq", "check_finite_quantizers"]

#: What to do about a quantizer that went non-finite in training (the default hint).
_DIVERGED = ("the quantizer parameters diverged: lower the learning rate (the quantizer parameters' first), "
            "clip gradients (torch.nn.utils.clip_grad_norm_), or start QAT from a calibrated model")

_RETRAIN = ("the QAT run that trained it diverged: retrain with a lower learning rate for the quantizer "
            "parameters or with gradient clipping")


def _describe(values: torch.Tensor, what: str) -> str | None:
    """``"a NaN scale"``, ``"inf in 3 of 16 channels of its scale"``; None when all finite (host syncs)."""
    values = values.detach()
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if not count:
        return None
    kind = "NaN" if bool(torch.isnan(values).any()) else "inf"
    if values.numel() == 1:
        return f"{'an' if kind == 'inf' else 'a'} {kind} {what}"
    return f"{kind} in {count} of {values.numel()} channels of its {what}"


def _own_state(m: FakeQuantizeBase) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantizer's own floating-point tensors (not its observer's: an empty observer holds +-inf)."""
    for name, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
        if t.dtype.is_floating_point:
            yield name, t


def _named_quantizers(model: nn.Module) -> list[tuple[str, FakeQuantizeBase]]:
    """Every quantizer (derived bias ones included) with its module path, in graph order when there is a graph.

    Graph order makes "the first bad quantizer" the one nearest the input: where a NaN starts.
    """
    found = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}
    order: dict[str, None] = {}
    if isinstance(model, fx.GraphModule):
        order = dict.fromkeys(n.target for n in model.graph.nodes if n.op == "call_module" and n.target in found)
    order.update(dict.fromkeys(found))
    return [(name, found[name]) for name in order]


def _label(path: str, m: FakeQuantizeBase) -> str:
    return f"{path} ({m.name})" if m.name and m.name != path else path


class QuantizerGuard:
    """The quantizers of one model, found once, checked for NaN / inf with at most one host sync.

    Args:
        model: a fake-quant GraphModule (or any module holding quantizers;
            one without quantizers makes every check a no-op).
    """

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = _named_quantizers(model)

    def finite(self) -> torch.Tensor | None:
        """A 0-d bool tensor, True when every quantizer tensor is finite; None without any. No host sync.

        The tensors are read from the modules on every call: a per-channel step gets a new tensor
        once it has its shape, and a static scale is replaced at every observer update.
        """
        parts = [t for _, m in self.quantizers for _, t in _own_state(m)]
        if not parts:
            return None
        device = parts[0].device
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in parts])
        return torch.isfinite(flat).all()

    def first_bad(self, *, scales: bool = True) -> str | None:
        """``"<quantizer> (<label>) has a NaN scale"`` for the first non-finite quantizer, or None.

        ``scales``: also each quantizer's effective scale (``qparams``), a few small ops per quantizer.
        """
        for path, m in self.quantizers:
            for name, t in _own_state(m):
                problem = _describe(t, name)
                if problem:
                    return f"quantizer {_label(path, m)} has {problem}"
            if scales:
                problem = _describe(m.qparams()[0], "scale")
                if problem:
                    return f"quantizer {_label(path, m)} has {problem}"
        return None

    def check(self, where: str, *, hint: str = _DIVERGED, scales: bool = False) -> None:
        """Raise :class:`NonFiniteError` ``"<where>: quantizer <node> (<label>) has a NaN scale; <hint>"``.

        One host sync when all is well (``scales=False``); the per-quantizer search runs only on failure.
        """
        flag = self.finite()
        if flag is not None and not bool(flag):
            problem = self.first_bad(scales=False)
        elif scales:
            problem = self.first_bad(scales=True)
        else:
            return
        if problem:
            raise NonFiniteError(f"{where}: {problem}; {hint}")


def check_finite_quantizers(model: nn.Module, where: str, *, hint: str = _RETRAIN) -> None:
    """Refuse a model whose quantizers hold NaN / inf (their own tensors or their effective scales).

    Raises:
        NonFiniteError: one line naming the first bad quantizer's node and label, and ``hint``.
    """
    if isinstance(model, nn.Module):  # anything else is refused by the caller's own argument check
        QuantizerGuard(model).check(where, hint=hint, scales=True)


def _baked_qparams(node: fx.Node) -> list[tuple]:
    """The ``(scale, zero_point, axis, qmin, qmax, dtype, round_method)`` tuples a frozen-graph node carries.

    A Q/DQ call carries one in ``args[1:8]``; an integer kernel of
    :mod:`~quantbench.engine.passes.integer` carries one per operand as a tuple argument.
    """
    if node.target in (quantize, dequantize):
        return [tuple(node.args[1:8])]
    return [a for a in node.args if isinstance(a, tuple) and len(a) == 7 and a[5] in DTYPES]


def _value(gm: fx.GraphModule, v) -> torch.Tensor | None:
    if isinstance(v, fx.Node):
        return get_attr_tensor(gm, v.target).detach().float() if v.op == "get_attr" else None
    return torch.tensor(float(v)) if isinstance(v, (int, float)) else None


def check_finite_qdq(model: nn.Module, where: str, *, hint: str = _RETRAIN) -> None:
    """Refuse a frozen graph with a NaN / inf scale or zero point baked into a Q/DQ call or integer kernel.

    Only call_function nodes are read; a float model (no Q/DQ) passes untouched.

    Raises:
        NonFiniteError: one line naming the node and the tensor it quantizes.
    """
    if not isinstance(model, fx.GraphModule):
        return
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        for qp in _baked_qparams(node):
            for what, v in (("scale", qp[0]), ("zero point", qp[1])):
                t = _value(model, v)
                problem = _describe(t, what) if t is not None else None
                if problem:
                    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                    of = f" (of {src.name})" if src is not None and node.target in (quantize, dequantize) else ""
                    attr = f" ({v.target})" if isinstance(v, fx.Node) else ""
                    raise NonFiniteError(f"{where}: node '{node.name}'{of} has {problem}{attr} baked in; {hint}")
