"""Fake quantization with gradients: STE, LSQ (arXiv 1902.08153), TQT (arXiv 1903.08066).

``round()`` is piecewise constant, so ``torch.autograd.gradcheck`` (and finite
differences of the true function) would report a zero or infinite derivative,
not the LSQ/TQT estimator. The gradients are checked two ways instead:

* exactly, against the papers' formulas written out element by element;
* by central finite differences of a *surrogate* that the estimator is the
  exact derivative of: at the evaluation point, freeze the rounding residual
  ``c = round(x/s) - x/s``, the in-range mask ``m`` and the clamp value ``b``
  (qmin below, qmax above); then ``y(x, s) = m * (x + s*c) + (1 - m) * s*b``
  equals the true forward at that point and its derivatives are exactly the
  STE/LSQ/TQT ones. For TQT, ``s = 2^(log2_t + k - shift)`` with the ceil's
  offset ``k = ceil(l0) - l0`` frozen too (the ceil is straight-through).
"""

from __future__ import annotations

import math

import pytest
import torch

from quantbench.engine import learnable
from quantbench.engine.learnable import (
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_scale,
    ste_fake_quantize,
    tqt_fake_quantize,
    tqt_init_log2t_kl,
    tqt_init_log2t_max,
    tqt_init_log2t_weight,
    tqt_scale,
)

F64 = torch.float64
FD_RTOL = 1e-7  # float64 central differences of the surrogate (achieved error is ~1e-10 or less)


def _channel_view(p: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return p.reshape(shape)


def _frozen_terms(x, s, qmin, qmax):
    """Mask, rounding residual and clamp value at the evaluation point (see module docstring)."""
    v = x / s
    r = torch.round(v)
    m = ((r >= qmin) & (r <= qmax)).to(x.dtype)
    b = torch.where(r < qmin, float(qmin), float(qmax)).to(x.dtype)
    return m, r - v, b


def _surrogate(x, s, m, c, b):
    return m * (x + s * c) + (1 - m) * s * b


def _central_diff(f, t: torch.Tensor, h: float) -> torch.Tensor:
    """d f / d t for every element of ``t`` (float64), central differences."""
    grad = torch.zeros_like(t)
    flat = grad.reshape(-1)
    for i in range(t.numel()):
        tp, tm = t.clone(), t.clone()
        tp.reshape(-1)[i] += h
        tm.reshape(-1)[i] -= h
        flat[i] = (f(tp) - f(tm)) / (2 * h)
    return grad


# ----------------------------------------------------------------------------- STE


@pytest.mark.parametrize("ch_axis", [None, 1])
def test_ste_forward_matches_reference(ch_axis):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5) * 3
    scale = torch.tensor(0.05) if ch_axis is None else torch.tensor([0.05, 0.1, 0.02])
    zp = torch.tensor(7) if ch_axis is None else torch.tensor([0, 7, -3])
    s, z = _channel_view(scale, x, ch_axis), _channel_view(zp, x, ch_axis).float()
    for method, rnd in (("half_even", torch.round), ("half_up", lambda v: torch.floor(v + 0.5)),
                        ("floor", torch.floor)):
        ref = (torch.clamp(rnd(x / s) + z, -128, 127) - z) * s
        out = ste_fake_quantize(x, scale, zp, -128, 127, ch_axis=ch_axis, round_method=method)
        assert torch.equal(out, ref), method


def test_ste_tie_rounding():
    x = torch.tensor([2.5, 3.5, -2.5, 0.5, -0.5])
    expected = {
        "half_even": [2.0, 4.0, -2.0, 0.0, -0.0],
        "half_up": [3.0, 4.0, -2.0, 1.0, 0.0],
        "floor": [2.0, 3.0, -3.0, 0.0, -1.0],
    }
    for method, want in expected.items():
        out = ste_fake_quantize(x, 1.0, 0, -128, 127, round_method=method)
        assert out.tolist() == want, method


