"""Power-of-two NPU targets: their arithmetic, and the check that a graph fits one.

A pow2 NPU (AMD's DPU / XINT8 flow) stores every tensor as int8 with a
fixed-point *position* ``pos = -log2(scale)`` (its fractional bits) and
moves between positions with shifts. Its compiler rejects a graph whose
shifts fall outside the ranges its datapath implements (the formulas follow
AMD Quark's ``refine.py`` / vai_q's ``adjust_shift_*``):

* ``shared_scale``: concat, max / avg pool, slice, reshape (and the other
  value-preserving ops) read and write one position;
* ``shift_cut = pos_w + pos_in - pos_out`` in [0, 16] for conv / linear, and
  ``shift_bias = pos_w + pos_in - pos_bias`` in
  ``[min(0, -(24 - (8 + shift_cut))), 15]`` (a 24-bit accumulator);
* add: ``shift_read = max(pos_in) - min(pos_in)`` in [0, 7] and
  ``shift_write = min(pos_in) - pos_out`` in [-7, 25]; mul:
  ``shift_write = sum(pos_in) - pos_out`` in [0, 32];
* average pooling is ``sum * multiplier / 2^shift`` (:func:`avg_pool_factor`),
  hardsigmoid is ``relu6(x + 3) * 2731 / 2^14`` and there is no sigmoid or
  SiLU: graphs must carry those forms (``npu_avg_pool``, ``npu_activation``).

:func:`check_hardware` lists every violation, node by node. It reads a
frozen graph (Q/DQ calls and fused integer kernels) or a fake-quant graph
(quantizer modules); :mod:`quantbench.engine.passes.align` fixes them.
Targets are looked up by name in :data:`TARGETS` (a
:class:`~quantbench.registry.Registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import fx

from quantbench.engine.errors import HardwareError
from quantbench.engine.fake_quant import FakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import get_attr_tensor, op_name, target_name
from quantbench.engine.ops import op_kind, ops_of_kind, ops_tagged
from quantbench.engine.passes.integer import qadd, qlinear, qmatmul, qmul
from quantbench.engine.passes.nonlinear import NONLINEAR_KERNELS
from quantbench.engine.qdq import dequantize, quantize
from quantbench.engine.spec import DTYPES
from quantbench.registry import Registry

__all__ = [
    "HardwareTarget", "HardwareError", "TARGETS", "get_target", "Violation", "check_hardware",
    "Quant", "Operands", "quant_of", "output_quant", "operands", "is_pow2",
    "avg_pool_factor", "npu_avg_pool2d", "npu_global_avg_pool", "npu_hardsigmoid",
    "BINARY_RULES", "NPU_POOL_OPS", "SHARED_KINDS",
]

SHARED_KINDS = {"shared", "passthrough"}
"""Op kinds whose output must keep the input's position (plus ``cat`` and the NPU pools)."""
BINARY_RULES = {"add": ("shift_read", "shift_write"), "sub": ("shift_read",), "mul": ("shift_write",)}
NPU_OPS_WITHOUT_KERNEL = (ops_of_kind("matmul") | ops_tagged("stat_norm")
                          | (ops_of_kind("activation") - ops_tagged("relu_like") - ops_tagged("sigmoid_like")
                             - ops_tagged("swish_like") - {"clamp"}))
"""Ops the pow2 NPU (XINT8) has no kernel for: ``check_hardware`` flags each (``npu_op``); its compiler
would leave them to the CPU. The NPU computes conv / linear, add, mul, concat, pools, ReLU-likes and the
hardsigmoid / hardswish forms (sigmoid and SiLU are rewritten to those by ``freeze(target='npu_pow2')``)."""
"""The NPU's shift constraints of each elementwise op (``div`` has none: it stays a float op)."""
HARDSIGMOID_MULTIPLIER, HARDSIGMOID_SHIFT = 2731, 14

# The DPU's fixed multipliers for common kernels (vai_q / Quark ``get_avgpool_dpu_coeff``).
_AVG_POOL_TABLE = {(3, 3): (7, 6), (5, 5): (10, 8), (6, 6): (7, 8), (3, 6): (7, 8), (6, 3): (7, 8),
                   (7, 7): (21, 10), (14, 14): (21, 12)}


