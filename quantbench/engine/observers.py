"""Range observers: tensor statistics during calibration -> (scale, zero point).

An observer returns its input unchanged and records what it saw;
:meth:`ObserverBase.calculate_qparams` turns the record into a float32 scale
and an int32 zero point through one rule, :func:`qparams_from_range`, so every
observer (and the rest of the engine) agrees on how a range becomes a grid.
Registry keyed by ``spec.observer``: ``minmax`` (running min/max),
``moving_average`` (EMA of batch min/max), ``percentile`` (running histogram
cut at ``spec.percentile``) and ``mse`` (clipping range or pow2 exponent with
the lowest quantization MSE). Percentile and MSE follow the usual calibrators
(onnxruntime's HistogramCollector / percentile calibrator, torch's
HistogramObserver); the code is our own. Power-of-two scales use the
non-overflow rule (the smallest power of two that does not clip the observed
range, the ``non_overflow`` method of AMD Vitis AI / Quark), see
:func:`pow2_exponent`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from quantbench.engine.errors import NonFiniteError, SpecError
from quantbench.registry import Registry

if TYPE_CHECKING:  # annotations only: the spec module validates observer names against this registry
    from quantbench.engine.spec import QuantizationSpec

__all__ = [
    "HIST_BINS", "MIN_SCALE", "MSE_GRID", "OBSERVERS", "POW2_SEARCH", "MSEObserver", "MinMaxObserver",
    "MovingAverageObserver", "NonFiniteError", "ObserverBase", "PercentileObserver", "build_observer",
    "list_observers", "pow2_exponent", "pow2_mse_exponent", "qparams_from_range", "quantize_dequantize",
    "register_observer",
]

MIN_SCALE = torch.finfo(torch.float32).eps
"""Smallest scale produced (2**-23, what torch's observers use). A power of two,
so it is also the floor of pow2 scales; 1/MIN_SCALE and MIN_SCALE**2 (an int32
bias scale) stay normal float32 numbers, so nothing downstream overflows."""
HIST_BINS = 2048
MSE_GRID = 100
POW2_SEARCH = 4
_SUBSAMPLES = 8
_MIN_EXP = -23

_ROUND: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "half_even": torch.round, "half_up": lambda t: torch.floor(t + 0.5), "floor": torch.floor}


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                        round_method: str = "half_even", ch_axis: int | None = None) -> torch.Tensor:
    """Reference fake-quant: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, plain tensor ops.

    Divides by the scale, as onnxruntime's QuantizeLinear does: ``x * (1/s)``
    differs in the last bit for some x and then rounds to another integer.
    ``round_method``: ``half_even`` (ONNX), ``half_up`` (floor(v + 0.5)) or
    ``floor``. ``scale``/``zero_point`` run along ``ch_axis`` of ``x``, or
    broadcast as they are when ``ch_axis`` is None.
    """
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    zp = zero_point.to(scale.dtype)
    q = torch.clamp(_ROUND[round_method](x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def pow2_exponent(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Exponent e of the non-overflow power-of-two scale: the smallest e with amax / 2**e <= qmax.

    The non-overflow rule s = 2**ceil(log2(amax / qmax)) (AMD Vitis AI / Quark's
    ``non_overflow`` power-of-two method); rounding the exponent instead of
    ceiling it can clip. ``log2`` is inexact near powers of two, so the result
    is fixed up with exact tests (dividing by a power of two is exact). Zero ranges
    give e = 0 (scale 1.0); e is never below log2(MIN_SCALE).
    """
    a = amax.double().abs()
    e = torch.ceil(torch.log2(a / qmax)).nan_to_num(0.0, 0.0, 0.0)
    e = torch.where(torch.ldexp(a, -e) > qmax, e + 1, e)
    e = torch.where(torch.ldexp(a, -(e - 1)) <= qmax, e - 1, e)
    e = torch.where(a > 0, e, torch.zeros_like(e))
    return e.clamp(min=_MIN_EXP).to(torch.int32)


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor,
                       spec: QuantizationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) for an observed range, elementwise.

    The range is widened to include 0, so zero (padding, ReLU) is exact.
    Symmetric: s = amax / qmax, z = 0: the observed max lands on qmax, unclipped;
    ``scale_type="pow2"`` takes the non-overflow power of two instead
    (:func:`pow2_exponent`). Asymmetric: s = (max - min) / (qmax - qmin),
    z = qmin - round_half_even(min / s), clamped to the grid. A zero-width range
    gives s = 1.0 and float scales are clamped below at :data:`MIN_SCALE`, so
    scales are finite and positive. Computed in float64 (max - min cannot
    overflow) and rounded once to float32, which equals float32 division.
    """
    lo = torch.as_tensor(min_val).double().clamp(max=0.0)
    hi = torch.as_tensor(max_val).double().clamp(min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        if spec.scale_type == "pow2":
            scale = torch.exp2(pow2_exponent(amax, qmax).double()).float()
        else:
            scale = torch.where(amax > 0, amax / qmax, 1.0).float().clamp(min=MIN_SCALE)
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    width = hi - lo
    scale = torch.where(width > 0, width / (qmax - qmin), 1.0).float().clamp(min=MIN_SCALE)
    zp = (qmin - torch.round(lo / scale.double())).clamp(qmin, qmax)
    return scale, zp.to(torch.int32)


def _weighted_mse(values: torch.Tensor, weights: torch.Tensor | None, scale: torch.Tensor,
                  zero_point: torch.Tensor, spec: QuantizationSpec) -> torch.Tensor:
    """Mean squared fake-quant error along the last dim (weighted for histogram points)."""
    qdq = quantize_dequantize(values, scale, zero_point, spec.qmin, spec.qmax, spec.round_method)
    err = (qdq - values).square()
    if weights is None:
        return err.mean(-1)
    return (err * weights).sum(-1) / weights.sum(-1).clamp(min=1e-12)


def pow2_mse_exponent(values: torch.Tensor, spec: QuantizationSpec, weights: torch.Tensor | None = None,
                      amax: torch.Tensor | None = None, search: int = POW2_SEARCH) -> torch.Tensor:
    """Power-of-two exponent with the lowest quantization MSE, per row of ``values``.

    Searches e0 - search .. e0, where e0 is the non-overflow exponent (as the
    ``mse`` power-of-two method of AMD Vitis AI / Quark does): a smaller scale clips the tails but rounds the
    bulk finer, which often wins for heavy-tailed weights. Ties keep the larger
    exponent, so the result never has more MSE than the non-overflow scale.
    ``values`` is (R, N) rows (the channels of a weight) or (N,) for one row;
    ``weights`` (same shape) are histogram counts; ``amax`` per row gives e0
    (default: max |values| per row). Returns int32 exponents, (R,) or ().
    """
    rows = values.reshape(1, -1) if values.dim() == 1 else values
    w = None if weights is None else weights.reshape(rows.shape)
    top = rows.abs().amax(dim=1) if amax is None else torch.as_tensor(amax).reshape(-1).to(rows.device)
    e0 = pow2_exponent(top, spec.qmax)
    zero = torch.zeros_like(e0).unsqueeze(1)
    best = _argmin_rows([(e0 - k).clamp(min=_MIN_EXP) for k in range(search + 1)],
                        lambda e: _weighted_mse(rows, w, torch.exp2(e.float()).unsqueeze(1), zero, spec))
    return best.reshape(()) if values.dim() == 1 else best


def _argmin_rows(candidates: list[torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per row, the candidate with the lowest score; ties keep the earlier candidate."""
    best, best_err = candidates[0], score(candidates[0])
    for cand in candidates[1:]:
        err = score(cand)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best


