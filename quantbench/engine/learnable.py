"""Fake quantization with gradients: static STE, LSQ and TQT.

Every function here computes the forward pass the way onnxruntime's
QuantizeLinear/DequantizeLinear pair does, so a model trained with them
exports to a QDQ graph that agrees bit for bit::

    q = clamp(round_half_even(x / s) + zp, qmin, qmax)      # divide, never x * (1/s)
    y = (q - zp) * s

They differ only in what the backward pass gives the parameters:

* :func:`ste_fake_quantize`: a straight-through estimator for ``x``, nothing
  for ``s``/``zp`` (observer-driven QAT).
* :func:`lsq_fake_quantize`: LSQ (Esser et al., arXiv 1902.08153) learns the
  float step ``s`` directly.
* :func:`tqt_fake_quantize`: TQT (Jain et al., arXiv 1903.08066) learns
  ``log2 t`` of a clipping threshold; the scale ``2^ceil(log2 t) / 2^(b-1)``
  is always an exact power of two.

"In range" is tested on the *rounded* value ``qmin <= round(x/s) + zp <=
qmax`` throughout, for ``x`` and for the scale alike: it is exactly the set of
elements whose output the clamp leaves alone. The papers test ``x/s`` itself;
the two differ only within half a step outside each end of the grid.

Speed. A fake-quant is a few elementwise passes, bound by memory, and on the
CPU a fresh full-size tensor costs more than a pass over one already mapped
(the kernel hands out zeroed pages on first touch: at batch 32 and 224x224
that is most of a fake-quant's time). So a fake-quant allocates little beyond
its output:

* the forward divides into its output, then rounds, clamps and rescales it
  in place (:func:`_grid`);
* a per-tensor grid on the CPU saves no rounded copy for the backward: the
  elements the clamp leaves alone are an interval of ``x`` itself,
  ``lo < x < hi``, found once per scale (:func:`_unclamped_interval`);
* where the clamp cut nothing (one read checks it), ``dx`` is the incoming
  gradient itself;
* LSQ and TQT sum a per-tensor scale gradient slice by slice through one
  small buffer (:func:`_sliced_dot`).

Where the interval would need the scale on the host (an accelerator: a sync
per quantizer) or per channel, the rounded value is saved and tested, as
torch's fused fake-quant kernels cache their mask. torch's own
``fake_quantize_per_tensor_affine`` is no shortcut: it multiplies by ``1/s``
(exact only for power-of-two scales) and runs a scalar loop, about four times
slower on the CPU than the four passes here. Every path gives the same values
and ``dx`` bit for bit, and the same scale gradients up to the order of
summation (``tests/test_learnable.py``).

Tensors may live on any device; only plain torch ops are used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ste_fake_quantize",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "lsq_init_scale",
    "lsq_min_step",
    "tqt_fake_quantize",
    "tqt_scale",
    "tqt_init_log2t_weight",
    "tqt_init_log2t_max",
    "tqt_init_log2t_kl",
]

# In place: the hot path rounds a tensor it has just allocated (see _to_grid).
_ROUNDERS = {
    "half_even": torch.Tensor.round_,
    "half_up": lambda v: v.add_(0.5).floor_(),
    "floor": torch.Tensor.floor_,
}
_WINDOW = 4
"""Floats tried on each side of an estimated end of the unclamped interval (it is within one or two)."""

Bounds = tuple[float, float]
"""``(lo, hi)``: a gradient passes where ``lo < t < hi`` for the tensor ``t`` the backward tests."""


def _eps(dtype: torch.dtype) -> float:
    """Smallest step we allow: 1e-8, or the smallest normal number of ``dtype``."""
    return max(1e-8, torch.finfo(dtype).tiny)


def _norm_axis(ch_axis: int | None, ndim: int) -> int | None:
    if ch_axis is None:
        return None
    if not -ndim <= ch_axis < ndim:
        raise ValueError(f"ch_axis={ch_axis} is out of range for a {ndim}-d tensor")
    return ch_axis % ndim


def _broadcast(p: Tensor, x: Tensor, ch_axis: int | None) -> Tensor:
    """View a 0-d (per-tensor) or (C,) (per-channel) parameter so it broadcasts against ``x``."""
    if p.dim() == 0:
        return p
    if p.dim() != 1 or ch_axis is None:
        raise ValueError(f"a per-channel parameter must be 1-d with ch_axis set, got shape "
                         f"{tuple(p.shape)} and ch_axis={ch_axis}")
    if p.numel() != x.shape[ch_axis]:
        raise ValueError(f"parameter has {p.numel()} elements but x has {x.shape[ch_axis]} "
                         f"channels along axis {ch_axis}")
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return p.reshape(shape)


def _reduce_like(g: Tensor, p: Tensor, ch_axis: int | None) -> Tensor:
    """Sum an elementwise gradient over the elements that share each element of ``p``."""
    if p.dim() == 0:
        return g.sum().to(p.dtype)
    dims = [d for d in range(g.dim()) if d != ch_axis]
    return g.sum(dim=dims).to(p.dtype) if dims else g.to(p.dtype)


def _per_channel(x: Tensor, ch_axis: int | None) -> Tensor:
    """``x`` as (C, N) with channels first, or (1, numel) when ``ch_axis`` is None."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(_norm_axis(ch_axis, x.dim()), 0).reshape(x.shape[ch_axis], -1)