@dataclass(frozen=True)
class HardwareTarget:
    """The constraints of one power-of-two NPU, as data.

    Attributes:
        name: the target name given to ``freeze(target=...)``.
        bias_dtype: ``int8``: the bias has its own pow2 position, checked by
            ``shift_bias`` (AMD's XINT8); ``int32``: derived bias (scale =
            input x weight scale), always ``shift_bias = 0``.
        data_bits / accumulator_bits: widths in the ``shift_bias`` lower bound.
        shift_cut, shift_bias_max, add_read, add_write, mul_write: the ranges.
        hard_activations: replace sigmoid / SiLU by the NPU's hardsigmoid /
            hardswish at freeze.
        hardsigmoid_pos: position of the hardsigmoid factor inside hardswish.
    """

    name: str
    bias_dtype: str = "int8"
    data_bits: int = 8
    accumulator_bits: int = 24
    shift_cut: tuple[int, int] = (0, 16)
    shift_bias_max: int = 15
    add_read: tuple[int, int] = (0, 7)
    add_write: tuple[int, int] = (-7, 25)
    mul_write: tuple[int, int] = (0, 32)
    hard_activations: bool = True
    hardsigmoid_pos: int = 7

    def __post_init__(self) -> None:
        if self.bias_dtype not in DTYPES or not DTYPES[self.bias_dtype].signed:
            raise ValueError(f"HardwareTarget.bias_dtype={self.bias_dtype!r} must be a signed type of {sorted(DTYPES)}")

    def shift_bias_range(self, shift_cut: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(low, high) of ``shift_bias`` given ``shift_cut`` (elementwise for per-channel weights)."""
        slack = self.accumulator_bits - (self.data_bits + shift_cut)
        return torch.clamp(-slack, max=0.0), float(self.shift_bias_max)


TARGETS: Registry[HardwareTarget] = Registry("hardware target")
"""Hardware targets by name; ``TARGETS.add(name, HardwareTarget(name, ...))`` adds one."""
TARGETS.add("npu_pow2", HardwareTarget("npu_pow2"))


def get_target(target: str | HardwareTarget) -> HardwareTarget:
    """A :class:`HardwareTarget` by name (or the target itself).

    Raises:
        UnknownNameError: an unknown name (a ``ValueError``; the message lists close matches).
    """
    if isinstance(target, HardwareTarget):
        return target
    return TARGETS.get(target)


# -- NPU arithmetic (call_function targets of frozen graphs) ------------------------------------------------
def avg_pool_factor(kh: int, kw: int, *, table: bool = True) -> tuple[int, int]:
    """(multiplier, shift) with which the NPU averages a kh x kw window: ``sum * multiplier / 2^shift``.

    Common kernels use fixed values (3x3: 7/64, 5x5: 10/256, 6x6: 7/256, 7x7:
    21/1024, 14x14: 21/4096); others, and ``mean`` (``table=False``), take the
    first shift ``n < 7 + ceil(log2(kh*kw))`` whose ``round(2^n / (kh*kw)) / 2^n``
    is closest to ``1 / (kh*kw)``. Source: AMD vai_q ``get_avgpool_dpu_coeff``
    and Quark's ``simulate_dpu`` (``_get_avgpool_scale``, ``_get_reduce_mean_scale``).
    """
    if table and (kh, kw) in _AVG_POOL_TABLE:
        return _AVG_POOL_TABLE[(kh, kw)]
    rec = kh * kw
    best = (math.inf, 1, 0)
    for n in range(7 + math.ceil(math.log2(rec))):
        k = round(2**n / rec)
        diff = abs(k / 2**n - 1 / rec)
        if diff < best[0]:
            best = (diff, k, n)
    return best[1], best[2]


def npu_avg_pool2d(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], multiplier: int,
                   shift: int) -> torch.Tensor:
    """Window sum times ``multiplier / 2^shift``, zero padding counted (what the NPU computes).

    The sum is exact in float32 (and in onnxruntime): ``n * x`` is an exact
    multiple of the input step, and an average pool of it divides the exact
    sum ``n * S`` by ``n``, which IEEE division returns as exactly ``S``.
    """
    n = kernel[0] * kernel[1]
    window_sum = F.avg_pool2d(x * float(n), kernel, stride, padding, False, True)
    return window_sum * (multiplier / 2**shift)


def npu_global_avg_pool(x: torch.Tensor, dims: list[int], keepdim: bool, multiplier: int, shift: int) -> torch.Tensor:
    """Sum over ``dims`` times ``multiplier / 2^shift`` (global average pool, mean over H, W)."""
    return x.sum(dims, keepdim=keepdim) * (multiplier / 2**shift)


def npu_hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """The NPU's hardsigmoid: ``relu6(x + 3) * 2731 / 2^14``.

    That is ``x * 2731/16384 + 0.5`` clipped (the offset is 3 * 2731 / 2^14 =
    0.50006, the top 1.00012), as AMD vai_q's ``Hardsigmoid`` and Quark's
    ``HARD_SIGMOID_SCALE`` compute it.
    """
    return F.relu6(x + 3.0) * (HARDSIGMOID_MULTIPLIER / 2**HARDSIGMOID_SHIFT)


NPU_POOL_OPS = {npu_avg_pool2d.__name__, npu_global_avg_pool.__name__}
"""Op names of the NPU average pools that :mod:`quantbench.engine.passes.align` writes."""


# -- reading positions --------------------------------------------------------------------------------------
def is_pow2(scale: torch.Tensor) -> bool:
    """True when every element is a positive power of two."""
    s = torch.as_tensor(scale, dtype=torch.float64)
    mantissa, _ = torch.frexp(s)
    return bool(((s > 0) & (mantissa == 0.5)).all())


class Quant:
    """One quantized tensor as an op sees it: a quantizer call (fake-quant graph) or Q/DQ arguments (frozen).

    Attributes:
        scale: float32 tensor, 0-d or (C,).
        dtype: integer grid name.
        name: the quantizer module or node, for messages.
        module: the quantizer module (fake-quant graphs), None in frozen graphs.
    """

    def __init__(self, scale: torch.Tensor, dtype: str, name: str, module: FakeQuantizeBase | None = None) -> None:
        self.scale, self.dtype, self.name, self.module = scale.detach().float(), dtype, name, module

    @property
    def pos(self) -> torch.Tensor:
        """``-log2(scale)`` in float64 (integral for pow2 scales)."""
        return -torch.log2(self.scale.double())

    @property
    def settable(self) -> bool:
        return type(self.module) is FakeQuantize

    def set_pos(self, pos: torch.Tensor) -> bool:
        """Give the quantizer module the scale ``2^-pos``; returns whether it changed."""
        new = torch.exp2(-torch.as_tensor(pos, dtype=torch.float64)).float().reshape(self.scale.shape)
        if torch.equal(new, self.scale):
            return False
        self.module.scale = new.to(self.module.scale.device)
        self.scale = new
        return True


def _from_qp(gm: fx.GraphModule, qp: tuple, name: str) -> Quant:
    scale = qp[0]
    tensor = get_attr_tensor(gm, scale.target) if isinstance(scale, fx.Node) else torch.tensor(float(scale))
    return Quant(tensor, qp[5], name)


def quant_of(gm: fx.GraphModule, node) -> Quant | None:
    """The quantized tensor a node yields: a quantizer call or a Q / DQ node; else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantizeBase):
            return Quant(mod.qparams()[0], mod.spec.dtype, node.target, mod)
    if node.op == "call_function" and node.target in (quantize, dequantize):
        return _from_qp(gm, node.args[1:], node.name)
    if op_kind(node) == "dropout":  # the identity at inference (QAT graphs keep it)
        return quant_of(gm, node.args[0])
    return None


