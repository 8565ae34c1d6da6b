"""Layer sensitivity and mixed-precision bit allocation (quantbench.engine.ptq.sensitivity / .mixed).

Small random-init networks with BN statistics re-estimated (tests/engine_models.py), 16x16 inputs,
two batches: the whole file runs in seconds on two cores. ``Net`` has the patterns whose quantizers
need an owner (fused relu, residual add, cat, max pool); ``Plain`` is a conv-bn-relu stack whose
layers differ in size, for the allocation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from engine_models import TinyViT, batches, reestimate_bn, torchvision_model
from torch import nn

from quantbench.engine import Config, ModelQuantizer, SpecError, capture, check, export_onnx, presets
from quantbench.engine.fake_quant import FakeQuantizeBase
from quantbench.engine.ops import op_kind
from quantbench.engine.ptq.mixed import BitAllocation, allocate_bits, mixed_precision_config
from quantbench.engine.ptq.sensitivity import (
    find_layers,
    layer_sensitivity,
    output_sqnr_db,
    quantizer_state,
    sensitivity_table,
)

SHAPE = (4, 3, 16, 16)
PLAIN_SHAPE = (16, 3, 16, 16)


class Net(nn.Module):
    """conv-bn-relu stem, a residual block (add + relu), two 1x1 branches into a cat, max pool, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))
        return self.fc(x.mean((2, 3)))


