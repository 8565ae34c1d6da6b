"""Golden tests for quantbench.engine.observers: exact scales, pow2 rule, robust observers, state."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from quantbench.engine.observers import (
    MIN_SCALE,
    MinMaxObserver,
    MSEObserver,
    NonFiniteError,
    ObserverBase,
    build_observer,
    list_observers,
    pow2_exponent,
    pow2_mse_exponent,
    qparams_from_range,
    quantize_dequantize,
    register_observer,
)
from quantbench.engine.spec import QuantizationSpec

INT8 = QuantizationSpec()
POW2 = QuantizationSpec(scale_type="pow2")


def _observe(spec: QuantizationSpec, *batches: torch.Tensor, name: str = "node") -> ObserverBase:
    obs = build_observer(spec, name)
    for batch in batches:
        assert obs(batch) is batch
    return obs


def _mse(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantizationSpec,
         ch_axis: int | None = None) -> torch.Tensor:
    qdq = quantize_dequantize(x, scale, zp, spec.qmin, spec.qmax, spec.round_method, ch_axis)
    return (qdq - x).square()


def _laplace(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


# --- exact scales -----------------------------------------------------------------------------


def test_minmax_symmetric_int8_exact():
    scale, zp = _observe(INT8, torch.tensor([-1.0, 0.5, 2.54])).calculate_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.shape == () and zp.shape == ()
    assert scale == torch.tensor(2.54) / 127
    assert zp == 0


def test_minmax_asymmetric_uint8_exact():
    spec = QuantizationSpec(dtype="uint8", symmetric=False)
    scale, zp = _observe(spec, torch.tensor([-1.0, 3.0])).calculate_qparams()
    assert scale == torch.tensor(4.0) / 255
    assert zp == 64  # 0 - round(-1 / (4/255)) = round(63.75)


def test_range_always_contains_zero():
    spec = QuantizationSpec(dtype="uint8", symmetric=False)
    scale, zp = qparams_from_range(torch.tensor(1.0), torch.tensor(2.0), spec)
    assert scale == torch.tensor(2.0) / 255 and zp == 0
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(-1.0), spec)
    assert scale == torch.tensor(2.0) / 255 and zp == 255


@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_minmax_per_channel(ch_axis):
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    spec = QuantizationSpec(qscheme="per_channel", ch_axis=ch_axis)
    scale, zp = _observe(spec, w).calculate_qparams()
    amax = w.abs().amax(dim=1 if ch_axis == 0 else 0)
    assert scale.shape == (2,) and zp.shape == (2,)
    torch.testing.assert_close(scale, amax / 127, rtol=0, atol=0)
    assert (zp == 0).all()


def test_minmax_accumulates_batches():
    scale, _ = _observe(INT8, torch.tensor([-1.0, 1.0]), torch.tensor([3.0]), torch.tensor([-0.5])).calculate_qparams()
    assert scale == torch.tensor(3.0) / 127


def test_degenerate_ranges_give_finite_positive_scales():
    for spec in (INT8, POW2, QuantizationSpec(dtype="uint8", symmetric=False)):
        scale, zp = _observe(spec, torch.zeros(5)).calculate_qparams()
        assert scale == 1.0 and zp == spec.qmin * (not spec.symmetric)
    scale, _ = qparams_from_range(torch.tensor(-1e-30), torch.tensor(1e-30), INT8)
    assert scale == MIN_SCALE
    scale, _ = qparams_from_range(torch.tensor(-3e38), torch.tensor(3e38), QuantizationSpec(symmetric=False))
    assert torch.isfinite(scale) and scale > 0


# --- power of two -----------------------------------------------------------------------------


def test_pow2_golden():
    amax = torch.tensor([127 * 2.0**-5, 127 * 2.0**-5 * (1 + 2**-20), 1.0, 127.0, 128.0, 0.0])
    expected = torch.tensor([2.0**-5, 2.0**-4, 2.0**-6, 1.0, 2.0, 1.0])
    scale, zp = qparams_from_range(-amax, amax, POW2)
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    assert (zp == 0).all()


@pytest.mark.parametrize("dtype", ["int4", "int8", "int16", "int32"])
def test_pow2_never_clips_and_is_smallest(dtype):
    spec = QuantizationSpec(dtype=dtype, scale_type="pow2")
    qmax = spec.qmax
    gen = torch.Generator().manual_seed(1)
    exps = torch.arange(-18, 30, dtype=torch.float64)
    edge = qmax * torch.exp2(exps)  # exactly qmax * 2**k (up to float32 rounding of qmax)
    random = torch.exp2(torch.empty(4000, dtype=torch.float64).uniform_(-18, 30, generator=gen)) * qmax
    amax = torch.cat([edge, edge.float().nextafter(torch.tensor(math.inf)).double(),
                      edge.float().nextafter(torch.tensor(0.0)).double(), random]).float()
    scale, _ = qparams_from_range(-amax, amax, spec)
    a, s = amax.double(), scale.double()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s), "not a power of two"
    assert (a / s <= qmax).all(), "clips the observed max"
    assert (a / (s / 2) > qmax).all(), "a smaller power of two would not clip"


def test_pow2_exponent_exact_power():
    assert pow2_exponent(torch.tensor(127 * 2.0**-5), 127) == -5
    assert pow2_exponent(torch.tensor(0.0), 127) == 0


# --- moving average, percentile, mse ----------------------------------------------------------


def test_moving_average_update():
    spec = QuantizationSpec(observer="moving_average", averaging_constant=0.1)
    obs = _observe(spec, torch.tensor([-1.0, 2.0]))
    assert obs.min_val == -1.0 and obs.max_val == 2.0
    obs(torch.tensor([-3.0, 4.0]))
    c = torch.tensor(0.1)
    expect_min = torch.tensor(-1.0) + c * (torch.tensor(-3.0) - torch.tensor(-1.0))
    expect_max = torch.tensor(2.0) + c * (torch.tensor(4.0) - torch.tensor(2.0))
    assert obs.min_val == expect_min and obs.max_val == expect_max
    assert obs.calculate_qparams()[0] == qparams_from_range(expect_min, expect_max, spec)[0]


def test_moving_average_per_channel():
    spec = QuantizationSpec(observer="moving_average", qscheme="per_channel", averaging_constant=0.5)
    obs = _observe(spec, torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [0.0]]))
    torch.testing.assert_close(obs.max_val, torch.tensor([2.0, 1.0]))


def test_percentile_ignores_single_outlier():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x[123] = 1000.0
    spec = QuantizationSpec(observer="percentile", percentile=99.9)
    scale, _ = _observe(spec, x).calculate_qparams()
    assert scale * 127 < 5.0
    assert _observe(INT8, x).calculate_qparams()[0] * 127 == 1000.0


def test_percentile_histogram_rebins_when_range_grows():
    spec = QuantizationSpec(observer="percentile", dtype="uint8", symmetric=False, percentile=99.0)
    a, b = torch.linspace(-1, 1, 10001), torch.linspace(-2, 3, 10001)
    obs = _observe(spec, a, b)
    assert obs.histogram.sum() == 20002
    lo, hi = obs._range()
    step = 5.0 / 2048
    assert abs(lo - torch.quantile(torch.cat([a, b]), 0.01)) < 2 * step
    assert abs(hi - torch.quantile(torch.cat([a, b]), 0.99)) < 2 * step


def test_percentile_per_channel_and_pow2():
    w = torch.stack([torch.linspace(-1, 1, 1001), torch.linspace(-4, 4, 1001)])
    spec = QuantizationSpec(observer="percentile", qscheme="per_channel", percentile=90.0)
    scale, _ = _observe(spec, w).calculate_qparams()
    torch.testing.assert_close(scale, torch.quantile(w.abs(), 0.9, dim=1) / 127)
    scale, _ = _observe(spec.replace(scale_type="pow2"), w).calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor([2.0**-7, 2.0**-5]), rtol=0, atol=0)


def test_mse_clips_heavy_tails_per_tensor():
    x = _laplace(20000)
    spec = QuantizationSpec(dtype="int4", observer="mse")
    s_mse, z = _observe(spec, x).calculate_qparams()
    s_max, _ = _observe(spec.replace(observer="minmax"), x).calculate_qparams()
    assert s_mse < 0.8 * s_max
    assert _mse(x, s_mse, z, spec).mean() < _mse(x, s_max, z, spec).mean()


def test_mse_per_channel_weights():
    w = _laplace(4, 2000, seed=3) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    spec = QuantizationSpec(dtype="int4", observer="mse", qscheme="per_channel")
    s_mse, z = _observe(spec, w).calculate_qparams()
    s_max, _ = _observe(spec.replace(observer="minmax"), w).calculate_qparams()
    assert s_mse.shape == (4,) and (s_mse < s_max).all()
    assert (_mse(w, s_mse, z, spec, 0).mean(1) < _mse(w, s_max, z, spec, 0).mean(1)).all()


def test_pow2_mse_per_channel_never_worse_than_non_overflow():
    w = _laplace(6, 3000, seed=5) * torch.linspace(0.1, 5.0, 6).unsqueeze(1)
    spec = QuantizationSpec(dtype="int4", observer="mse", qscheme="per_channel", scale_type="pow2")
    scale, zp = _observe(spec, w).calculate_qparams()
    s0, _ = qparams_from_range(-w.abs().amax(1), w.abs().amax(1), spec)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    assert (scale <= s0).all() and (scale < s0).any()
    assert (_mse(w, scale, zp, spec, 0).mean(1) <= _mse(w, s0, zp, spec, 0).mean(1)).all()
    e = pow2_mse_exponent(w, spec)
    torch.testing.assert_close(torch.exp2(e.float()), scale, rtol=0, atol=0)


def test_pow2_mse_per_tensor():
    x = _laplace(20000, seed=7)
    spec = QuantizationSpec(dtype="int4", observer="mse", scale_type="pow2")
    scale, zp = _observe(spec, x).calculate_qparams()
    s0, _ = qparams_from_range(x.min(), x.max(), spec)
    assert scale == 2.0 ** round(math.log2(scale.item())) and scale < s0
    assert _mse(x, scale, zp, spec).mean() <= _mse(x, s0, zp, spec).mean()


# --- errors, state, registry ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_non_finite_raises_with_name(bad, observer):
    for qscheme in ("per_tensor", "per_channel"):
        obs = build_observer(QuantizationSpec(observer=observer, qscheme=qscheme), "conv2d_3")
        with pytest.raises(NonFiniteError, match="conv2d_3") as info:
            obs(torch.tensor([[1.0, bad], [0.0, 2.0]]))
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
        assert not obs.has_data


def test_no_data_raises():
    with pytest.raises(RuntimeError, match="seen no data"):
        build_observer(INT8, "x").calculate_qparams()


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
@pytest.mark.parametrize("qscheme", ["per_tensor", "per_channel"])
def test_state_dict_deepcopy_to(observer, qscheme):
    spec = QuantizationSpec(observer=observer, qscheme=qscheme, dtype="int4")
    obs = _observe(spec, _laplace(3, 400), 2 * _laplace(3, 400, seed=1))
    expected = obs.calculate_qparams()
    fresh = build_observer(spec)
    fresh.load_state_dict(obs.state_dict())
    for other in (fresh, copy.deepcopy(obs), obs.to("cpu")):
        assert other.has_data
        for got, want in zip(other.calculate_qparams(), expected):
            assert torch.equal(got, want)
    obs.reset()
    assert not obs.has_data
    obs(torch.ones(3, 2))
    assert obs.calculate_qparams()[0].shape == ((3,) if qscheme == "per_channel" else ())


def test_forward_keeps_autograd():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = build_observer(INT8)(x * 2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0, 2.0]))


def test_name_settable_and_registry():
    obs = build_observer(INT8)
    obs.name = "add_1"
    assert "add_1" in repr(obs)
    assert list_observers() == ["minmax", "moving_average", "mse", "percentile"]
    assert list_observers("m*") == ["minmax", "moving_average", "mse"]
    assert isinstance(build_observer(QuantizationSpec(observer="mse")), MSEObserver)
    with pytest.raises(ValueError, match="minmax"):
        build_observer(types.SimpleNamespace(observer="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_observer(type("Dup", (MinMaxObserver,), {"kind": "minmax"}))


# --- reference fake-quant ---------------------------------------------------------------------


@pytest.mark.parametrize("method, expected", [
    ("half_even", [2.0, -2.0, 0.0, 2.0]),
    ("half_up", [3.0, -2.0, 1.0, 2.0]),
    ("floor", [2.0, -3.0, 0.0, 1.0]),
])
def test_quantize_dequantize_ties(method, expected):
    x = torch.tensor([2.5, -2.5, 0.5, 1.5])
    out = quantize_dequantize(x, torch.tensor(1.0), torch.tensor(0), -128, 127, method)
    assert out.tolist() == expected


def test_quantize_dequantize_divides_and_broadcasts():
    s = torch.tensor(0.1)
    x = torch.tensor(-29.94999885559082)  # x / s rounds to -299, x * (1 / s) is exactly -299.5 -> -300
    assert torch.round(x / s) != torch.round(x * (1 / s))
    assert quantize_dequantize(x, s, torch.tensor(0), -1000, 1000) == torch.round(x / s) * s
    w = torch.tensor([[1.0, 300.0], [-1.0, 0.3]])
    out = quantize_dequantize(w, torch.tensor([1.0, 0.1]), torch.tensor([0, 2]), 0, 255, ch_axis=1)
    assert out.tolist() == [[1.0, pytest.approx(25.3)], [0.0, pytest.approx(0.3)]]