def _mse_clip_range(values: torch.Tensor, weights: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
                    spec: QuantizationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range f * (lo, hi) with the lowest MSE, f in 1, .., 1/MSE_GRID (ties: larger f)."""

    def score(f: torch.Tensor) -> torch.Tensor:
        scale, zp = qparams_from_range(lo * f, hi * f, spec)
        return _weighted_mse(values, weights, scale.unsqueeze(1), zp.unsqueeze(1), spec)

    fractions = torch.linspace(1.0, 1.0 / MSE_GRID, MSE_GRID, dtype=lo.dtype, device=lo.device)
    best = _argmin_rows([f.expand_as(lo) for f in fractions], score)
    return lo * best, hi * best


def _row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile per row (torch.quantile's rule, without its size limit)."""
    pos = q * (rows.shape[1] - 1)
    k = math.floor(pos)
    a = rows.kthvalue(k + 1, dim=1).values
    b = rows.kthvalue(min(k + 2, rows.shape[1]), dim=1).values
    return a + (b - a) * (pos - k)


OBSERVERS: Registry[type[ObserverBase]] = Registry("observer", hint="(QuantizationSpec.observer)")
"""Observer classes by name (``spec.observer``); :func:`register_observer` adds one."""


def register_observer(cls: type[ObserverBase]) -> type[ObserverBase]:
    """Class decorator: register ``cls`` under ``cls.kind``.

    Raises:
        DuplicateNameError: the name is taken (a ``ValueError``).
    """
    return OBSERVERS.register(cls, name=cls.kind)


def list_observers(pattern: str = "*") -> list[str]:
    """Registered observer names matching a shell-style wildcard, sorted."""
    return OBSERVERS.list(pattern)


def build_observer(spec: QuantizationSpec, name: str = "") -> ObserverBase:
    """The observer registered under ``spec.observer``, labelled ``name``.

    Raises:
        UnknownNameError: no observer has that name (a ``ValueError``; the message lists close matches).
    """
    return OBSERVERS.get(spec.observer)(spec, name=name)


class ObserverBase(torch.nn.Module):
    """Records statistics of the tensors passed through it; returns them unchanged.

    All state is registered buffers, so ``state_dict``, ``deepcopy`` and
    ``.to(device)`` carry it. Per-channel buffers start empty and take shape (C,)
    on the first batch; :meth:`_load_from_state_dict` resizes them, so a fresh
    observer can load a calibrated one's state. ``name`` labels the graph
    node(s) watched (for error messages) and may be set after construction;
    ``kind`` is the registry name.
    """

    kind = ""

    def __init__(self, spec: QuantizationSpec, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self._init_state()

    def _init_state(self, device: torch.device | None = None) -> None:
        start = (0,) if self.spec.per_channel else ()
        self.register_buffer("min_val", torch.full(start, math.inf, device=device))
        self.register_buffer("max_val", torch.full(start, -math.inf, device=device))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long, device=device))

    def reset(self) -> None:
        """Forget everything observed (buffers stay on their device)."""
        self._init_state(self.num_batches.device)

    @property
    def has_data(self) -> bool:
        """True once at least one non-empty batch was observed."""
        return bool(self.num_batches.item() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` and return ``x`` itself.

        Raises NonFiniteError if ``x`` holds NaN or inf, checked on the min/max
        computed anyway (NaN and inf propagate into them), so it costs nothing.
        """
        if x.numel() == 0:
            return x
        with torch.no_grad():
            data = x.detach().to(torch.float32)
            if self.spec.per_channel:
                rank = max(data.dim(), 1)
                if not -rank <= self.spec.ch_axis < rank:  # ``%`` alone would wrap ch_axis=5 silently to 1
                    raise SpecError(f"QuantizationSpec.ch_axis={self.spec.ch_axis} is out of range for the "
                                    f"{rank}-d tensor at {self.name or '<unnamed>'!r}; use an axis in "
                                    f"[{-rank}, {rank - 1}]")
                axis = self.spec.ch_axis % rank
                data = data.transpose(0, axis).reshape(data.shape[axis], -1)
                mn, mx = torch.aminmax(data, dim=1)
            else:
                data = data.reshape(-1)
                mn, mx = torch.aminmax(data)
            if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
                raise NonFiniteError(
                    f"calibration data produced NaN/inf at node {self.name or '<unnamed>'!r} "
                    f"({type(self).__name__}, {self.spec.dtype} {self.spec.qscheme}); "
                    "check the input batches / model for overflow")
            if self.has_data and mn.shape != self.min_val.shape:
                raise ValueError(f"observer {self.name!r}: got {mn.numel()} channels, "
                                 f"previously {self.min_val.numel()} (ch_axis={self.spec.ch_axis})")
            self._update(data, mn, mx)
            self.num_batches += 1
        return x

    def _update(self, data: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        """Fold one batch in. ``data`` is float32, (C, N) per channel or flat per tensor."""
        if self.has_data:
            mn, mx = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)
        self.min_val, self.max_val = mn.clone(), mx.clone()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) the observer settles on; subclasses refine it."""
        return self.min_val, self.max_val

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32), shape () per tensor or (C,) per channel.

        Raises RuntimeError if nothing was observed: a grid from no data is
        meaningless, so it is not papered over with scale 1.
        """
        if not self.has_data:
            raise RuntimeError(f"observer {self.name or '<unnamed>'!r} ({type(self).__name__}) has seen no data; "
                               "run calibration batches through the model before calculate_qparams()")
        return qparams_from_range(*self._range(), self.spec)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for key, buf in self._buffers.items():
            saved = state_dict.get(prefix + key)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[key] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = self.spec
        return f"name={self.name!r}, {s.dtype}, {s.qscheme}, symmetric={s.symmetric}, scale_type={s.scale_type}"


@register_observer
class MinMaxObserver(ObserverBase):
    """Running min/max: never clips what was seen (the base behaviour)."""

    kind = "minmax"


@register_observer
class MovingAverageObserver(ObserverBase):
    """EMA of per-batch min/max: m <- m + c * (batch - m), c = spec.averaging_constant.

    The first batch initialises m. Damps a single outlier batch, as torch's
    MovingAverageMinMaxObserver does (the range is the EMA, not the envelope).
    """

    kind = "moving_average"

    def _update(self, data: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        if self.has_data:
            c = self.spec.averaging_constant
            mn, mx = self.min_val + c * (mn - self.min_val), self.max_val + c * (mx - self.max_val)
        self.min_val, self.max_val = mn.clone(), mx.clone()


class _HistogramObserver(ObserverBase):
    """Shared state of the percentile and MSE observers.

    Per tensor: a running histogram of |x| (symmetric) or x (asymmetric) over a
    range that includes 0, with :data:`HIST_BINS` bins. When a batch widens the
    range, the old counts are redistributed onto the new bins assuming a uniform
    density inside each old bin, as torch's HistogramObserver does (onnxruntime
    instead appends bins). Per channel: the last observed tensor as (C, N) rows;
    meant for weights, which are observed once.
    """

    def _init_state(self, device: torch.device | None = None) -> None:
        super()._init_state(device)
        bins = 0 if self.spec.per_channel else HIST_BINS
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64, device=device))
        self.register_buffer("hist_range", torch.zeros(2, device=device))
        self.register_buffer("last", torch.zeros(0, 0, device=device))

    def _update(self, data: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> None:
        first = not self.has_data
        super()._update(data, mn, mx)
        if self.spec.per_channel:
            self.last = data.clone()
            return
        if self.spec.symmetric:
            data, lo, hi = data.abs(), 0.0, max(-mn.item(), mx.item())
        else:
            lo, hi = min(mn.item(), 0.0), max(mx.item(), 0.0)
        old_lo, old_hi = self.hist_range.tolist()
        if first:  # on the data's device, even if the observer was never moved there
            self.histogram = torch.zeros(HIST_BINS, dtype=torch.float64, device=data.device)
        elif lo < old_lo or hi > old_hi:
            lo, hi = min(lo, old_lo), max(hi, old_hi)
            self.histogram = _rebin(self.histogram, old_lo, old_hi, lo, hi)
        else:
            lo, hi = old_lo, old_hi
        self.hist_range = torch.tensor([lo, hi], device=data.device)
        if hi > lo:
            self.histogram += torch.histc(data, HIST_BINS, lo, hi).double()
        else:
            self.histogram[0] += data.numel()

    def _samples(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(values, weights, lo, hi) to evaluate a grid on: histogram points or channel rows."""
        if self.spec.per_channel:
            lo, hi = torch.aminmax(self.last, dim=1)
            return self.last, None, lo, hi
        lo, hi = self.hist_range.tolist()
        counts = self.histogram
        width = (hi - lo) / HIST_BINS
        offsets = (torch.arange(_SUBSAMPLES, device=counts.device) + 0.5) / _SUBSAMPLES
        points = lo + width * (torch.arange(HIST_BINS, device=counts.device).unsqueeze(1) + offsets)
        keep = counts > 0
        values = points[keep].reshape(1, -1).float()
        weights = (counts[keep].unsqueeze(1) / _SUBSAMPLES).expand(-1, _SUBSAMPLES).reshape(1, -1).float()
        return values, weights, self.hist_range[:1].clone(), self.hist_range[1:].clone()


def _rebin(counts: torch.Tensor, old_lo: float, old_hi: float, lo: float, hi: float) -> torch.Tensor:
    """Counts of a histogram on [old_lo, old_hi] re-spread on [lo, hi] (same bin count).

    Interpolates the cumulative count linearly inside each old bin; a zero-width
    old histogram is a point mass at old_lo.
    """
    bins = counts.numel()
    if old_hi <= old_lo:
        out = torch.zeros_like(counts)
        out[min(int((old_lo - lo) / (hi - lo) * bins), bins - 1)] = counts.sum()
        return out
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=counts.device)
    pos = ((edges - old_lo) / (old_hi - old_lo) * bins).clamp(0, bins)
    idx = pos.floor().long().clamp(max=bins - 1)
    cum = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    cdf = cum[idx] + (pos - idx) * counts[idx]
    return cdf.diff()


def _hist_quantile(counts: torch.Tensor, lo: float, hi: float, q: float) -> float:
    """Value below which a fraction q of the histogram mass lies (linear inside a bin)."""
    if q >= 1.0 or hi <= lo:
        return hi
    cum = counts.cumsum(0)
    target = q * cum[-1]
    idx = int(torch.searchsorted(cum, target).clamp(max=counts.numel() - 1))
    inside = counts[idx].item()
    frac = (target - (cum[idx] - inside)).item() / inside if inside > 0 else 0.0
    return lo + (hi - lo) / counts.numel() * (idx + min(max(frac, 0.0), 1.0))


@register_observer
class PercentileObserver(_HistogramObserver):
    """Range cut at ``spec.percentile`` of the observed distribution.

    Symmetric: that percentile of |x|. Asymmetric: the (100 - p)th and pth
    percentiles of x. A handful of outliers then cannot stretch the grid, as in
    onnxruntime's percentile calibrator. Per channel: the quantile of each
    channel of the last observed tensor. ``pow2`` applies the non-overflow rule
    to the cut range.
    """

    kind = "percentile"

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.spec.percentile / 100.0
        if self.spec.per_channel:
            rows = self.last.abs() if self.spec.symmetric else self.last
            hi = _row_quantile(rows, q)
            return (-hi if self.spec.symmetric else _row_quantile(rows, 1.0 - q)), hi
        lo, hi = self.hist_range.tolist()
        top = _hist_quantile(self.histogram, lo, hi, q)
        bottom = -top if self.spec.symmetric else _hist_quantile(self.histogram, lo, hi, 1.0 - q)
        device = self.histogram.device
        return torch.tensor(bottom, device=device), torch.tensor(top, device=device)


@register_observer
class MSEObserver(_HistogramObserver):
    """Range (float scales) or exponent (pow2) with the lowest expected quantization MSE.

    Float: candidate ranges f * (min, max) for f on a grid of :data:`MSE_GRID`
    fractions, scored with the spec's own rounding and clamping. Pow2:
    :func:`pow2_mse_exponent`. Per tensor the score is taken on the histogram;
    per channel on the last observed tensor.
    """

    kind = "mse"

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`ObserverBase.calculate_qparams`."""
        if not self.has_data:
            return super().calculate_qparams()
        values, weights, lo, hi = self._samples()
        shape = lo.shape if self.spec.per_channel else ()
        if self.spec.scale_type == "pow2":
            amax = torch.maximum(-lo, hi)
            e = pow2_mse_exponent(values, self.spec, weights, amax=amax)
            scale = torch.exp2(e.float()).reshape(shape)
            return scale, torch.zeros(shape, dtype=torch.int32, device=scale.device)
        lo, hi = _mse_clip_range(values, weights, lo, hi, self.spec)
        scale, zp = qparams_from_range(lo, hi, self.spec)
        return scale.reshape(shape), zp.reshape(shape)