class Plain(nn.Module):
    """Five conv-bn-relu (two with stride 2), a global mean and a linear."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 16, 32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=2 if i in (1, 3) else 1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _plain(outlier: bool = False) -> nn.Module:
    """``Plain``; with ``outlier``, the second conv's output channel 0 is 30x larger and the next conv's input
    channel 0 30x smaller: the same function (ReLU commutes with a positive scale), but one channel sets the
    second conv's per-tensor weight grid and its output quantizer's range."""
    torch.manual_seed(0)
    model = reestimate_bn(Plain(), PLAIN_SHAPE)
    if outlier:
        with torch.no_grad():
            bn, nxt = model.features[4], model.features[6]
            bn.weight[0] *= 30
            bn.bias[0] *= 30
            nxt.weight[:, 0] /= 30
    return model


def _per_tensor(name: str) -> Config:
    cfg = presets.get(name)
    qc = cfg.global_quant_config
    return cfg.replace(global_quant_config=qc.replace(weight=qc.weight.replace(qscheme="per_tensor")))


def _int8_weights(cfg: Config) -> Config:
    qc = cfg.global_quant_config
    return cfg.replace(global_quant_config=qc.replace(weight=qc.weight.replace(dtype="int8")))


def _flags(qmodel) -> dict[str, tuple[bool, bool]]:
    return {n: (m.observer_enabled, m.fake_quant_enabled) for n, m in qmodel.named_modules()
            if isinstance(m, FakeQuantizeBase)}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = reestimate_bn(Net(), SHAPE)
    calib = batches(2, SHAPE, 1)
    gm = capture(model, (calib[0],))
    return gm, calib, batches(2, SHAPE, 2)


@pytest.fixture(scope="module")
def q4(net):
    gm, calib, _ = net
    return ModelQuantizer(presets.get("w4a8_float")).quantize_model(gm, calib)


def test_layers_and_their_quantizers(net, q4):
    gm, _, _ = net
    layers = {lay.node: lay for lay in find_layers(q4)}
    weighted = [n.name for n in q4.graph.nodes if op_kind(n) == "weighted"]
    assert list(layers) == weighted and len(weighted) == 7
    captured = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    assert set(layers) <= captured  # the names a Config may use
    for lay in layers.values():
        assert q4.get_submodule(lay.weight).role == "weight" and lay.weight_bits == 4 and lay.act_bits == 8
        assert lay.bias is not None and len(lay.outputs) >= 1
    by_param = {lay.weight: lay for lay in layers.values()}
    stem = next(lay for w, lay in by_param.items() if "stem" in w)
    assert stem.params == 8 * 3 * 9 and stem.macs == 16 * 16 * 8 * 27
    # conv -> relu: the quantizer after the relu (shared with nothing else) is the conv's
    assert stem.outputs == ["activation_fq_relu"]
    # conv2 feeds the residual add: its own output quantizer, not the add's
    conv2 = next(lay for w, lay in by_param.items() if "conv2" in w)
    assert len(conv2.outputs) == 1 and "add" not in conv2.outputs[0]
    # two 1x1 convs into a cat share the cat's module: it belongs to both
    left = next(lay for w, lay in by_param.items() if "left" in w)
    right = next(lay for w, lay in by_param.items() if "right" in w)
    assert left.outputs == right.outputs and "cat" in left.outputs[0]
    assert left.quantizers(weights_only=True) == [left.weight, left.bias]


def test_rows_cover_every_weighted_layer_of_resnet18():
    model = torchvision_model("resnet18", size=32)
    calib = batches(1, (2, 3, 32, 32), 1)
    gm = capture(model, (calib[0],))
    qmodel = ModelQuantizer(presets.get("w4a8_float")).quantize_model(gm, calib)
    rows = layer_sensitivity(qmodel, calib)
    weighted = {n.name for n in qmodel.graph.nodes if op_kind(n) == "weighted"}
    assert {r.node for r in rows} == weighted and len(rows) == 21
    assert weighted <= {n.name for n in gm.graph.nodes if n.op == "call_function"}
    assert [r.only_sqnr_db for r in rows] == sorted(r.only_sqnr_db for r in rows)
    assert all(math.isfinite(r.only_sqnr_db) and math.isfinite(r.all_but_sqnr_db) for r in rows)


def test_toggling_restores_every_flag(net, q4):
    _, calib, _ = net
    some = next(n for n, m in q4.named_modules() if isinstance(m, FakeQuantizeBase) and m.role == "activation")
    q4.get_submodule(some).fake_quant_enabled = False  # a state that is not "all on"
    q4.get_submodule(some).observer_enabled = True
    try:
        before = _flags(q4)
        rows = layer_sensitivity(q4, calib, weights_only=True)
        assert _flags(q4) == before
        assert all(len(r.quantizers) == 2 for r in rows)

        def broken(predict):
            predict(calib[0])
            raise RuntimeError("metric failed")

        with pytest.raises(RuntimeError, match="metric failed"):
            layer_sensitivity(q4, calib, metric=broken)
        assert _flags(q4) == before
        with pytest.raises(ValueError), quantizer_state(q4, only=()):
            assert not any(fq for _, fq in _flags(q4).values())
            raise ValueError
        assert _flags(q4) == before
        with pytest.raises(SpecError, match="unknown quantizer module"):
            with quantizer_state(q4, off=["weight_fq_nope"]):
                pass
        assert _flags(q4) == before
    finally:
        q4.get_submodule(some).fake_quant_enabled = True
        q4.get_submodule(some).observer_enabled = False


@pytest.fixture(scope="module")
def plain():
    calib = batches(2, PLAIN_SHAPE, 1)
    gm = capture(_plain(), (calib[0],))
    return gm, calib, batches(2, PLAIN_SHAPE, 2), ModelQuantizer(presets.get("w4a8_float")).quantize_model(gm, calib)


def test_the_layer_with_an_outlier_ranks_first():
    calib = batches(2, PLAIN_SHAPE, 1)
    model = _plain(outlier=True)
    assert torch.allclose(model(calib[0]), _plain()(calib[0]), atol=1e-5)  # the same function
    cfg = _per_tensor("w4a8_float")  # one scale per weight tensor
    only = {}
    for outlier in (False, True):
        gm = capture(_plain(outlier), (calib[0],))
        qmodel = ModelQuantizer(cfg).quantize_model(gm, calib)
        rows = layer_sensitivity(qmodel, calib, metric=lambda predict: float(predict(calib[0]).abs().mean()))
        assert all(r.only_metric is not None and r.all_but_metric is not None for r in rows)
        only[outlier] = {r.node: r.only_sqnr_db for r in rows}
    assert "features_3" in rows[0].quantizers[0], sensitivity_table(rows)
    assert rows[0].only_sqnr_db < rows[1].only_sqnr_db - 6
    assert only[True][rows[0].node] < only[False][rows[0].node] - 10
    assert rows[0].all_but_sqnr_db == max(r.all_but_sqnr_db for r in rows)
    table = sensitivity_table(rows)
    assert table.count("\n") == len(rows) + 2 and "only metric" in table and f"`{rows[0].node}`" in table
    alloc = allocate_bits(qmodel, calib, budget=0.55)
    assert rows[0].node in alloc.promoted
    assert max(alloc.rows, key=lambda r: r["noise"])["node"] == rows[0].node


@pytest.mark.parametrize("cost", ["size", "bops"])
@pytest.mark.parametrize("method", ["knapsack", "greedy"])
def test_allocation_respects_the_budget(plain, cost, method):
    _, calib, _, q4 = plain
    layers = find_layers(q4)
    for budget in (0.5, 0.6, 0.75, 1.0):
        alloc = allocate_bits(q4, calib, budget=budget, cost=cost, method=method)
        assert alloc.cost <= alloc.budget * (1 + 1e-12) and alloc.fraction <= budget + 1e-12
        assert set(alloc.bits) == {lay.node for lay in layers} and set(alloc.bits.values()) <= {4, 8}
        if cost == "size":
            assert alloc.reference_cost == 8 * sum(lay.params for lay in layers)
        else:
            assert alloc.reference_cost == 8 * 8 * sum(lay.macs for lay in layers)
        if budget == 0.5:
            assert alloc.promoted == [] and alloc.fraction == 0.5
        if budget == 1.0:
            assert len(alloc.promoted) == len(layers)
        assert [r["node"] for r in alloc.rows] == [lay.node for lay in layers]
        assert abs(sum(r["noise_share"] for r in alloc.rows) - 1) < 1e-9
    with pytest.raises(SpecError, match="below the cost"):
        allocate_bits(q4, calib, budget=0.4, cost=cost, method=method)


def test_bad_allocation_arguments(q4, net):
    gm, calib, _ = net
    with pytest.raises(SpecError, match="cost="):
        allocate_bits(q4, calib, cost="latency")
    with pytest.raises(SpecError, match="high_bits"):
        allocate_bits(q4, calib, low_bits=8, high_bits=4)
    with pytest.raises(SpecError, match="low_bits=2"):
        allocate_bits(q4, calib, low_bits=2)
    with pytest.raises(SpecError, match="weighted layer"):
        layer_sensitivity(q4, calib, layers=["conv2d_99"])
    alloc = BitAllocation(bits={"conv2d_99": 8}, cost=0, budget=0, reference_cost=1,
                          rows=[{"node": "conv2d_99", "op": "conv2d", "bits": 8}])
    with pytest.raises(SpecError, match="node name"):
        mixed_precision_config(presets.get("w4a8_float"), alloc, gm=gm)


@pytest.mark.parametrize("method", ["knapsack", "greedy"])
def test_a_larger_budget_never_lowers_the_sqnr(plain, method):
    gm, calib, held_out, q4 = plain
    cfg = presets.get("w4a8_float")
    sqnr = {}
    for budget in (0.6, 0.75, 0.9, 1.0):
        alloc = allocate_bits(q4, calib, budget=budget, method=method)
        mixed = mixed_precision_config(cfg, alloc, gm=gm)
        assert set(mixed.node_name_quant_config) == set(alloc.promoted)
        qmodel = ModelQuantizer(mixed).quantize_model(gm, calib)
        for lay in find_layers(qmodel):
            assert lay.weight_bits == alloc.bits[lay.node]
        sqnr[budget] = output_sqnr_db(qmodel, held_out)
    low = output_sqnr_db(q4, held_out)
    high = output_sqnr_db(ModelQuantizer(_int8_weights(cfg)).quantize_model(gm, calib), held_out)
    assert low + 3 < sqnr[0.6] <= sqnr[0.75] <= sqnr[0.9] <= sqnr[1.0] == high, (low, sqnr, high)


def test_the_mixed_model_exports_exactly(plain, tmp_path):
    gm, calib, held_out, q4 = plain
    alloc = allocate_bits(q4, calib, budget=0.7)
    assert 0 < len(alloc.promoted) < len(alloc.rows)
    config = mixed_precision_config(presets.get("w4a8_float"), alloc, gm=gm)
    quantizer = ModelQuantizer(config)
    frozen = quantizer.freeze(quantizer.quantize_model(gm, calib))
    path = export_onnx(frozen, (held_out[0],), tmp_path / "mixed.onnx")
    report = check.compare(path, frozen, held_out)
    assert report.max_lsb_err == 0.0, report


def test_weighted_names_survive_the_prequant_passes():
    """Layer-scale folding rewrites a linear's weight, the cat of the class token takes the patch conv's output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm = capture(TinyViT().eval(), (x,))
    qmodel = ModelQuantizer(presets.get("w4a8_float")).quantize_model(gm, [x])
    layers = find_layers(qmodel)
    assert {lay.node for lay in layers} <= {n.name for n in gm.graph.nodes if n.op == "call_function"}
    embed = next(lay for lay in layers if "embed" in lay.weight)
    assert embed.outputs == ["activation_fq_cat"]
    alloc = allocate_bits(qmodel, [x], budget=1.0)
    mixed = mixed_precision_config(presets.get("w4a8_float"), alloc, gm=gm)
    assert set(mixed.node_name_quant_config) == {lay.node for lay in layers}
    assert all(qc.weight.dtype == "int8" for qc in mixed.node_name_quant_config.values())