def test_ste_divides_by_scale():
    """ORT divides by the scale; x * (1/s) rounds differently for some x, and we must match x / s."""
    s = torch.tensor(0.0371)
    x = (torch.arange(-128, 127, dtype=torch.float32) + 0.5) * s  # near-ties, where the two can disagree
    differs = torch.round(x / s) != torch.round(x * (1.0 / s))
    assert differs.any(), "test data must contain cases where the two conventions disagree"
    out = ste_fake_quantize(x, s, 0, -128, 127)
    assert torch.equal(out, torch.clamp(torch.round(x / s), -128, 127) * s)


def test_ste_gradient_is_in_range_mask():
    x = torch.tensor([0.0, 1.3, 12.6, 12.8, -12.8, -12.9, 50.0, -50.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    w = torch.arange(1.0, 9.0)
    (ste_fake_quantize(x, scale, 0, -128, 127) * w).sum().backward()
    r = torch.round(x.detach() / 0.1)
    assert torch.equal(x.grad, w * ((r >= -128) & (r <= 127)))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 0.0, 5.0, 0.0, 0.0, 0.0]
    assert scale.grad is None


def test_ste_zero_point_shifts_the_range():
    x = torch.tensor([-1.0, 0.0, 25.0, 26.0], requires_grad=True)
    out = ste_fake_quantize(x, 0.1, -122, 0, 255)  # uint8 grid [0, 255] covers x in [12.2, 37.7]
    assert out.tolist() == pytest.approx([12.2, 12.2, 25.0, 26.0])
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- LSQ


def _lsq_reference_grads(x, s, w, qmin, qmax, g):
    """The LSQ paper's gradients element by element, in plain Python floats."""
    gx, gs = [], []
    for xi, wi in zip(x.tolist(), w.tolist()):
        v = xi / s
        r = float(torch.round(torch.tensor(v, dtype=F64)))
        if r < qmin:
            gx.append(0.0)
            gs.append(wi * qmin)
        elif r > qmax:
            gx.append(0.0)
            gs.append(wi * qmax)
        else:
            gx.append(wi)
            gs.append(wi * (r - v))
    return torch.tensor(gx, dtype=F64), math.fsum(gs) * g


def test_lsq_gradient_equals_formula():
    # int4 grid [-8, 7], s = 0.5: in range, ties, just inside/outside each end, far outside.
    x = torch.tensor([0.3, -1.1, 0.25, 0.75, 3.49, 3.6, 3.75, -4.0, -4.2, -4.3, 10.0, -10.0], dtype=F64)
    w = torch.linspace(-1.0, 2.0, x.numel(), dtype=F64)
    xr = x.clone().requires_grad_(True)
    s = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y = lsq_fake_quantize(xr, s, -8, 7, grad_scale=0.3)
    assert torch.equal(y, torch.clamp(torch.round(x / 0.5), -8, 7) * 0.5)
    (y * w).sum().backward()
    ref_gx, ref_gs = _lsq_reference_grads(x, 0.5, w, -8, 7, 0.3)
    assert torch.equal(xr.grad, ref_gx)
    assert s.grad.item() == pytest.approx(ref_gs, rel=1e-12, abs=1e-14)


def test_lsq_grad_scale_multiplies_scale_gradient_only():
    torch.manual_seed(1)
    x = torch.randn(64, dtype=F64) * 2
    grads = {}
    for g in (1.0, 0.37):
        xr = x.clone().requires_grad_(True)
        s = torch.tensor(0.02, dtype=F64, requires_grad=True)
        (lsq_fake_quantize(xr, s, -128, 127, grad_scale=g) ** 2).sum().backward()
        grads[g] = (xr.grad, s.grad)
    assert torch.equal(grads[1.0][0], grads[0.37][0])
    assert grads[0.37][1].item() == pytest.approx(0.37 * grads[1.0][1].item(), rel=1e-14)


@pytest.mark.parametrize("ch_axis", [None, 0, 1])
def test_lsq_matches_finite_difference_of_frozen_surrogate(ch_axis):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, dtype=F64) * 4
    scale0 = torch.tensor(0.03, dtype=F64) if ch_axis is None else torch.rand(x.shape[ch_axis], dtype=F64) * 0.04 + 0.01
    w = torch.randn_like(x)
    g = 0.25
    m, c, b = _frozen_terms(x, _channel_view(scale0, x, ch_axis), -128, 127)
    assert 0 < m.sum() < m.numel(), "need elements both in and out of range"

    def loss_s(scale):
        return (w * _surrogate(x, _channel_view(scale, x, ch_axis), m, c, b) ** 2).sum()

    def loss_x(xx):
        return (w * _surrogate(xx, _channel_view(scale0, x, ch_axis), m, c, b) ** 2).sum()

    xr, s = x.clone().requires_grad_(True), scale0.clone().requires_grad_(True)
    y = lsq_fake_quantize(xr, s, -128, 127, grad_scale=g, ch_axis=ch_axis)
    assert torch.allclose(y, _surrogate(x, _channel_view(scale0, x, ch_axis), m, c, b), rtol=0, atol=1e-12)
    (w * y**2).sum().backward()
    # The surrogate loss is quadratic in s and in x, so central differences have no truncation
    # error; a large step keeps the float64 cancellation error small.
    fd_s = _central_diff(loss_s, scale0, h=1e-3) * g
    torch.testing.assert_close(s.grad, fd_s, rtol=FD_RTOL, atol=0.0)
    torch.testing.assert_close(xr.grad, _central_diff(loss_x, x, h=1e-2), rtol=FD_RTOL, atol=1e-12)