def output_quant(gm: fx.GraphModule, node: fx.Node) -> Quant | None:
    """The quantizer of a node's output, looking through one fused ReLU-like op."""
    for _ in range(2):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        q = quant_of(gm, node) if node.op == "call_module" or node.target is quantize else None
        if q is not None:
            return q
        if node.op != "call_function" or op_name(node) not in ops_tagged("relu_like"):
            return None
    return None


@dataclass
class Operands:
    """An op with the quantized tensors it reads (None where float) and writes."""

    node: fx.Node
    op: str
    inputs: list[Quant | None]
    output: Quant | None


def operands(gm: fx.GraphModule, node: fx.Node) -> Operands | None:
    """The :class:`Operands` of a compute node; fused integer kernels are read from their arguments."""
    if node.op != "call_function" or node.target in (quantize, dequantize):
        return None
    if node.target in (qadd, qmul, qmatmul):
        a = node.args
        op = {qadd: "add", qmul: "mul", qmatmul: "matmul"}[node.target]
        return Operands(node, op, [_from_qp(gm, a[1], node.name), _from_qp(gm, a[3], node.name)],
                        _from_qp(gm, a[4], node.name))
    if node.target in NONLINEAR_KERNELS:
        x_qp, y_qp = node.meta.get("qb_qparams", (None, None))
        out = _from_qp(gm, y_qp, node.name) if y_qp is not None else output_quant(gm, node)
        return Operands(node, node.meta.get("qb_source_op", target_name(node.target)),
                        [_from_qp(gm, x_qp, node.name) if x_qp is not None else None], out)
    if node.target is qlinear:
        a = node.args
        bias = _from_qp(gm, a[9], node.name) if a[8] is not None else None
        return Operands(node, target_name(a[0]), [_from_qp(gm, a[5], node.name), _from_qp(gm, a[7], node.name),
                                                 bias], _from_qp(gm, a[10], node.name))
    args = [a for arg in node.args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    inputs = [quant_of(gm, a) for a in args if isinstance(a, fx.Node)]
    return Operands(node, op_name(node), inputs, output_quant(gm, node))


# -- the check ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    """One violated constraint: ``value`` lies outside ``allowed`` (inclusive)."""

    node: str
    op: str
    constraint: str
    value: float
    allowed: tuple[float, float]
    detail: str = ""

    def __str__(self) -> str:
        lo, hi = self.allowed
        text = f"{self.node} ({self.op}): {self.constraint} = {self.value:g} not in [{lo:g}, {hi:g}]"
        return f"{text}: {self.detail}" if self.detail else text


def _worst(value: torch.Tensor, lo, hi) -> float | None:
    """The most out-of-range element of ``value``, or None when all lie in [lo, hi]."""
    value = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    lo_t = torch.as_tensor(lo, dtype=torch.float64).expand_as(value)
    hi_t = torch.as_tensor(hi, dtype=torch.float64).expand_as(value)
    below, above = lo_t - value, value - hi_t
    excess = torch.maximum(below, above)
    if not bool((excess > 0).any()):
        return None
    return float(value[int(torch.argmax(excess))])


def _row(ops: Operands, constraint: str, value, lo, hi, detail: str = "") -> Iterator[Violation]:
    worst = _worst(value, lo, hi)
    if worst is not None:
        lo_f = float(torch.as_tensor(lo, dtype=torch.float64).max())
        yield Violation(ops.node.name, ops.op, constraint, worst, (lo_f, float(hi)), detail)


def _weighted_rows(ops: Operands, target: HardwareTarget) -> Iterator[Violation]:
    x, w = ops.inputs[0], ops.inputs[1]
    b = ops.inputs[2] if len(ops.inputs) > 2 else None
    y = ops.output
    if x is None or w is None or y is None:
        return
    shift_cut = w.pos + x.pos - y.pos
    yield from _row(ops, "shift_cut", shift_cut, *target.shift_cut)
    if b is None:
        return
    yield from _row(ops, "shift_bias", w.pos + x.pos - b.pos, *target.shift_bias_range(shift_cut))
    bits = math.log2(DTYPES[b.dtype].qmax + 1) + 1
    want = math.log2(DTYPES[target.bias_dtype].qmax + 1) + 1
    yield from _row(ops, "bias_bits", bits, want, want, f"the bias is {b.dtype}; the target takes {target.bias_dtype}")


def _binary_rows(ops: Operands, target: HardwareTarget) -> Iterator[Violation]:
    if ops.output is None or not ops.inputs or any(q is None for q in ops.inputs):
        return
    pos = [q.pos.max() for q in ops.inputs]
    rules = BINARY_RULES[ops.op]
    if "shift_read" in rules:
        yield from _row(ops, "shift_read", max(pos) - min(pos), *target.add_read)
    if "shift_write" in rules and ops.op == "add":
        yield from _row(ops, "shift_write", min(pos) - ops.output.pos, *target.add_write)
    elif "shift_write" in rules:
        yield from _row(ops, "shift_write", sum(pos) - ops.output.pos, *target.mul_write)


def _shared_rows(ops: Operands) -> Iterator[Violation]:
    quants = [q for q in ops.inputs if q is not None]
    if ops.output is None or not quants or (ops.op != "cat" and len(ops.inputs) != 1):
        return
    pos = torch.stack([q.pos.max() for q in [*quants, ops.output]])
    yield from _row(ops, "shared_scale", pos.max() - pos.min(), 0, 0, "inputs and output must share one position")


def _op_rows(ops: Operands, target: HardwareTarget) -> Iterator[Violation]:
    quantized_input = any(q is not None for q in ops.inputs)
    if ops.op in ops_tagged("integer_kernel"):
        yield from _weighted_rows(ops, target)
    elif ops.op in BINARY_RULES:
        yield from _binary_rows(ops, target)
    elif ops.op == "cat" or op_kind(ops.node) in SHARED_KINDS or ops.op in NPU_POOL_OPS:
        yield from _shared_rows(ops)
    elif ops.op in ops_tagged("avg_pool") and quantized_input:
        yield from _row(ops, "npu_avg_pool", 1, 0, 0, "not rewritten as sum * multiplier / 2^shift")
    elif ops.op in ops_tagged("sigmoid_like") | ops_tagged("swish_like") and quantized_input \
            and target.hard_activations:
        yield from _row(ops, "npu_activation", 1, 0, 0, "the NPU computes hardsigmoid / hardswish forms only")
    elif ops.op in NPU_OPS_WITHOUT_KERNEL and target.hard_activations:
        yield from _row(ops, "npu_op", 1, 0, 0, f"the NPU has no {ops.op} kernel (its compiler leaves it to the CPU)")


def _scale_rows(gm: fx.GraphModule) -> Iterator[Violation]:
    """One row per quantizer (module, Q node, constant DQ, fused-kernel operand) that is not pow2."""
    seen: set[int] = set()
    for node in gm.graph.nodes:
        quants: list[Quant | None] = []
        if node.op == "call_module":
            q = quant_of(gm, node)
            if q is not None and id(q.module) not in seen:
                seen.add(id(q.module))
                quants.append(q)
        elif node.op == "call_function" and (node.target is quantize or (
                node.target is dequantize and node.args[0].op == "get_attr")):
            quants.append(quant_of(gm, node))
        elif node.op == "call_function" and node.target in (qlinear, qadd, qmul, qmatmul, *NONLINEAR_KERNELS):
            ops = operands(gm, node)
            quants.extend([*ops.inputs[1:], ops.output] if node.target is qlinear else [ops.output])
        for q in quants:
            if q is not None and not is_pow2(q.scale):
                frac = (q.pos - torch.round(q.pos)).abs().max()
                yield Violation(node.name, op_name(node), "pow2_scale", float(frac), (0.0, 0.0),
                                f"scale {float(q.scale.reshape(-1)[0]):.6g} of '{q.name}' is not a power of two")


def check_hardware(model: fx.GraphModule, target: str | HardwareTarget = "npu_pow2") -> list[Violation]:
    """Every constraint of ``target`` that ``model`` violates, node by node, in graph order.

    Args:
        model: a frozen graph (:meth:`ModelQuantizer.freeze`) or a fake-quant graph.
        target: a name in :data:`TARGETS` or a :class:`HardwareTarget`.

    Returns:
        A list of :class:`Violation` rows; empty when the graph fits the target.
    """
    hw = get_target(target)
    rows = list(_scale_rows(model))
    for node in model.graph.nodes:
        ops = operands(model, node)
        if ops is not None:
            rows.extend(_op_rows(ops, hw))
    return rows
