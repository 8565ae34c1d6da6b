"""Power-of-two alignment (quantbench.engine.ptq.cle.align_pow2): one scalar per group of tensors (a CLE pair,
ReLU6 included, or a residual stream) that puts their ranges just under powers of two, the function kept exactly.

Graphs are what the ``cle`` algorithm sees: ``capture`` then the PTQ pre-quant passes (BN folded).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets
from quantbench.engine.graph import copy_graph, get_attr_tensor, op_name
from quantbench.engine.observers import pow2_exponent
from quantbench.engine.ops import ops_of_kind
from quantbench.engine.passes.prequant import PREQUANT_PTQ, run_passes
from quantbench.engine.ptq.cle import Pow2AlignReport, align_pow2
from quantbench.errors import ConfigError
from tests.engine_models import reestimate_bn, torchvision_model


class ConvDW(nn.Module):
    """conv-bn-relu6 -> depthwise conv-bn-relu6 -> conv (MobileNet's pattern; the ReLU6 saturates)."""

    def __init__(self, act=nn.ReLU6) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), act())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), act())
        self.pw = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.pw(self.dw(self.conv(x)))


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, 0.0, 4.0)


def _small(act=nn.ReLU6) -> nn.Module:
    torch.manual_seed(0)
    model = ConvDW(act)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # spread-out gains and shifts: channel ranges like a trained net's
                m.weight.copy_(torch.empty(m.num_features).uniform_(-1.0, 1.5, generator=g).exp())
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return reestimate_bn(model, (16, 3, 16, 16))


def _x(n: int = 16, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return run_passes(copy_graph(capture(model.eval(), (x,))), PREQUANT_PTQ)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _clips(gm: fx.GraphModule) -> dict[str, float]:
    """The upper bound of every clipped ReLU (relu6, hardtanh(0, m), clamp(0, m)), by node name."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if op_name(n) == "relu6":
            out[n.name] = 6.0
        elif op_name(n) == "hardtanh" or op_name(n) == "clamp":
            out[n.name] = float(n.args[2])
    return out


def _u(r: float, qmax: int = 127) -> float:
    return r / (qmax * 2.0 ** int(pow2_exponent(torch.tensor(r), qmax)))


def _noise(gm: fx.GraphModule, x: torch.Tensor, qmax: int = 127) -> dict[str, float]:
    """1/u^2 of every weight (per tensor) and of every clipped ReLU's output (its range on ``x``): measured
    directly, independent of the report."""
    clips = set(_clips(gm))
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n) in ops_of_kind("weighted"):
            out[f"weight:{n.name}"] = _u(float(get_attr_tensor(gm, n.args[1].target).detach().abs().max()), qmax) ** -2

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            y = super().run_node(n)
            if n.name in clips:
                out[f"act:{n.name}"] = _u(float(y.abs().max()), qmax) ** -2
            return y

    with torch.no_grad():
        Recorder(gm).run(x)
    return out


def test_exact_on_conv_relu6_dwconv_relu6_conv_and_clips_scaled():
    x = _x()
    gm = _graph(_small(), x)
    with torch.no_grad():
        ref = gm(x)
    before = _clips(gm)
    assert before and set(before.values()) == {6.0}
    report = align_pow2(gm, batches=[(x,)])
    assert isinstance(report, Pow2AlignReport) and report.links == 2
    with torch.no_grad():
        assert _rel(gm(x), ref) <= 1e-5
    after = _clips(gm)
    assert set(after) == set(before)
    for row in report.rows:  # one scalar per pair, in [1, 2); its ReLU6 clip moved with it
        assert 1.0 <= row["scale"] < 2.0
        assert row["bounds"] == [pytest.approx(6.0 * row["scale"], rel=1e-12)]
    assert all(after[n] != 6.0 for n in after)
    assert "pow2 alignment: 2 groups" in str(report) and report.gain_db > 0


def test_clamp_joins_and_stays_exact():
    x = _x()
    gm = _graph(_small(Clamp), x)
    assert {op_name(n) for n in gm.graph.nodes if n.name in _clips(gm)} == {"clamp"}
    with torch.no_grad():
        ref = gm(x)
    report = align_pow2(gm, batches=[x])  # a bare tensor is a 1-tuple
    assert report.links == 2
    with torch.no_grad():
        assert _rel(gm(x), ref) <= 1e-5
    assert all(v != 4.0 for v in _clips(gm).values())


@pytest.mark.parametrize("qmax", [127, 7])
def test_utilisation_rises_as_reported(qmax):
    x = _x()
    gm = _graph(_small(), x)
    before = _noise(gm, x, qmax)
    report = align_pow2(gm, batches=[(x,)], weight_qmax=qmax, act_qmax=qmax)
    after = _noise(gm, x, qmax)
    assert set(after) == set(before)
    assert sum(after.values()) < sum(before.values())
    reported = {k: v for row in report.rows for k, v in row["u_after"].items()}
    assert set(reported) == set(after)  # the conv outputs are fused into their ReLU6: no grid of their own
    for name, u in reported.items():  # the measured ranges landed where predicted (under the boundary)
        assert after[name] == pytest.approx(u ** -2, rel=1e-3)


def test_mobilenet_v2_exact_residual_streams_included():
    x = _x(4, 32)
    gm = _graph(torchvision_model("mobilenet_v2", size=32), x)
    with torch.no_grad():
        ref = gm(x)
    clips = _clips(gm)
    report = align_pow2(gm, batches=[(x,)])
    with torch.no_grad():
        assert _rel(gm(x), ref) <= 1e-4  # random-init nets amplify float rounding
    assert sum(1 for k, v in _clips(gm).items() if v != clips[k]) >= 30  # most ReLU6 moved
    assert any(len(row["producers"]) > 1 for row in report.rows)  # a residual stream: one scalar, several writers
    assert report.gain_db > 0


def test_quantized_sqnr_not_worse_and_export_exact(tmp_path):
    x = _x(32)
    gm = capture(_small().eval(), (x[:8],))
    calib = [x[i:i + 8] for i in range(0, 32, 8)]
    with torch.no_grad():
        ref = gm(x)
    sqnr = {}
    for align in (False, True):
        config = presets.get("int8_pow2").replace(
            algorithms=[{"name": "cle", "relu6": "keep", "pow2_align": align}])
        quantizer = ModelQuantizer(config)
        qmodel = quantizer.quantize_model(gm, calib)
        with torch.no_grad():
            sqnr[align] = check.sqnr_db(ref, qmodel(x))
    summary = qmodel.meta["qb_algorithms"][0].summary
    assert "pow2 alignment: 2 groups" in summary
    assert sqnr[True] >= sqnr[False], sqnr
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (calib[0],), tmp_path / "model.onnx")
    assert check.compare(path, frozen, calib, float_model=gm).max_lsb_err == 0


def test_refuses_bad_arguments():
    x = _x(2)
    gm = _graph(_small(), x)
    with pytest.raises(ConfigError, match="batches"):
        align_pow2(gm, batches=[])
    with pytest.raises(ConfigError, match="weight_qmax"):
        align_pow2(gm, batches=[(x,)], weight_qmax=0)
    with pytest.raises(ConfigError, match="rounds"):
        align_pow2(gm, batches=[(x,)], rounds=-1)