@pytest.mark.parametrize("ch_axis", [0, -1])
def test_lsq_per_channel_equals_per_tensor_slices(ch_axis):
    torch.manual_seed(3)
    x = torch.randn(4, 2, 3, dtype=F64) * 3
    axis = ch_axis % x.dim()
    scale0 = torch.rand(x.shape[axis], dtype=F64) * 0.05 + 0.01
    xr, s = x.clone().requires_grad_(True), scale0.clone().requires_grad_(True)
    (lsq_fake_quantize(xr, s, -8, 7, grad_scale=0.5, ch_axis=ch_axis) ** 2).sum().backward()
    for k in range(x.shape[axis]):
        xk = x.select(axis, k).clone().requires_grad_(True)
        sk = scale0[k].clone().requires_grad_(True)
        (lsq_fake_quantize(xk, sk, -8, 7, grad_scale=0.5) ** 2).sum().backward()
        assert torch.equal(xr.grad.select(axis, k), xk.grad)
        assert s.grad[k].item() == pytest.approx(sk.grad.item(), rel=1e-12)


def test_lsq_scale_stays_positive():
    x = torch.tensor([0.0, 0.3, -1.0])
    assert torch.equal(lsq_fake_quantize(x, torch.tensor(-0.1), -128, 127, 1.0),
                       lsq_fake_quantize(x, torch.tensor(0.1), -128, 127, 1.0))
    s = torch.tensor(0.0, requires_grad=True)
    y = lsq_fake_quantize(x, s, -128, 127, 1.0)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(s.grad)
    # With a negative step the gradient flips sign (chain rule through |s|).
    sp, sn = torch.tensor(0.1, requires_grad=True), torch.tensor(-0.1, requires_grad=True)
    lsq_fake_quantize(torch.tensor([0.26, 30.0]), sp, -128, 127, 1.0).sum().backward()
    lsq_fake_quantize(torch.tensor([0.26, 30.0]), sn, -128, 127, 1.0).sum().backward()
    assert sn.grad.item() == -sp.grad.item() != 0.0


