"""QAT that cannot silently diverge: LSQ steps stay positive under an aggressive optimizer, and a
NaN / inf quantizer parameter stops training, freeze and export at once with the quantizer named.

The reported failure: LSQ QAT of a MobileNetV3-style model with plain SGD (momentum 0.9) drove a
step through zero and then to NaN, and export crashed far away with ``ValueError: cannot convert
float NaN to integer``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantbench.engine import ModelQuantizer, NonFiniteError, capture, export_onnx, presets, qat
from quantbench.engine.fake_quant import LSQFakeQuantize, TQTFakeQuantize
from quantbench.engine.finite import QuantizerGuard, check_finite_quantizers
from quantbench.engine.learnable import lsq_min_step
from quantbench.engine.modes import fake_quantizers
from quantbench.engine.qdq import quantize
from quantbench.training.config import QatConfig
from quantbench.training.recipes import train_qat

torch.set_num_threads(1)

NODE = "activation_fq_conv2d_3"  # the SE block's expand conv: its output feeds the hardsigmoid
LABEL = "conv2d_3"


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduce: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduce, 1)
        self.fc2 = nn.Conv2d(channels // reduce, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))
        return x * F.hardsigmoid(self.fc2(s))


class TinyMobileNetV3(nn.Module):
    """Stem conv-bn-hardswish, depthwise conv-bn-hardswish, squeeze-excite, pointwise conv-bn, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16)
        self.pw, self.bn2 = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.bn0(self.stem(x)))
        x = self.se(F.hardswish(self.bn1(self.dw(x))))
        return self.fc(self.bn2(self.pw(x)).mean((2, 3)))


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def gm() -> fx.GraphModule:
    torch.manual_seed(0)
    model = TinyMobileNetV3().train()
    with torch.no_grad():  # BN statistics as a trained network would have them
        for x in _batches(3, seed=10):
            model(x)
    return capture(model.eval(), (torch.randn(2, 3, 16, 16),))


def _quantize(gm: fx.GraphModule, preset: str = "qat_lsq") -> tuple[ModelQuantizer, fx.GraphModule]:
    quantizer = ModelQuantizer(presets.get(preset))
    return quantizer, quantizer.quantize_model(gm, _batches(2, seed=1))


def _lsq_steps(qmodel: fx.GraphModule) -> list[torch.Tensor]:
    return [m.scale.detach() for m in fake_quantizers(qmodel) if isinstance(m, LSQFakeQuantize)]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- positive steps under an aggressive optimizer -------------------------------------------------
