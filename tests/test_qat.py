"""QAT in the engine: presets, the prepared graph, train/eval switches, freeze points,
gradients everywhere, and QAT -> freeze -> ONNX exactness.

The autograd functions' gradient formulas are checked in test_learnable.py; here
the whole graph is trained.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from quantbench.engine import (
    ModelQuantizer,
    QuantizationSpec,
    SpecError,
    capture,
    check,
    export_onnx,
    presets,
    qat,
)
from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import op_name
from quantbench.engine.modes import fake_quantizers

torch.set_num_threads(1)

QAT_PRESETS = ["qat_pow2", "qat_float", "qat_lsq", "qat_tqt", "w4a8_lsq", "w4a8_tqt"]


class TinyQAT(nn.Module):
    """conv-bn-relu; conv-bn + residual add + relu; conv(bias)-relu without BN (a live int32
    bias in training); cat; max pool; dropout; linear."""

    def __init__(self, conv_bias: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.c1(x)))
        b = F.relu(self.bn2(self.c2(a)) + a)
        c = F.relu(self.c3(b))
        z = F.max_pool2d(torch.cat([b, c], dim=1), 2)
        return self.fc(self.drop(z.flatten(1)))


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 8, 8, generator=g) for _ in range(n)]


def _gm(conv_bias: bool = False) -> fx.GraphModule:
    torch.manual_seed(0)
    model = TinyQAT(conv_bias)
    model.train()
    with torch.no_grad():  # BN statistics as a trained network would have them
        for x in _data(4, seed=10):
            model(x)
    return capture(model.eval(), (torch.randn(2, 2, 8, 8),))


@pytest.fixture(scope="module")
def gm() -> fx.GraphModule:
    return _gm()


def _quantize(gm: fx.GraphModule, preset: str, calib=None, **kwargs):
    quantizer = ModelQuantizer(presets.get(preset))
    return quantizer, quantizer.quantize_model(gm, _data(2, seed=1) if calib is None else calib, **kwargs)


def _train(qmodel: fx.GraphModule, steps: int = 3, lr: float = 0.05) -> None:
    opt = torch.optim.SGD([{"params": qat.weight_parameters(qmodel)},
                           {"params": qat.quantizer_parameters(qmodel), "lr": lr / 10}], lr=lr)
    g = torch.Generator().manual_seed(3)
    qmodel.train()
    for x in _data(steps, seed=2):
        loss = F.cross_entropy(qmodel(x), torch.randint(0, 5, (x.shape[0],), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    qmodel.eval()


def _nodes(qmodel: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in qmodel.graph.nodes if op_name(n) == name]


def _module(qmodel: fx.GraphModule, node) -> nn.Module | None:
    return qmodel.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def _output_scale(qmodel: fx.GraphModule) -> float:
    out = next(n for n in qmodel.graph.nodes if n.op == "output").args[0][0]
    return float(_module(qmodel, out).qparams()[0])


# -- presets -------------------------------------------------------------------------------------
def test_qat_presets():
    for name in QAT_PRESETS:
        config = presets.get(name)
        assert config.qat and config.for_training, name
        assert config.learnable == any(m in name for m in ("lsq", "tqt")), name
    assert presets.get("w4a8_tqt").global_quant_config.weight.dtype == "int4"
    assert presets.get("w4a8_lsq").global_quant_config.weight.per_channel
    assert presets.get("qat_pow2").global_quant_config.input_tensors.scale_type == "pow2"
    assert not presets.get("int8_pow2").for_training
    for bad in ({"learnable": "tqt", "scale_type": "float"}, {"learnable": "lsq", "scale_type": "pow2"}):
        with pytest.raises(SpecError, match="learnable"):
            QuantizationSpec(**bad)


# -- the prepared graph --------------------------------------------------------------------------
def test_qat_graph_keeps_bn_with_folded_weight_and_bias_quantizers(gm):
    quantizer, qmodel = _quantize(gm, "qat_lsq")
    assert quantizer.coverage(qmodel).float_nodes == []
    outs = _nodes(qmodel, "bn_qat_output")
    assert len(outs) == 2 and not _nodes(qmodel, "batch_norm") and len(_nodes(qmodel, "dropout")) == 1
    for out in outs:
        conv = out.args[0]
        assert op_name(conv) == "conv2d" and list(conv.users) == [out]  # the conv output is never quantized
        w_fq, b_fq = _module(qmodel, conv.args[1]), _module(qmodel, conv.args[2])
        assert w_fq.role == "weight" and op_name(conv.args[1].args[0]) == "bn_fold_weight"
        assert isinstance(b_fq, DerivedBiasFakeQuantize) and op_name(conv.args[2].args[0]) == "bn_fold_bias"
        assert out.args[9] is conv.args[2]  # training subtracts the same quantized folded bias
        assert b_fq.sources[1] is w_fq
    # The fold is exact in float: with fake quant off the QAT graph is the float model.
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad(), qat.disable_fake_quant(qmodel):
        torch.testing.assert_close(qmodel(x), gm(x), rtol=1e-5, atol=1e-5)


def test_ptq_path_unchanged_and_qat_override(gm):
    _, ptq = _quantize(gm, "int8_pow2")
    assert not _nodes(ptq, "bn_qat_output") and not _nodes(ptq, "dropout") and not _nodes(ptq, "batch_norm")
    _, folded = _quantize(gm, "qat_lsq", qat=False)
    assert not _nodes(folded, "bn_qat_output")
    _, kept = _quantize(gm, "int8_pow2", qat=True)
    assert len(_nodes(kept, "bn_qat_output")) == 2


# -- modes ---------------------------------------------------------------------------------------
def _flags(qmodel):
    return ([n.args[5] for n in _nodes(qmodel, "bn_qat_output")]
            + [n.args[6] for n in _nodes(qmodel, "bn_fold_bias")] + [n.args[2] for n in _nodes(qmodel, "dropout")])


def test_train_eval_switch_bn_dropout_and_observers(gm):
    _, qmodel = _quantize(gm, "qat_pow2")
    assert not qat.is_training(qmodel) and not any(_flags(qmodel))
    qmodel.train()
    assert qat.is_training(qmodel) and qmodel.training and all(_flags(qmodel))
    assert all(m.observer_enabled for m in fake_quantizers(qmodel))  # static QAT: scales follow the data
    running = qmodel.get_buffer(_nodes(qmodel, "bn_qat_output")[0].args[3].target)
    before = running.clone()
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        a, b = qmodel(x), qmodel(x)
    assert not torch.equal(running, before)  # batch statistics update the running ones
    assert not torch.equal(a, b)  # dropout is active
    qmodel.eval()
    assert not qmodel.training and not any(_flags(qmodel))
    assert not any(m.observer_enabled for m in fake_quantizers(qmodel))
    frozen_stats = running.clone()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), qmodel(x), rtol=0, atol=0)
    assert torch.equal(running, frozen_stats)
    copied = copy.deepcopy(qmodel).train()  # the copy keeps working train()/eval()
    assert all(_flags(copied)) and not any(_flags(qmodel))


def test_learnable_quantizers_never_observe_in_training(gm):
    _, qmodel = _quantize(gm, "qat_tqt")
    qat.train_mode(qmodel)
    assert not any(m.observer_enabled for m in fake_quantizers(qmodel))
    qat.eval_mode(qmodel)


def test_bn_freeze(gm):
    _, qmodel = _quantize(gm, "qat_lsq")
    running = qmodel.get_buffer(_nodes(qmodel, "bn_qat_output")[0].args[4].target)
    x = torch.randn(8, 2, 8, 8)
    qmodel.train()
    with qat.freeze_bn(qmodel):
        before = running.clone()
        qmodel(x)
        assert torch.equal(running, before) and not any(_flags(qmodel)[:4])
    assert all(_flags(qmodel))  # restored on exit
    qat.set_bn_frozen(qmodel, True)
    qmodel.eval()
    qmodel.train()  # a later train() keeps BN frozen
    before = running.clone()
    qmodel(x)
    assert torch.equal(running, before)
    qat.set_bn_frozen(qmodel, False)
    qmodel(x)
    assert not torch.equal(running, before)


def test_observer_freeze_is_permanent_and_respected_by_train_mode(gm):
    _, qmodel = _quantize(gm, "qat_pow2")
    weight_fq = _module(qmodel, _nodes(qmodel, "bn_qat_output")[0].args[0].args[1])
    weight = qmodel.get_parameter(_nodes(qmodel, "bn_fold_weight")[0].args[0].target)
    x = torch.randn(8, 2, 8, 8)
    initial = weight_fq.scale.clone()
    qmodel.train()
    with torch.no_grad():
        weight.mul_(4.0)
    qmodel(x)
    grown = weight_fq.scale.clone()
    assert grown > 2 * initial  # the weight observer follows the (folded) weight every step
    qat.set_observers_frozen(qmodel)  # the recipe's observer-freeze point
    assert not hasattr(qat, "set_observers"), "one observer switch"
    qmodel.eval()
    qmodel.train()
    assert not any(m.observer_enabled for m in fake_quantizers(qmodel))
    with torch.no_grad():
        weight.mul_(4.0)
    qmodel(x)
    assert torch.equal(weight_fq.scale, grown)
    qat.set_observers_frozen(qmodel, False)
    with qat.freeze_observers(qmodel):
        assert not any(m.observer_enabled for m in fake_quantizers(qmodel))
    assert all(m.observer_enabled for m in fake_quantizers(qmodel))


def test_disable_fake_quant_restores(gm):
    _, qmodel = _quantize(gm, "qat_tqt")
    with qat.disable_fake_quant(qmodel):
        assert not any(m.fake_quant_enabled for m in fake_quantizers(qmodel))
    assert all(m.fake_quant_enabled for m in fake_quantizers(qmodel))


# -- parameters and gradients --------------------------------------------------------------------
def test_parameter_groups_are_disjoint_and_complete(gm):
    _, qmodel = _quantize(gm, "qat_lsq")
    quant, weights = qat.quantizer_parameters(qmodel), qat.weight_parameters(qmodel)
    ids_q, ids_w = {id(p) for p in quant}, {id(p) for p in weights}
    assert not ids_q & ids_w
    assert ids_q | ids_w == {id(p) for p in qmodel.parameters() if p.requires_grad}
    learnable = [m for m in qmodel.modules() if isinstance(m, FakeQuantizeBase) and m.spec.learnable == "lsq"]
    assert len(quant) == len(learnable) > 0
    _, static = _quantize(gm, "qat_pow2")
    assert qat.quantizer_parameters(static) == []


def _assert_all_grads(qmodel: fx.GraphModule) -> None:
    for name, p in qmodel.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: all-zero gradient"


@pytest.mark.parametrize("preset", ["qat_lsq", "qat_tqt", "w4a8_lsq", "w4a8_tqt"])
def test_gradients_reach_every_parameter(gm, preset):
    _, qmodel = _quantize(gm, preset)
    qmodel.train()
    x = torch.randn(16, 2, 8, 8)
    F.cross_entropy(qmodel(x), torch.arange(16) % 5).backward()
    _assert_all_grads(qmodel)


@pytest.mark.parametrize("preset", ["qat_lsq", "qat_tqt"])
def test_gradients_with_frozen_bn_reach_conv_biases(preset):
    # With batch-statistics BN a conv bias before BN has exactly zero gradient (BN removes
    # it); with BN frozen the folded int32 bias is live and trains b, gamma and beta.
    _, qmodel = _quantize(_gm(conv_bias=True), preset)
    qmodel.train()
    qat.set_bn_frozen(qmodel, True)
    F.cross_entropy(qmodel(torch.randn(16, 2, 8, 8)), torch.arange(16) % 5).backward()
    _assert_all_grads(qmodel)


def test_optimizer_built_before_the_first_batch_trains_the_quantizers(gm):
    # No calibration: LSQ activation steps are initialised on the first batch, in place.
    _, qmodel = _quantize(gm, "qat_lsq", calib=[])
    quant = qat.quantizer_parameters(qmodel)
    before = [p.detach().clone() for p in quant]
    _train(qmodel, steps=2)
    assert [id(p) for p in qat.quantizer_parameters(qmodel)] == [id(p) for p in quant]
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, quant))


# -- QAT -> freeze -> ONNX -----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["qat_pow2", "qat_float", "qat_lsq", "qat_tqt", "w4a8_tqt"])
def test_trained_qat_model_freezes_and_exports_exactly(gm, preset, tmp_path):
    quantizer, qmodel = _quantize(gm, preset)
    _train(qmodel)
    x = torch.randn(64, 2, 8, 8)
    with torch.no_grad():
        sim = qmodel(x)
        frozen = quantizer.freeze(qmodel)
        real = frozen(x)
    assert not _nodes(frozen, "bn_qat_output") and not _nodes(frozen, "dropout")
    assert (sim - real).abs().max().item() <= _output_scale(qmodel) * 1.0001  # <= 1 LSB
    qmodel.train()  # freezing in train mode gives the same graph: BN folds with running statistics
    with torch.no_grad():
        torch.testing.assert_close(quantizer.freeze(qmodel)(x), real, rtol=0, atol=0)
    qmodel.eval()
    path = export_onnx(frozen, (x[:2],), tmp_path / f"{preset}.onnx")
    report = check.compare(path, frozen, [x], float_model=gm)
    assert report.max_lsb_err <= 1.0 and report.top1_agreement == 100.0, report


def test_state_dict_round_trip(gm):
    quantizer, qmodel = _quantize(gm, "qat_tqt")
    _train(qmodel)
    _, fresh = _quantize(gm, "qat_tqt")
    fresh.load_state_dict(qmodel.state_dict())
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qmodel(x), rtol=0, atol=0)


def test_static_activation_scales_follow_training_data(gm):
    _, qmodel = _quantize(gm, "qat_float")
    act = next(m for m in fake_quantizers(qmodel) if m.role == "activation" and isinstance(m, FakeQuantize))
    before = act.scale.clone()
    qmodel.train()
    with torch.no_grad():
        qmodel(torch.randn(16, 2, 8, 8) * 3)
    assert not torch.equal(act.scale, before)


@pytest.mark.gpu
def test_qat_on_cuda_matches_cpu(gm):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    quantizer, cpu = _quantize(gm, "qat_tqt")
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(16, 2, 8, 8)
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        F.cross_entropy(model(x.to(dev)), (torch.arange(16) % 5).to(dev)).backward()
        model.eval()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():
        frozen = quantizer.freeze(gpu)
        torch.testing.assert_close(frozen(x.cuda()).cpu(), quantizer.freeze(cpu)(x), rtol=0, atol=1e-6)