def test_lsq_helpers():
    assert lsq_grad_scale(1000, 127) == pytest.approx(1 / math.sqrt(1000 * 127))
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert lsq_init_scale(x, 127).item() == pytest.approx(2 * 1.25 / math.sqrt(127))
    per_ch = lsq_init_scale(x, 7, ch_axis=0)
    torch.testing.assert_close(per_ch, torch.tensor([2 * 2.0, 2 * 0.5]) / math.sqrt(7))
    torch.testing.assert_close(lsq_init_scale(x, 7, ch_axis=1), torch.tensor([1.5, 3.5]) / math.sqrt(7))
    assert lsq_init_scale(torch.zeros(3, 3), 127).item() > 0
    assert (lsq_init_scale(torch.zeros(3, 3), 127, ch_axis=0) > 0).all()


# ----------------------------------------------------------------------------- TQT


def test_tqt_scale_is_exact_power_of_two():
    log2_t = torch.linspace(-20.0, 20.0, 401)
    for qmin, qmax, levels in ((-128, 127, 128), (-127, 127, 128), (-8, 7, 8), (0, 255, 256)):
        s = tqt_scale(log2_t, qmin, qmax)
        mantissa, exponent = torch.frexp(s)
        assert (mantissa == 0.5).all()
        assert torch.equal(exponent - 1, (torch.ceil(log2_t) - math.log2(levels)).int())
    assert tqt_scale(torch.tensor(0.3), -128).item() == 2.0 / 128
    assert tqt_scale(torch.tensor(2.0), -8).item() == 0.5
    assert tqt_scale(torch.tensor(2.01), -8).item() == 1.0
    assert tqt_scale(torch.tensor(-1000.0), -128).item() > 0  # exponent floored, never 0


def test_tqt_forward_is_on_the_pow2_grid():
    torch.manual_seed(4)
    x = torch.randn(1000) * 3
    log2_t = torch.tensor(2.3)  # threshold 8 after the ceil: s = 8 / 128
    y = tqt_fake_quantize(x, log2_t, -128, 127)
    s = 8.0 / 128
    assert torch.equal(y, torch.clamp(torch.round(x / s), -128, 127) * s)
    q = y / s
    assert torch.equal(q, torch.round(q)) and q.min() >= -128 and q.max() <= 127


def test_tqt_gradient_equals_formula():
    # int4, log2_t = 1.4 -> s = 2^2 / 8 = 0.5.
    x = torch.tensor([0.3, -1.1, 0.25, 0.75, 3.49, 3.6, 3.75, -4.0, -4.2, -4.3, 10.0, -10.0], dtype=F64)
    w = torch.linspace(-1.0, 2.0, x.numel(), dtype=F64)
    xr = x.clone().requires_grad_(True)
    log2_t = torch.tensor(1.4, dtype=F64, requires_grad=True)
    (tqt_fake_quantize(xr, log2_t, -8, 7) * w).sum().backward()
    ref_gx, ref_gs = _lsq_reference_grads(x, 0.5, w, -8, 7, 1.0)
    assert torch.equal(xr.grad, ref_gx)
    assert log2_t.grad.item() == pytest.approx(0.5 * math.log(2.0) * ref_gs, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("ch_axis", [None, 0, 2])
def test_tqt_matches_finite_difference_of_frozen_surrogate(ch_axis):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5, dtype=F64) * 4
    shift = math.log2(128)
    l0 = torch.tensor(1.3, dtype=F64) if ch_axis is None else torch.rand(x.shape[ch_axis], dtype=F64) * 2 + 0.2
    k = torch.ceil(l0) - l0  # the ceil is straight-through: freeze its offset

    def scale(log2_t):
        return _channel_view(torch.exp2(log2_t + k - shift), x, ch_axis)

    m, c, b = _frozen_terms(x, scale(l0), -128, 127)
    assert 0 < m.sum() < m.numel(), "need elements both in and out of range"
    w = torch.randn_like(x)

    xr, lr = x.clone().requires_grad_(True), l0.clone().requires_grad_(True)
    y = tqt_fake_quantize(xr, lr, -128, 127, ch_axis=ch_axis)
    assert torch.equal(y, _surrogate(x, scale(l0), m, c, b))
    (w * y**2).sum().backward()
    # exp2 is smooth: with h = 1e-5 the truncation error is ~ (h ln2)^2 / 6 relative, ~1e-11.
    fd_l = _central_diff(lambda lt: (w * _surrogate(x, scale(lt), m, c, b) ** 2).sum(), l0, h=1e-5)
    torch.testing.assert_close(lr.grad, fd_l, rtol=FD_RTOL, atol=0.0)
    fd_x = _central_diff(lambda xx: (w * _surrogate(xx, scale(l0), m, c, b) ** 2).sum(), x, h=1e-2)
    torch.testing.assert_close(xr.grad, fd_x, rtol=FD_RTOL, atol=1e-12)


