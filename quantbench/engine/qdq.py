"""Quantize / dequantize functions of a frozen graph, with ONNX semantics.

A frozen GraphModule calls :func:`quantize` and :func:`dequantize` (plain
Python callables in ``call_function`` nodes). Their arithmetic is exactly that
of ONNX QuantizeLinear / DequantizeLinear as onnxruntime computes it:

    q = saturate(round_half_even(x / scale) + zero_point)
    x' = (q - zero_point) * scale

Why not ``torch.ops.quantized_decomposed``: its quantize computes
``round(x * (1 / scale))``. For a scale that is not a power of two,
``x * (1/s)`` and ``x / s`` differ in the last bit, and at rounding ties that
flips the integer by one: the frozen torch model and onnxruntime would then
disagree by one quantization step (the flaw of AMD Quark's FX-mode export).
At export time (:mod:`quantbench.engine.export`) these nodes are swapped for
the ``quantized_decomposed`` ops, whose only role there is to be translated to
QuantizeLinear / DequantizeLinear by the ONNX exporter.
"""

from __future__ import annotations

import torch

from quantbench.engine.spec import DTYPES

__all__ = ["quantize", "dequantize", "round_tensor"]


def round_tensor(v: torch.Tensor, round_method: str = "half_even") -> torch.Tensor:
    """Round with the given method; ``half_even`` is ONNX/onnxruntime rounding."""
    if round_method == "half_even":
        return torch.round(v)
    if round_method == "half_up":
        return torch.floor(v + 0.5)
    if round_method == "floor":
        return torch.floor(v)
    raise ValueError(f"round_method={round_method!r} is not one of half_even, half_up, floor")


def _shape_for(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    axis: int | None,
    qmin: int,
    qmax: int,
    dtype: str,
    round_method: str = "half_even",
) -> torch.Tensor:
    """Float -> integer grid, stored in the dtype's storage type (int4 in int8)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
    s = _shape_for(scale, x, axis)
    z = _shape_for(zero_point, x, axis)
    q = torch.clamp(round_tensor(x.float() / s, round_method) + z, qmin, qmax)
    return q.to(DTYPES[dtype].storage)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    axis: int | None,
    qmin: int,
    qmax: int,
    dtype: str,
    round_method: str = "half_even",
) -> torch.Tensor:
    """Integer grid -> float32, ``(q - zero_point) * scale``."""
    del qmin, qmax, round_method  # part of the signature so Q and DQ nodes carry the same arguments
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=q.device)
    if dtype == "int32":
        # int32 -> float32 rounds above 2^24, exactly as onnxruntime's DequantizeLinear does.
        qf = q.to(torch.float32)
    else:
        qf = q.float()
    return (qf - _shape_for(zero_point, q, axis)) * _shape_for(scale, q, axis)

