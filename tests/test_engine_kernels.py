"""Integer kernels of modern architectures (passes/integer.qmul, qmatmul; passes/nonlinear): bit-exact
against onnxruntime, whole graph, and what the coverage report says about them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_models import TinyEfficientNet, TinyViT, batches, reestimate_bn
from test_integer_kernels import qdq_binary_session

from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets
from quantbench.engine.passes.integer import qadd, qlinear, qmatmul, qmul
from quantbench.engine.passes.nonlinear import isqrt, qlut, qmean, qmean_lut, qnorm, qnorm_int, qsoftmax
from quantbench.engine.targets import check_hardware


@pytest.mark.parametrize("seed", range(4))
def test_qmul_matches_onnxruntime_on_every_pair(seed):
    """All 65536 (a, b) pairs of int8 activations (exported as uint8 + 128), random float scales."""
    rng = np.random.default_rng(seed)
    sa, sb = (np.float32(rng.uniform(0.004, 0.06)) for _ in range(2))
    sc = np.float32(rng.uniform(0.0002, 0.003))
    za, zb, zc = (int(rng.integers(-20, 20)) for _ in range(3))
    a, b = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128))
    a, b = a.ravel().astype(np.int8), b.ravel().astype(np.int8)
    sess = qdq_binary_session(sa, sb, sc, za + 128, zb + 128, zc + 128, op="Mul")
    expected = sess.run(None, {"a": (a.astype(np.int16) + 128).astype(np.uint8),
                               "b": (b.astype(np.int16) + 128).astype(np.uint8)})[0].astype(np.int64) - 128

    def qp(s, z):
        return (float(s), z, None, -128, 127, "int8", "half_even")

    got = qmul(torch.from_numpy(a), qp(sa, za), torch.from_numpy(b), qp(sb, zb), qp(sc, zc))
    assert np.array_equal(got.numpy().astype(np.int64), expected)


def _pipeline(cls, preset, tmp_path, size=16):
    torch.manual_seed(0)
    model = reestimate_bn(cls(), (8, 3, size, size))
    x = torch.randn(8, 3, size, size)
    quantizer = ModelQuantizer(presets.get(preset))
    qmodel = quantizer.quantize_model(capture(model, (x,)), batches(4, (8, 3, size, size), 1))
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (x,), tmp_path / f"{cls.__name__}.onnx")
    report = check.compare(path, frozen, [*batches(3, (8, 3, size, size), 2), x * 3], float_model=model)
    return model, quantizer, qmodel, frozen, report


def _targets(frozen):
    return [n.target for n in frozen.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("preset", ["int8_float", pytest.param("int8_pow2", marks=pytest.mark.slow)])  # ~15 s each
def test_transformer_block_is_whole_graph_and_exact(preset, tmp_path):
    """Attention matmuls, integer softmax, tables (GELU, q * scale), class token, position embedding,
    integer LayerNorm: 0 LSB against onnxruntime, nothing left in float."""
    _, quantizer, qmodel, frozen, report = _pipeline(TinyViT, preset, tmp_path)
    assert report.max_lsb_err == 0.0 and report.top1_agreement == 100.0, report
    targets = _targets(frozen)
    assert targets.count(qmatmul) == 2 and targets.count(qsoftmax) == 1
    assert targets.count(qnorm_int) == 3 and targets.count(qlut) >= 2 and targets.count(qlinear) == 6
    assert quantizer.coverage(qmodel).float_nodes == []


@pytest.mark.parametrize("preset", ["int8_float", pytest.param("int8_pow2", marks=pytest.mark.slow)])  # one fast
def test_silu_and_squeeze_excitation_are_integer_and_exact(preset, tmp_path):
    """SiLU and sigmoid as tables, the SE gate an integer multiply, means and the residual integer."""
    _, quantizer, qmodel, frozen, report = _pipeline(TinyEfficientNet, preset, tmp_path)
    assert report.max_lsb_err == 0.0 and report.top1_agreement == 100.0, report
    targets = _targets(frozen)
    assert targets.count(qmul) == 1 and targets.count(qmean_lut) == 2 and targets.count(qadd) == 1
    assert targets.count(qlut) == 5  # three SiLU, the sigmoid gate, the hardswish
    assert targets.count(qnorm_int) == 1  # the GroupNorm
    assert quantizer.coverage(qmodel).float_nodes == []


def test_integer_square_root_is_exact():
    """isqrt (integer ops only: what LayerNorm's export runs) is floor(sqrt(v)) up to 2^62."""
    import math
    import random

    rng = random.Random(0)
    values = [1, 2, 3, 15, 16, 17, (1 << 62) - 1, 1 << 61] + [k * k + d for k in range(1, 400) for d in (-1, 0, 1)]
    values += [rng.randrange(1, 1 << 62) for _ in range(4000)] + [rng.randrange(1, 1 << 24) for _ in range(4000)]
    got = isqrt(torch.tensor([v for v in values if v > 0], dtype=torch.int64))
    assert got.tolist() == [math.isqrt(v) for v in values if v > 0]


def test_npu_target_flags_what_it_has_no_kernel_for(tmp_path):
    """freeze(target='npu_pow2') keeps softmax / LayerNorm: check_hardware names each (npu_op)."""
    torch.manual_seed(0)
    model = reestimate_bn(TinyViT(), (8, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    frozen = quantizer.freeze(quantizer.quantize_model(capture(model, (x,)), [x]), target="npu_pow2")
    rows = {(r.op, r.constraint) for r in check_hardware(frozen)}
    assert {("softmax", "npu_op"), ("layer_norm", "npu_op"), ("matmul", "npu_op")} <= rows


def test_subtraction_is_an_integer_add(tmp_path):
    """``anchor - x`` (a constant tensor), ``a - b`` and ``x - 0.5``: integer adds and tables, exact."""

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.register_buffer("anchor", torch.rand(1, 4, 8, 8) * 3)

        def forward(self, x):
            y = self.conv(x)
            a, b = y[:, :4], y[:, 4:]
            return torch.cat([self.anchor - a, b - a, (a + b) / 2, a - 0.5], 1)

    x = torch.randn(8, 3, 8, 8)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(capture(Decode().eval(), (x,)), [x])
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    assert "sub" not in {str(getattr(t, "__name__", t)) for t in _targets(frozen)}
    path = export_onnx(frozen, (x,), tmp_path / "decode.onnx")
    assert check.compare(path, frozen, batches(3, (8, 3, 8, 8), 4)).max_lsb_err == 0.0


# What each documented float node of coverage() becomes in the ONNX graph onnxruntime runs.
_ONNX_FLOAT_FORM = {"layer_norm": {"Add", "Sqrt", "Div", "Mul"}, "group_norm": {"Add", "Sqrt", "Div", "Mul"},
                    "upsample_bilinear2d": {"Resize"}}


@pytest.mark.parametrize("model_name", ["TinyAllOps", pytest.param("TinyViT", marks=pytest.mark.slow),  # ~10 s
                                        "TinyEfficientNet"])
def test_coverage_agrees_with_the_exported_graph(model_name, tmp_path):
    """coverage() (the engine's view) and onnx_float_nodes (what onnxruntime runs) name the same float work."""
    import engine_models

    from quantbench.engine.onnx_coverage import onnx_float_nodes

    torch.manual_seed(0)
    model = reestimate_bn(getattr(engine_models, model_name)(), (8, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(capture(model, (x,)), [x])
    cov = quantizer.coverage(qmodel)
    onnx_cov = onnx_float_nodes(export_onnx(quantizer.freeze(qmodel), (x,), tmp_path / "m.onnx"))
    expected = set().union(*(_ONNX_FLOAT_FORM[op] for _, op, _ in cov.float_nodes)) if cov.float_nodes else set()
    assert set(onnx_cov.float_op_counts()) == expected, (str(cov), str(onnx_cov))
    norms = sum(op in ("layer_norm", "group_norm") for _, op, _ in cov.float_nodes)
    assert onnx_cov.float_op_counts().get("Sqrt", 0) == norms  # one square root per normalization
    assert onnx_cov.float_op_counts().get("Resize", 0) == sum(op == "upsample_bilinear2d"
                                                              for _, op, _ in cov.float_nodes)


def test_relative_position_bias_folds_to_a_constant(tmp_path):
    """Swin / LeViT attention biases: a parameter table gathered by a buffer index in ``forward``.
    PTQ folds it (fold_constants), so the attention add reads an integer constant."""

    class RelPosAttention(torch.nn.Module):
        def __init__(self, n: int = 9, dim: int = 8):
            super().__init__()
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.table = torch.nn.Parameter(torch.randn(2 * n - 1))
            idx = torch.arange(n)
            self.register_buffer("index", (idx[:, None] - idx[None, :] + n - 1).reshape(-1))
            self.n = n

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            bias = self.table[self.index].reshape(self.n, self.n)
            return ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v

    torch.manual_seed(0)
    x = torch.randn(8, 9, 8)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(capture(RelPosAttention().eval(), (x,)), [x])
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (x,), tmp_path / "relpos.onnx")
    assert check.compare(path, frozen, [torch.randn(8, 9, 8) for _ in range(3)]).max_lsb_err == 0.0


def test_bilinear_resize_is_integer_and_exact(tmp_path):
    """2x up, to an odd size, align_corners: two integer matrix products and an exact requantization."""
    import torch.nn.functional as F

    class Resize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            up = F.interpolate(F.interpolate(y, scale_factor=2.0, mode="bilinear"), size=(7, 9), mode="bilinear")
            return torch.cat([up, F.interpolate(y, size=(7, 9), mode="bilinear", align_corners=True)], 1)

    x = torch.randn(8, 3, 10, 12)
    for preset in ("int8_float", "int8_pow2"):
        quantizer = ModelQuantizer(presets.get(preset))
        qmodel = quantizer.quantize_model(capture(Resize().eval(), (x,)), batches(3, (8, 3, 10, 12), 1))
        assert quantizer.coverage(qmodel).float_nodes == []
        frozen = quantizer.freeze(qmodel)
        path = export_onnx(frozen, (x,), tmp_path / f"{preset}.onnx")
        assert check.compare(path, frozen, batches(3, (8, 3, 10, 12), 5)).max_lsb_err == 0.0


@pytest.mark.slow  # ~5 s: a forced fallback; the integer norm itself is checked in the fast tier
def test_norm_fallback_is_exact_and_named(tmp_path, monkeypatch):
    """Where int64 cannot hold the integer norm (forced here), LayerNorm takes integer statistics and a
    double-precision normalization: still 0 LSB, and both coverage reports name the float step."""
    from quantbench.engine.onnx_coverage import onnx_float_nodes
    from quantbench.engine.passes import nonlinear

    monkeypatch.setattr(nonlinear, "NORM_FRAC_BITS", 7)  # below the 8 bits the integer norm needs
    _, quantizer, qmodel, frozen, report = _pipeline(TinyViT, "int8_float", tmp_path)
    assert report.max_lsb_err == 0.0 and report.top1_agreement == 100.0, report
    assert _targets(frozen).count(qnorm) == 3
    cov = quantizer.coverage(qmodel)
    assert {op for _, op, _ in cov.float_nodes} == {"layer_norm"} and len(cov.float_nodes) == 3
    assert all("double precision" in reason for *_, reason in cov.float_nodes)
    onnx_cov = onnx_float_nodes(tmp_path / "TinyViT.onnx")
    assert set(onnx_cov.float_op_counts()) == _ONNX_FLOAT_FORM["layer_norm"]
    assert onnx_cov.float_op_counts()["Sqrt"] == 3


def test_swin_window_moves_are_integer(tmp_path):
    """Swin's shifted windows: pad, roll and the window reshapes move integers; LayerNorm after them
    is the integer norm. Whole graph, 0 LSB."""
    import torch.nn.functional as F

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 8, 2, 2)
            self.norm = torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.embed(x).permute(0, 2, 3, 1)  # B, H, W, C
            y = F.pad(y, (0, 0, 0, 1, 0, 1))
            y = torch.roll(y, shifts=(-1, -1), dims=(1, 2))
            b, h, w, c = y.shape
            win = y.reshape(b, h // 3, 3, w // 3, 3, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 9, c)
            return self.fc(self.norm(win))

    x = torch.randn(8, 3, 10, 10)
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qmodel = quantizer.quantize_model(capture(Shifted().eval(), (x,)), [x])
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (x,), tmp_path / "shifted.onnx")
    assert check.compare(path, frozen, batches(3, (8, 3, 10, 10), 4)).max_lsb_err == 0.0
    from quantbench.engine.onnx_coverage import onnx_float_nodes

    cov = onnx_float_nodes(path)  # the pad, the roll (Slice + Concat) and the windows move integers
    assert cov.float_nodes == [] and cov.float_movement == [], str(cov)


class _WindowMean(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@pytest.mark.parametrize("preset", ["int8_float", "int8_pow2", "uint8_asym"])
@pytest.mark.parametrize("table", [True, False], ids=["table", "arithmetic"])
def test_mean_requantization_is_a_table_exact_on_every_sum(preset, table, tmp_path, monkeypatch):
    """A mean's requantization is one table lookup (no Mod / Div / Equal left in the ONNX graph); past
    MEAN_TABLE_MAX (forced here) it is qmean's run-time arithmetic. Either way every sum of the 2 x 2
    window, both ends included, is 0 LSB against onnxruntime and equals the exact rational
    round_half_even(sum * s_x / (4 s_y)) + z_y, ties among them (s_y == s_x: a quarter)."""
    from fractions import Fraction

    import onnx

    from quantbench.engine.passes import nonlinear

    if not table:
        monkeypatch.setattr(nonlinear, "MEAN_TABLE_MAX", 0)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(8, 1, 1, 1, generator=g) * 3 + 2).expand(8, 1, 2, 2).contiguous() for _ in range(2)]
    quantizer = ModelQuantizer(presets.get(preset))  # a constant window: the mean's range is the input's
    qmodel = quantizer.quantize_model(capture(_WindowMean().eval(), (calib[0],)), calib)
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    kernel = qmean_lut if table else qmean
    node = next(n for n in frozen.graph.nodes if n.op == "call_function" and n.target in (qmean, qmean_lut))
    assert node.target is kernel
    (s_x, z_x, _, x_min, x_max, *_), (s_y, z_y, _, y_min, y_max, *_) = node.meta["qb_qparams"]
    sums = list(range(4 * x_min, 4 * x_max + 1))
    rows = [[s // 4 + (k < s % 4) for k in range(4)] for s in sums] + [[x_min, x_max, x_max, x_min]]
    q = torch.tensor(rows, dtype=torch.float64).reshape(-1, 1, 2, 2)
    x = ((q - z_x) * float(s_x)).float()
    path = export_onnx(frozen, (x[:2],), tmp_path / "mean.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    arithmetic = {"Mod", "Div", "Equal", "Greater", "Sign", "Abs", "Mul"}
    if table:
        assert "GatherElements" in ops and not ops & arithmetic, sorted(ops)
    else:
        assert ops >= {"Mod", "Div", "Equal"}, sorted(ops)
    report = check.compare(path, frozen, [x])
    assert report.max_lsb_err == 0.0, report
    got = (torch.round(frozen(x).double() / float(s_y)) + z_y).to(torch.int64).reshape(-1).tolist()
    ratio = Fraction(float(s_x)) / (4 * Fraction(float(s_y)))
    exact = [Fraction(sum(r) - 4 * z_x) * ratio for r in rows]
    assert got == [min(max(round(v) + z_y, y_min), y_max) for v in exact]  # round(): half to even
    assert sum(v.denominator == 2 for v in exact) >= 100  # ties: half-to-even decides them