def test_tqt_per_channel_equals_per_tensor_slices():
    torch.manual_seed(6)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    l0 = torch.tensor([-1.5, 0.2, 0.7], dtype=F64)
    wr, lr = w.clone().requires_grad_(True), l0.clone().requires_grad_(True)
    (tqt_fake_quantize(wr, lr, -8, 7, ch_axis=0) ** 2).sum().backward()
    for k in range(3):
        wk, lk = w[k].clone().requires_grad_(True), l0[k].clone().requires_grad_(True)
        (tqt_fake_quantize(wk, lk, -8, 7) ** 2).sum().backward()
        assert torch.equal(wr.grad[k], wk.grad)
        assert lr.grad[k].item() == pytest.approx(lk.grad.item(), rel=1e-12)


def test_tqt_init_weight_and_max():
    torch.manual_seed(7)
    w = torch.randn(4, 50) * torch.tensor([[0.1], [1.0], [2.0], [0.01]]) + 0.05
    ref = w.mean().abs() + 3 * w.std(correction=0)
    assert tqt_init_log2t_weight(w).item() == pytest.approx(math.log2(ref.item()), rel=1e-6)
    per_ch = tqt_init_log2t_weight(w, ch_axis=0)
    ref_ch = w.mean(dim=1).abs() + 3 * w.std(dim=1, correction=0)
    torch.testing.assert_close(per_ch, torch.log2(ref_ch))
    assert tqt_init_log2t_max(w).item() == pytest.approx(math.log2(w.abs().max().item()))
    torch.testing.assert_close(tqt_init_log2t_max(w, ch_axis=0), torch.log2(w.abs().amax(dim=1)))
    assert torch.isfinite(tqt_init_log2t_weight(torch.zeros(3, 3), ch_axis=0)).all()


def test_tqt_init_kl_clips_outliers():
    torch.manual_seed(8)
    x = torch.randn(20000)
    x[:4] = torch.tensor([40.0, -35.0, 50.0, 30.0])
    t = 2 ** tqt_init_log2t_kl(x).item()
    assert 0 < t < 0.5 * x.abs().max().item()
    assert t > 2.0  # keeps the bulk of a unit Gaussian
    # Same answer from an accumulated histogram of |x|.
    max_abs = x.abs().max()
    hist = torch.histc(x.abs().double(), bins=2048, min=0.0, max=max_abs.item())
    assert tqt_init_log2t_kl((hist, max_abs)).item() == pytest.approx(math.log2(t))