def test_aggressive_sgd_keeps_lsq_steps_positive_then_freezes_and_exports(gm, tmp_path):
    quantizer, qmodel = _quantize(gm)
    opt = torch.optim.SGD(qmodel.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    crossed = 0
    qmodel.train()
    for x in _batches(6, seed=2):
        loss = F.cross_entropy(qmodel(x), torch.randint(0, 10, (16,), generator=g))
        steps = _lsq_steps(qmodel)  # as this forward quantized with them
        assert all(torch.isfinite(s).all() and (s >= lsq_min_step()).all() for s in steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        crossed += sum(int((s <= 0).sum()) for s in _lsq_steps(qmodel))
    assert crossed > 0, "the optimizer never pushed a step through zero: the test lost its point"
    qmodel.eval()
    for m in fake_quantizers(qmodel):
        scale = m.qparams()[0]
        assert torch.isfinite(scale).all() and (scale > 0).all(), m.name
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        sim = qmodel(x)
        frozen = quantizer.freeze(qmodel)
        real = frozen(x)
    out_scale = float(qmodel.get_submodule("activation_fq_linear").qparams()[0])
    assert (sim - real).abs().max().item() <= out_scale * 1.0001  # <= 1 LSB: freeze uses the step training used
    assert export_onnx(frozen, (x[:2],), tmp_path / "robust.onnx").exists()


def test_projection_never_changes_the_output(gm):
    _, qmodel = _quantize(gm)
    fq = qmodel.get_submodule(NODE)
    x = torch.randn(8, 3, 16, 16)
    qmodel.train()
    qat.set_bn_frozen(qmodel, True)  # two forwards see the same BN statistics
    with torch.no_grad():
        before = qmodel(x)
        fq.scale.copy_(-fq.scale)  # where an optimizer step may leave it
        torch.testing.assert_close(qmodel(x), before, rtol=0, atol=0)
        assert fq.scale.item() > 0  # projected onto |scale|, the step the forward used
        fq.scale.fill_(0.0)
        qmodel(x)
        assert fq.scale.item() == pytest.approx(lsq_min_step(), rel=1e-6)
    qmodel.eval()


# -- NaN / inf stop training at once, naming the quantizer ----------------------------------------
class _Objective:
    """Cross-entropy; after the forward of step ``poison_at`` it writes NaN into the quantizer ``NODE``
    (the loss of that step is still finite: only the quantizer check can see it)."""

    def __init__(self, poison_at: int | None = None) -> None:
        self.poison_at, self.calls = poison_at, 0

    def __call__(self, net, batch, device):
        x, y = batch
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        if self.calls == self.poison_at:  # behind autograd's back: without the check the step would go on
            net.get_submodule(NODE).scale.data.fill_(math.nan)
        self.calls += 1
        return loss, {"loss": float(loss.detach()) * len(y), "n": len(y)}

    def summarize(self, sums):
        return {"loss": sums["loss"] / max(sums["n"], 1)}


def _train(qmodel: fx.GraphModule, objective: _Objective, steps: int = 3):
    g = torch.Generator().manual_seed(4)
    loader = [(x, torch.randint(0, 10, (16,), generator=g)) for x in _batches(steps, seed=5)]
    cfg = QatConfig(steps=steps, optimizer="sgd", lr=1e-3, quant_lr=1e-3, momentum=0.9, weight_decay=0.0,
                    scheduler="constant", keep_best="none")
    return train_qat(qmodel, loader, cfg, objective=objective, validate=lambda m: {"score": 0.0},
                     monitor="score", device=torch.device("cpu"))


def test_fit_stops_when_a_step_turns_nan_although_the_loss_is_finite(gm):
    _, qmodel = _quantize(gm)
    with pytest.raises(NonFiniteError) as exc:
        _train(qmodel, _Objective(poison_at=1))
    message = _one_line(exc)
    assert message.startswith(f"qat step 1: quantizer {NODE} ({LABEL}) has a NaN scale;")
    assert "train.qat.quant_lr" in message and "grad_clip" in message


def test_fit_names_the_quantizer_behind_a_nan_loss(gm):
    _, qmodel = _quantize(gm)
    with torch.no_grad():
        qmodel.get_submodule(NODE).scale.fill_(math.nan)
    with pytest.raises(NonFiniteError, match=rf"^qat step 0: quantizer {NODE} \({LABEL}\) has a NaN scale;"):
        _train(qmodel, _Objective())


def test_a_healthy_fit_passes_the_checks(gm):
    _, qmodel = _quantize(gm)
    result = _train(qmodel, _Objective(), steps=2)
    assert len(result.history) == 1 and all(torch.isfinite(s).all() for s in _lsq_steps(qmodel))


def test_guard_names_the_first_bad_quantizer_and_its_tensor(gm):
    _, qmodel = _quantize(gm, "qat_tqt")
    guard = QuantizerGuard(qmodel)
    guard.check("clean")  # nothing to report
    assert bool(guard.finite())
    tqt = qmodel.get_submodule(NODE)
    assert isinstance(tqt, TQTFakeQuantize)
    with torch.no_grad():
        tqt.log2_t.fill_(math.inf)
    assert not bool(guard.finite())
    with pytest.raises(NonFiniteError, match=rf"^here: quantizer {NODE} \({LABEL}\) has an inf log2_t; "
                                             "the quantizer parameters diverged: lower the learning rate"):
        guard.check("here")
    with torch.no_grad():
        tqt.log2_t.fill_(1000.0)  # finite, but 2^ceil(log2_t) overflows float32: only the effective scale shows it
    guard.check("own tensors only")
    with pytest.raises(NonFiniteError, match=rf"quantizer {NODE} \({LABEL}\) has an inf scale"):
        guard.check("here", scales=True)


def test_per_channel_nan_is_counted(gm):
    _, qmodel = _quantize(gm)
    with torch.no_grad():
        qmodel.get_submodule("weight_fq_dw_weight_folded").scale[:3] = math.nan
    with pytest.raises(NonFiniteError, match=r"weight_fq_dw_weight_folded \(dw_weight_folded\) has NaN in 3 of 16 "
                                             r"channels of its scale"):
        check_finite_quantizers(qmodel, "check")


# -- freeze and export refuse non-finite scales -----------------------------------------------------
def test_freeze_refuses_a_nan_scale(gm):
    quantizer, qmodel = _quantize(gm)
    with torch.no_grad():
        qmodel.get_submodule(NODE).scale.fill_(math.nan)
    with pytest.raises(NonFiniteError) as exc:
        quantizer.freeze(qmodel)
    assert _one_line(exc).startswith(f"freeze: quantizer {NODE} ({LABEL}) has a NaN scale; the QAT run")


def test_export_refuses_a_nan_scale_baked_into_a_frozen_graph(gm, tmp_path):
    quantizer, qmodel = _quantize(gm)
    x = torch.randn(2, 3, 16, 16)
    frozen = quantizer.freeze(qmodel)
    q = next(n for n in frozen.graph.nodes if n.target is quantize)  # a per-tensor Q call
    q.update_arg(1, math.nan)
    with pytest.raises(NonFiniteError) as exc:
        export_onnx(frozen, (x,), tmp_path / "nan.onnx")
    assert _one_line(exc).startswith(f"export_onnx: node '{q.name}' (of {q.args[0].name}) has a NaN scale baked in;")
    assert not (tmp_path / "nan.onnx").exists()

    frozen = quantizer.freeze(qmodel)  # a per-channel weight scale, read by a fused integer kernel
    frozen.get_buffer("weight_fq_se_fc2_weight_scale").fill_(math.inf)
    with pytest.raises(NonFiniteError, match=r"^export_onnx: node '\w+' has inf in 16 of 16 channels of its scale "
                                             r"\(weight_fq_se_fc2_weight_scale\) baked in;"):
        export_onnx(frozen, (x,), tmp_path / "inf.onnx")


def test_qat_eval_forward_leaves_the_parameters_alone(gm):
    _, qmodel = _quantize(gm)
    fq = qmodel.get_submodule(NODE)
    with torch.no_grad():
        fq.scale.copy_(-fq.scale)
        qat.eval_mode(qmodel)
        qmodel(torch.randn(2, 3, 16, 16))
    assert fq.scale.item() < 0  # only training projects; evaluation and freeze read |scale|