def _squeeze_per_tensor(t: Tensor, ch_axis: int | None) -> Tensor:
    return t.reshape(()) if ch_axis is None else t


def _to_grid(x: Tensor, s: Tensor, zp: Tensor | None, qmin: int, qmax: int,
             round_method: str = "half_even") -> tuple[Tensor, Tensor]:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` and the rounded, unclamped ``round(x / s) + zp``.

    The reference: :func:`_grid` is the same op sequence without the second
    tensor. The rounded value holds integers, so "in range" is the open
    interval ``(qmin - 1/2, qmax + 1/2)``, which :func:`_inside` tests inside
    the masked multiply itself (a separate bool mask made the backward
    several times slower).
    """
    r = x / s
    _ROUNDERS[round_method](r)
    if zp is not None:
        r.add_(zp)
    q = r.clamp(qmin, qmax)
    if zp is not None:
        q.sub_(zp)
    return q.mul_(s), r


def _grid(x: Tensor, s: Tensor, zp: Tensor | None, qmin: int, qmax: int,
          round_method: str = "half_even") -> Tensor:
    """The first value of :func:`_to_grid` in one allocation: the same ops in the same order, in place."""
    y = x / s
    _ROUNDERS[round_method](y)
    if zp is not None:
        y.add_(zp)
    y.clamp_(qmin, qmax)
    if zp is not None:
        y.sub_(zp)
    return y.mul_(s)


def _rounded_bounds(qmin: int, qmax: int) -> Bounds:
    """What the rounded value ``r`` of :func:`_to_grid` is tested against: integers, so half a step out."""
    return qmin - 0.5, qmax + 0.5


def _inside(t: Tensor, v: Tensor, bounds: Bounds, out: Tensor | None = None) -> Tensor:
    """``t`` where ``lo < v < hi``, else 0: one fused pass (into ``out`` when given).

    ``hardtanh_backward(t, v, lo, hi)`` is exactly ``t * (lo < v < hi)``,
    with ``lo`` and ``hi`` taken in ``v``'s dtype (a NaN ``v`` passes ``t``).
    """
    if out is None:
        return torch.ops.aten.hardtanh_backward(t, v, *bounds)
    return torch.ops.aten.hardtanh_backward.grad_input(t, v, *bounds, grad_input=out)


def _all_inside(v: Tensor, bounds: Bounds) -> bool:
    """Whether ``lo < v < hi`` everywhere, i.e. the clamp cut nothing (then :func:`_inside` returns ``t``).

    One read pass on the CPU, against a full-size allocation and pass it
    saves (weights under a non-overflow scale, activations under a scale that
    covers the batch are never cut). The bounds are compared in ``v``'s dtype,
    as :func:`_inside` compares them; a NaN says no. Always False on an
    accelerator, where reading the answer would sync.
    """
    if v.device.type != "cpu" or v.numel() == 0 or torch.compiler.is_compiling():
        return False
    lo, hi = torch.aminmax(v)
    return bool((lo > bounds[0]) & (hi < bounds[1]))


def _float_window(centre: Tensor) -> Tensor:
    """(..., 2k + 1): the ``k = _WINDOW`` floats below each element of ``centre``, itself and the k above."""
    down, up = [centre], [centre]
    for _ in range(_WINDOW):
        down.append(torch.nextafter(down[-1], torch.full_like(centre, -math.inf)))
        up.append(torch.nextafter(up[-1], torch.full_like(centre, math.inf)))
    return torch.stack(down[:0:-1] + up, dim=-1)


@functools.lru_cache(maxsize=4096)
def _unclamped_interval(scale: float, zero_point: float, qmin: int, qmax: int, round_method: str,
                        dtype: torch.dtype) -> Bounds | None:
    """``(lo, hi)``: for every ``x`` of ``dtype``, the clamp leaves ``x`` alone exactly when ``lo < x < hi``.

    That is, ``qmin - 1/2 < round(x / scale) + zero_point < qmax + 1/2`` as
    :func:`_to_grid` and :func:`_inside` compute it. ``x -> round(x / s)`` is
    monotone (a correctly rounded division by ``s > 0``, then a monotone
    rounding), so the set is an interval of ``x``, whose ends lie within a
    float or two of ``(qmin - 1/2) s`` and ``(qmax + 1/2) s`` (``qmin s`` and
    ``(qmax + 1) s`` for floor). The floats around those estimates are run
    through the same two functions, so the interval is exact, ties and all.
    None when the scale is not a positive finite number or the transition is
    not inside the window (then the caller saves the rounded value).
    """
    if not (math.isfinite(scale) and scale > 0.0 and math.isfinite(zero_point)):
        return None
    half = 0.0 if round_method == "floor" else 0.5
    low = (qmin - zero_point - half) * scale
    if low == 0.0:  # floor from the zero point: the end is where x / s stops underflowing to -0
        info = torch.finfo(dtype)
        low = -scale * info.smallest_normal * info.eps / 2
    guess = torch.tensor([low, (qmax - zero_point + 1.0 - half) * scale], dtype=dtype)
    cand = _float_window(guess)
    zp = None if zero_point == 0.0 else torch.tensor(zero_point, dtype=dtype)
    _, r = _to_grid(cand, torch.tensor(scale, dtype=dtype), zp, qmin, qmax, round_method)
    inside = _inside(torch.ones_like(r), r, _rounded_bounds(qmin, qmax)) != 0
    rising, falling = inside[0], inside[1]  # expected: out..out in..in, and in..in out..out
    n_out, n_in = int((~rising).sum()), int(falling.sum())
    if not (0 < n_out < rising.numel() and bool(rising[n_out:].all()) and 0 < n_in < falling.numel()
            and bool(falling[:n_in].all())):
        return None
    lo, hi = float(cand[0, n_out - 1]), float(cand[1, n_in])
    return (lo, hi) if lo < hi else None


def _unclamped_x(x: Tensor, s: Tensor, zp: Tensor | None, qmin: int, qmax: int,
                 round_method: str) -> Bounds | None:
    """:func:`_unclamped_interval` for a per-tensor grid on the CPU; None where the rounded value is saved.

    Reading the scale on the host is free on the CPU and a sync on an
    accelerator; under ``torch.compile`` / ``torch.export`` it would be a
    data-dependent branch.
    """
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or s.dim() != 0
            or (zp is not None and zp.dim() != 0) or torch.compiler.is_compiling()):
        return None
    return _unclamped_interval(s.item(), 0.0 if zp is None else zp.item(), qmin, qmax, round_method, x.dtype)


def _fake_quant(x: Tensor, s: Tensor, zp: Tensor | None, qmin: int, qmax: int,
                round_method: str = "half_even") -> tuple[Tensor, Tensor, Bounds]:
    """``(y, t, bounds)``: the fake-quant of ``x``, and ``lo < t < hi`` exactly where the clamp cut nothing.

    ``t`` is ``x`` itself where :func:`_unclamped_x` finds the interval (one
    allocation, nothing new kept for the backward), else the rounded value.
    """
    bounds = _unclamped_x(x, s, zp, qmin, qmax, round_method)
    if bounds is not None:
        return _grid(x, s, zp, qmin, qmax, round_method), x, bounds
    y, r = _to_grid(x, s, zp, qmin, qmax, round_method)
    return y, r, _rounded_bounds(qmin, qmax)


def _tracks_grad(*tensors: Tensor) -> bool:
    """Whether autograd records this call; if not, the forward runs alone, without the Function."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _scale_grad(grad_out: Tensor, x: Tensor, y: Tensor, t: Tensor, cut: Bounds | None, p: Tensor,
                ch_axis: int | None) -> tuple[Tensor, Tensor | None]:
    """``sum(grad_out * s * dy/ds)`` over the elements of each scale element (zp = 0), and a spent buffer.

    ``dy/ds`` is ``round(x/s) - x/s`` in range and ``qmin`` / ``qmax``
    outside (LSQ, TQT); times ``s`` that is ``y - x`` in range and ``y``
    outside, computed without cancellation (``cut`` None: nothing was cut).
    Per tensor on the CPU the products are summed slice by slice through one
    small buffer, so no full-size temporary is paged in; otherwise the
    full-size temporary is returned for the caller to write ``dx`` into.
    """
    if p.dim() == 0 and x.device.type == "cpu" and all(v.is_contiguous() for v in (x, y, t)):
        flat = (v.reshape(-1) for v in (grad_out, x, y, t))
        return -_sliced_dot(*flat, cut).to(p.dtype), None
    # -(s * dy/ds); where nothing was cut, _inside(x) is x itself.
    neg = torch.sub(x, y) if cut is None else _inside(x, t, cut).sub_(y)
    if p.dim() == 0:
        return -torch.dot(neg.reshape(-1), grad_out.reshape(-1)).to(p.dtype), neg
    return -_reduce_like(neg.mul_(grad_out), p, ch_axis), neg  # in place: vecdot would allocate the product


_SLICE = 1 << 20
"""Elements per slice of :func:`_sliced_dot` (4 MiB in float32: reused from the heap, not paged in anew)."""


def _sliced_dot(g: Tensor, x: Tensor, y: Tensor, t: Tensor, cut: Bounds | None) -> Tensor:
    """``dot(_inside(x, t, cut) - y, g)`` over flat tensors, slice by slice (one slice: exactly that dot)."""
    n = x.numel()
    buf = torch.empty(min(n, _SLICE), dtype=x.dtype, device=x.device)
    total = None
    for start in range(0, n, _SLICE):
        part = slice(start, min(start + _SLICE, n))
        neg = buf[: part.stop - start]
        if cut is None:
            torch.sub(x[part], y[part], out=neg)
        else:
            _inside(x[part], t[part], cut, out=neg).sub_(y[part])
        d = torch.dot(neg, g[part])
        total = d if total is None else total.add_(d)
    return total if total is not None else torch.zeros((), dtype=x.dtype, device=x.device)


def _grad_x(ctx, grad_out: Tensor, t: Tensor, cut: Bounds | None, spent: Tensor | None) -> Tensor | None:
    """The straight-through ``dx`` of LSQ / TQT: ``grad_out`` as is where nothing was cut, else masked (into
    the buffer the scale gradient has finished with, if it left one)."""
    if not ctx.needs_input_grad[0]:
        return None
    return grad_out if cut is None else _inside(grad_out, t, cut, out=spent)


def _lsq_step(scale: Tensor, x: Tensor, ch_axis: int | None) -> Tensor:
    """LSQ's step as used in the forward: ``|scale|`` floored at eps, broadcast against ``x``."""
    return _broadcast(scale.to(x.dtype).abs().clamp_min(_eps(x.dtype)), x, ch_axis)


class _STEFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, ch_axis, round_method):
        s = _broadcast(scale.to(x.dtype), x, ch_axis)
        zp = None if zero_point is None else _broadcast(zero_point.to(x.dtype), x, ch_axis)
        y, t, ctx.bounds = _fake_quant(x, s, zp, qmin, qmax, round_method)
        ctx.save_for_backward(t)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (t,) = ctx.saved_tensors
        grad_x = grad_out if _all_inside(t, ctx.bounds) else _inside(grad_out, t, ctx.bounds)
        return grad_x, None, None, None, None, None, None


def ste_fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int,
                      qmin: int, qmax: int, ch_axis: int | None = None,
                      round_method: str = "half_even") -> Tensor:
    """Static fake quantization with a straight-through estimator.

    The forward is the QuantizeLinear/DequantizeLinear pair. ``round()`` has
    zero gradient almost everywhere, so the backward passes ``grad_out``
    straight through where the clamp is inactive and stops it where ``x`` was
    clipped (Bengio et al.'s STE, as used by Jacob et al., arXiv 1712.05877).
    Scale and zero point get no gradient: observers own them.

    Args:
        x: the tensor to fake-quantize.
        scale: 0-d (per-tensor) or (C,) (per-channel along ``ch_axis``).
        zero_point: same shape rules as ``scale``; integer valued. A Python
            ``0`` (symmetric grids) skips the two zero-point passes.
        qmin: lowest integer of the grid.
        qmax: highest integer of the grid.
        ch_axis: channel axis for a (C,) ``scale``.
        round_method: ``half_even`` (ONNX), ``half_up`` (floor(v + 0.5)) or
            ``floor``.

    Returns:
        The dequantized tensor, same shape and dtype as ``x``.
    """
    if round_method not in _ROUNDERS:
        raise ValueError(f"round_method={round_method!r} is not one of {sorted(_ROUNDERS)}")
    scale = torch.as_tensor(scale, device=x.device)
    zero_point = None if isinstance(zero_point, int) and zero_point == 0 else torch.as_tensor(zero_point,
                                                                                             device=x.device)
    ch_axis = _norm_axis(ch_axis, x.dim())
    if not _tracks_grad(x):
        s = _broadcast(scale.to(x.dtype), x, ch_axis)
        zp = None if zero_point is None else _broadcast(zero_point.to(x.dtype), x, ch_axis)
        return _grid(x, s, zp, qmin, qmax, round_method)
    return _STEFakeQuantize.apply(x, scale, zero_point, qmin, qmax, ch_axis, round_method)


class _LSQFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, ch_axis):
        y, t, bounds = _fake_quant(x, _lsq_step(scale, x, ch_axis), None, qmin, qmax)
        # x and y are kept alive by the neighbouring ops anyway: saving them costs nothing (t is x, or r).
        ctx.save_for_backward(x, y, t, scale)
        ctx.consts = (bounds, grad_scale, ch_axis)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, y, t, scale = ctx.saved_tensors
        bounds, grad_scale, ch_axis = ctx.consts
        cut = None if _all_inside(t, bounds) else bounds
        grad_s = spent = None
        if ctx.needs_input_grad[1]:
            # Divided by the step to undo the s in s * dy/ds; chain rule through |scale| (its sign);
            # the eps floor is passed straight through so that a step pushed below eps can grow back.
            step = scale.abs().clamp_min(_eps(x.dtype))
            signed_step = torch.where(scale < 0, -step, step)
            grad_s, spent = _scale_grad(grad_out, x, y, t, cut, scale, ch_axis)
            grad_s = grad_s.mul_(grad_scale).div_(signed_step)
        return _grad_x(ctx, grad_out, t, cut, spent), grad_s, None, None, None, None


def lsq_fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float,
                      ch_axis: int | None = None) -> Tensor:
    """Learned Step Size Quantization (Esser et al., arXiv 1902.08153), symmetric (zp = 0).

    The forward uses half-even rounding like ONNX. The backward is the paper's:
    ``dy/dx = 1`` in range and 0 outside; ``dy/ds = round(x/s) - x/s`` in range,
    ``qmin`` below and ``qmax`` above, summed over the elements of each scale
    element and multiplied by ``grad_scale`` (see :func:`lsq_grad_scale`),
    which keeps the step's update in proportion to the weights' updates.

    The step used is ``|scale|`` floored at a small eps, so the forward never
    divides by zero or flips sign; its gradient is the formula above times
    ``sign(scale)`` (exact wherever ``|scale| >= eps``).

    Args:
        x: the tensor to fake-quantize.
        scale: the learnable step, 0-d or (C,) along ``ch_axis``.
        qmin: lowest integer of the grid (``-Qn`` in the paper).
        qmax: highest integer of the grid (``Qp``).
        grad_scale: ``g`` of the paper.
        ch_axis: channel axis for a (C,) ``scale``.

    Returns:
        The dequantized tensor, same shape and dtype as ``x``.
    """
    ch_axis = _norm_axis(ch_axis, x.dim())
    if not _tracks_grad(x, scale):
        return _grid(x, _lsq_step(scale, x, ch_axis), None, qmin, qmax)
    return _LSQFakeQuantize.apply(x, scale, qmin, qmax, float(grad_scale), ch_axis)


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N * Qp)`` (arXiv 1902.08153, section 2.2).

    Choose ``N`` as the paper does: for weights, the number of weights that
    share one step (all weights per-tensor, one output channel's weights
    per-channel); for activations, the number of features of *one sample*
    (``x[0].numel()``), not of the whole batch.
    """
    return 1.0 / math.sqrt(max(int(numel_per_scale), 1) * qmax)


def lsq_min_step(dtype: torch.dtype = torch.float32) -> float:
    """The floor of LSQ's step (1e-8 in float32): :func:`lsq_fake_quantize` never quantizes with less.

    The quantizer module projects its parameter onto ``[lsq_min_step(), inf)``
    and freezes with the same floor, so training, freeze and export use one step.
    """
    return _eps(dtype)


def lsq_init_scale(x: Tensor, qmax: int, ch_axis: int | None = None) -> Tensor:
    """LSQ's initial step ``2 * mean|x| / sqrt(Qp)`` (arXiv 1902.08153), floored at eps.

    Returns a detached 0-d tensor, or (C,) when ``ch_axis`` is given.
    """
    x = x.detach()
    mean_abs = _per_channel(x, ch_axis).abs().mean(dim=1)
    s = (2.0 * mean_abs / math.sqrt(qmax)).clamp_min(_eps(x.dtype))
    return _squeeze_per_tensor(s, ch_axis)


def _tqt_levels(qmin: int, qmax: int | None) -> int:
    """``2^(b-1)`` for a signed b-bit grid (``2^b`` for an unsigned one): the levels on the wide side.

    The next power of two of ``max(-qmin, qmax + 1)``, so a narrow-range grid
    (-127..127) still gets 128 and the scale stays a power of two.
    """
    if qmax is None:
        if qmin >= 0:
            raise ValueError(f"tqt_scale needs qmax for an unsigned grid (qmin={qmin})")
        qmax = -qmin - 1
    return 1 << (max(-qmin, qmax + 1) - 1).bit_length()


def tqt_scale(log2_t: Tensor, qmin: int, qmax: int | None = None) -> Tensor:
    """The power-of-two scale ``2^ceil(log2_t) / 2^(b-1)`` of TQT (arXiv 1903.08066).

    ``ceil`` makes the threshold the smallest power of two that covers
    ``t``, so the learned range never clips below ``t``. The result is exact
    (an integer exponent through ``exp2``). Used at freeze time too.

    Args:
        log2_t: the learnable log2 threshold, 0-d or (C,).
        qmin: lowest integer of the grid (-128 for int8, -8 for int4).
        qmax: highest integer; needed only for unsigned grids.
    """
    shift = int(math.log2(_tqt_levels(qmin, qmax)))
    # Floor the exponent at the smallest normal number so the scale never underflows to 0.
    min_exp = math.log2(torch.finfo(log2_t.dtype).tiny)
    return torch.exp2((torch.ceil(log2_t) - shift).clamp_min(min_exp))


class _TQTFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log2_t, qmin, qmax, ch_axis):
        s = _broadcast(tqt_scale(log2_t.to(x.dtype), qmin, qmax), x, ch_axis)
        y, t, bounds = _fake_quant(x, s, None, qmin, qmax)
        ctx.save_for_backward(x, y, t, log2_t)
        ctx.consts = (bounds, ch_axis)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, y, t, log2_t = ctx.saved_tensors
        bounds, ch_axis = ctx.consts
        cut = None if _all_inside(t, bounds) else bounds
        grad_l = spent = None
        if ctx.needs_input_grad[1]:
            # d s / d log2_t = s * ln 2, with d ceil(l) / dl taken as 1 (straight through).
            grad_l, spent = _scale_grad(grad_out, x, y, t, cut, log2_t, ch_axis)
            grad_l = grad_l * math.log(2.0)
        return _grad_x(ctx, grad_out, t, cut, spent), grad_l, None, None, None


def tqt_fake_quantize(x: Tensor, log2_t: Tensor, qmin: int, qmax: int,
                      ch_axis: int | None = None) -> Tensor:
    """Trained Quantization Thresholds (Jain et al., arXiv 1903.08066).

    Learns ``log2 t`` rather than ``t`` or ``s``: gradient steps in the log
    domain are scale invariant, and the scale ``2^ceil(log2 t) / 2^(b-1)``
    (see :func:`tqt_scale`) is a power of two, i.e. a bit shift on integer
    hardware. Forward: ``y = clamp(round_half_even(x/s), qmin, qmax) * s``,
    exact in float since ``s`` is a power of two. Backward: ``dy/dx = 1`` in
    range and 0 outside; ``dy/dlog2_t = s * ln2 * {round(x/s) - x/s in range,
    qmin below, qmax above}``, summed per threshold element.

    Args:
        x: the tensor to fake-quantize.
        log2_t: learnable log2 threshold, 0-d or (C,) along ``ch_axis``.
        qmin: lowest integer of the grid.
        qmax: highest integer of the grid.
        ch_axis: channel axis for a (C,) ``log2_t``.

    Returns:
        The dequantized tensor, same shape and dtype as ``x``.
    """
    ch_axis = _norm_axis(ch_axis, x.dim())
    if not _tracks_grad(x, log2_t):
        return _grid(x, _broadcast(tqt_scale(log2_t.to(x.dtype), qmin, qmax), x, ch_axis), None, qmin, qmax)
    return _TQTFakeQuantize.apply(x, log2_t, qmin, qmax, ch_axis)


def _safe_log2(t: Tensor) -> Tensor:
    return torch.log2(t.clamp_min(_eps(t.dtype)))


def tqt_init_log2t_weight(w: Tensor, ch_axis: int | None = None) -> Tensor:
    """TQT's weight init: ``log2(|mean| + 3 * std)``, the 3-sigma threshold (arXiv 1903.08066).

    Uses the population std (``correction=0``) so a single-element channel is
    defined. Returns a detached 0-d tensor, or (C,) with ``ch_axis``.
    """
    rows = _per_channel(w.detach(), ch_axis)
    t = rows.mean(dim=1).abs() + 3.0 * rows.std(dim=1, correction=0)
    return _squeeze_per_tensor(_safe_log2(t), ch_axis)


def tqt_init_log2t_max(x: Tensor, ch_axis: int | None = None) -> Tensor:
    """``log2(max|x|)``: the threshold that clips nothing (floored at eps); 0-d or (C,)."""
    return _squeeze_per_tensor(_safe_log2(_per_channel(x.detach(), ch_axis).abs().amax(dim=1)), ch_axis)


def _kl_j(p: Tensor, q: Tensor, smooth: float = 1e-8) -> Tensor:
    """Symmetric KL-J distance ``KL(P||Q) + KL(Q||P) = sum (p - q) log(p / q)``, additively smoothed."""
    p = (p + smooth) / (p + smooth).sum()
    q = (q + smooth) / (q + smooth).sum()
    return ((p - q) * (p.log() - q.log())).sum()


def _quantized_reference(hist: Tensor, i: int, levels: int) -> tuple[Tensor, Tensor]:
    """P: the first ``i`` bins with the clipped tail folded into the last; Q: the same bins merged
    into ``levels`` groups, each group's mass spread evenly over its non-empty bins."""
    ref = hist[:i].clone()
    ref[-1] += hist[i:].sum()
    body = hist[:i]
    group = torch.arange(i, device=hist.device) * levels // i
    nonempty = (body > 0).to(hist.dtype)
    mass = torch.zeros(levels, dtype=hist.dtype, device=hist.device).index_add_(0, group, body)
    count = torch.zeros(levels, dtype=hist.dtype, device=hist.device).index_add_(0, group, nonempty)
    q = (mass / count.clamp_min(1.0))[group] * nonempty
    return ref, q


def tqt_init_log2t_kl(x_or_hist: Tensor | Sequence, bits: int = 8, bins: int = 2048) -> Tensor:
    """TQT's activation init: the KL-J calibrated threshold (arXiv 1903.08066).

    A histogram of ``|x|`` over ``[0, max|x|]`` is the reference distribution.
    For each candidate threshold (a bin edge, from ``2^(b-1)`` bins up), P is
    the histogram clipped there (the tail folded into the last bin) and Q is
    the bins below it quantized to ``2^(b-1)`` levels (so Q lacks the clipped
    mass); the threshold minimising the symmetric
    distance ``J = KL(P||Q) + KL(Q||P)`` balances clipping error against
    rounding error. Zero bins are smoothed with a tiny additive constant.

    Args:
        x_or_hist: a tensor of samples, or ``(counts, max_abs)``: a histogram
            of ``|x|`` in equal bins over ``[0, max_abs]`` (so observers can
            accumulate it over batches).
        bits: bit width of the signed grid.
        bins: histogram bins when samples are given.

    Returns:
        A 0-d float32 CPU tensor: log2 of the threshold, which lies in
        ``(0, max|x|]`` (log2 of eps when ``x`` is all zeros). The search runs
        on the CPU: it is a one-off loop over ~2000 small vectors.
    """
    if isinstance(x_or_hist, Tensor):
        a = x_or_hist.detach().abs().flatten().double()
        max_abs = float(a.max()) if a.numel() else 0.0
        hist = torch.histc(a, bins=bins, min=0.0, max=max_abs).cpu() if max_abs > 0 else None
    else:
        counts, max_abs = x_or_hist
        hist, max_abs = torch.as_tensor(counts).detach().double().cpu(), float(max_abs)
    if hist is None or max_abs <= 0.0 or float(hist.sum()) <= 0.0:
        return _safe_log2(torch.tensor(0.0))
    levels = 1 << (bits - 1)
    n = hist.numel()
    if n <= levels:
        return torch.tensor(math.log2(max_abs))
    best_i, best_j = n, math.inf
    for i in range(levels, n + 1):
        p, q = _quantized_reference(hist, i, levels)
        j = float(_kl_j(p, q))
        if j < best_j:
            best_i, best_j = i, j
    return torch.tensor(math.log2(best_i * max_abs / n))