def test_tqt_init_kl_bounds():
    for x in (torch.rand(5000), torch.ones(100), torch.tensor([0.0, 3.0])):
        log2_t = tqt_init_log2t_kl(x, bits=4)
        assert 0 < 2 ** log2_t.item() <= x.abs().max().item() * (1 + 1e-9)
    assert torch.isfinite(tqt_init_log2t_kl(torch.zeros(10)))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lsq_tqt_cuda_match_cpu():
    torch.manual_seed(9)
    x = torch.randn(8, 4, 6, 6) * 2
    w = torch.randn_like(x)
    cases = (
        ("lsq", torch.tensor(0.03), None), ("lsq", torch.rand(4) * 0.05 + 0.01, 1),
        ("tqt", torch.tensor(1.7), None), ("tqt", torch.tensor([-0.5, 0.4, 1.2, 2.9]), 1),
    )
    for method, p0, ch_axis in cases:
        results = []
        for device in ("cpu", "cuda"):
            xr = x.to(device).requires_grad_(True)
            p = p0.to(device).requires_grad_(True)
            if method == "lsq":
                y = lsq_fake_quantize(xr, p, -128, 127, grad_scale=0.1, ch_axis=ch_axis)
            else:
                y = tqt_fake_quantize(xr, p, -128, 127, ch_axis=ch_axis)
            (w.to(device) * y).sum().backward()
            results.append((y.detach().cpu(), xr.grad.cpu(), p.grad.cpu()))
        (y_c, gx_c, gp_c), (y_g, gx_g, gp_g) = results
        assert torch.equal(y_c, y_g), method
        assert torch.equal(gx_c, gx_g), method
        torch.testing.assert_close(gp_g, gp_c, rtol=1e-4, atol=1e-6)
    mantissa, _ = torch.frexp(tqt_scale(torch.linspace(-30, 30, 601, device="cuda"), -128))
    assert (mantissa == 0.5).all()


# ----------------------------------------------------------------------------- fast path = reference path


def _floats_around(v: float, dtype: torch.dtype, k: int = 8) -> torch.Tensor:
    """The k floats of ``dtype`` below ``v``, ``v`` and the k above."""
    c = torch.tensor([v], dtype=dtype)
    out = [c]
    for _ in range(k):
        out.append(torch.nextafter(out[-1], torch.tensor([math.inf], dtype=dtype)))
        out.insert(0, torch.nextafter(out[0], torch.tensor([-math.inf], dtype=dtype)))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("round_method", ["half_even", "half_up", "floor"])
def test_unclamped_interval_is_the_rounded_test(dtype, round_method):
    """``lo < x < hi`` selects exactly the x whose rounded value the clamp leaves alone, ties included."""
    gen = torch.Generator().manual_seed(10)
    scales = [2.0 ** e for e in (-20, -7, 0, 3)] + torch.exp(torch.rand(12, generator=gen) * 24 - 16).tolist()
    for (qmin, qmax), zp in (((-128, 127), 0.0), ((-127, 127), 0.0), ((-8, 7), 3.0), ((0, 255), 0.0),
                             ((0, 255), 128.0), ((-2**31, 2**31 - 1), 0.0)):
        for scale in scales:
            scale = float(torch.tensor(scale, dtype=dtype))
            bounds = learnable._unclamped_interval(scale, zp, qmin, qmax, round_method, dtype)
            assert bounds is not None, (scale, qmin, qmax, zp)
            ends = [(qmin - zp - 0.5) * scale, (qmax - zp + 0.5) * scale, (qmin - zp) * scale,
                    (qmax - zp + 1) * scale, 0.0]
            x = torch.cat([_floats_around(e, dtype) for e in ends]
                          + [torch.randn(256, generator=gen, dtype=dtype) * scale * 200])
            zpt = None if zp == 0.0 else torch.tensor(zp, dtype=dtype)
            _, r = learnable._to_grid(x, torch.tensor(scale, dtype=dtype), zpt, qmin, qmax, round_method)
            ones = torch.ones_like(x)
            expected = learnable._inside(ones, r, learnable._rounded_bounds(qmin, qmax))
            assert torch.equal(learnable._inside(ones, x, bounds), expected), (scale, qmin, qmax, zp)


def _near_ends_and_ties(n: int, scale: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Half-integer multiples of the step (ties), nudged by a few ulps, and a wide normal spread."""
    k = torch.randint(-140, 141, (n,), generator=gen).to(dtype)
    ties = (k + 0.5) * scale
    ties = ties + torch.randint(-2, 3, (n,), generator=gen).to(dtype) * torch.finfo(dtype).eps * ties.abs()
    return torch.cat([ties, torch.randn(n, generator=gen, dtype=dtype) * scale * 100])


def _run(method: str, x0: torch.Tensor, p0: torch.Tensor, w: torch.Tensor):
    x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(method != "ste")
    if method == "ste":
        y = ste_fake_quantize(x, p, torch.tensor(5), -128, 127, round_method="half_even")
    elif method == "lsq":
        y = lsq_fake_quantize(x, p, -128, 127, grad_scale=0.3)
    else:
        y = tqt_fake_quantize(x, p, -128, 127)
    (w * y).sum().backward()
    with torch.no_grad():  # the forward-only path
        if method == "ste":
            y_eval = ste_fake_quantize(x0, p0, torch.tensor(5), -128, 127)
        elif method == "lsq":
            y_eval = lsq_fake_quantize(x0, p0, -128, 127, grad_scale=0.3)
        else:
            y_eval = tqt_fake_quantize(x0, p0, -128, 127)
    return y.detach(), y_eval, x.grad, p.grad


@pytest.mark.parametrize("method", ["ste", "lsq", "tqt"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cut", [True, False])
def test_fast_path_equals_reference_path(method, dtype, cut, monkeypatch):
    """The per-tensor CPU path (x tested against an interval, one allocation, ``dx = grad`` when the clamp
    cut nothing) and the reference path (the rounded value saved and tested everywhere) give the same
    values and gradients, bit for bit, with and without clipped elements."""
    gen = torch.Generator().manual_seed(11)
    for scale in (0.0371, 2.0 ** -5, 0.4113, 3.1e-4):
        x = _near_ends_and_ties(2000, scale, dtype, gen)
        x = (x if cut else x.clamp(-120 * scale, 120 * scale)).reshape(4, 10, 100)
        w = torch.randn(x.shape, generator=gen, dtype=dtype)
        p = torch.tensor(math.log2(scale) + 7.3 if method == "tqt" else scale, dtype=dtype)
        s = (tqt_scale(p, -128) if method == "tqt" else p).to(dtype)
        bounds = learnable._unclamped_x(x, s, None, -128, 127, "half_even")
        assert bounds is not None and learnable._all_inside(x, bounds) is not cut
        fast = _run(method, x, p, w)
        with monkeypatch.context() as m:
            m.setattr(learnable, "_unclamped_x", lambda *args: None)
            m.setattr(learnable, "_all_inside", lambda *args: False)
            reference = _run(method, x, p, w)
        for a, b in zip(fast, reference):
            assert (a is None and b is None) or (torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()))
        assert torch.equal(fast[0], fast[1])


@pytest.mark.parametrize("method", ["lsq", "tqt"])
def test_sliced_scale_gradient_equals_one_sum(method, monkeypatch):
    """The per-tensor scale gradient, summed slice by slice through a small buffer, is the one-pass sum."""
    gen = torch.Generator().manual_seed(12)
    x = _near_ends_and_ties(5000, 0.05, F64, gen).reshape(10, 1000)
    w = torch.randn(x.shape, generator=gen, dtype=F64)
    p = torch.tensor(math.log2(0.05) + 7.3 if method == "tqt" else 0.05, dtype=F64)
    whole = _run(method, x, p, w)
    monkeypatch.setattr(learnable, "_SLICE", 999)  # 11 slices, the last one short
    sliced = _run(method, x, p, w)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[2], sliced[2])
    assert sliced[3].item() == pytest.approx(whole[3].item(), rel=1e-12)
