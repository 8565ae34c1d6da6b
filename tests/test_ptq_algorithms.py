"""Advanced PTQ as engine steps: bias correction, AdaRound, block reconstruction (QDrop), mixed precision.

Each is data in a Config (``algorithms``), keeps the exact export, and does what its paper says
on a small residual / depthwise model: AdaRound's weights are the floor or the ceiling of w/s,
bias correction shrinks every corrected layer's mean output error, a fixed seed repeats.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_models import reestimate_bn, torchvision_model
from torch import fx, nn

from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets
from quantbench.engine.errors import CalibrationError, SpecError
from quantbench.engine.graph import get_attr_tensor
from quantbench.engine.modes import disable_fake_quant
from quantbench.engine.onnx_coverage import onnx_float_nodes
from quantbench.engine.ptq.replay import Replay, blocks, weighted_layers
from quantbench.engine.spec import Algorithm

torch.manual_seed(0)


class Tiny(nn.Module):
    """conv-bn-relu -> (depthwise-bn-relu6 -> pointwise-bn) + skip -> relu -> strided conv -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU6(), nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.dw(x) + x)
        x = self.down(x)
        return self.fc(x.mean((2, 3)))


SHAPE = (16, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny():
    model = reestimate_bn(Tiny(), SHAPE).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    return capture(model, (calib[0],)), calib


def _config(preset: str = "int8_float", *algorithms, weight_bits: int = 8, act_bits: int = 8):
    config = presets.get(preset)
    qc = config.global_quant_config
    changes = {}
    if weight_bits == 4:
        changes["weight"] = qc.weight.replace(dtype="int4")
    if act_bits == 4:
        changes["input_tensors"] = qc.input_tensors.replace(dtype="int4")
        changes["output_tensors"] = qc.output_tensors.replace(dtype="int4")
    return config.replace(global_quant_config=qc.replace(**changes), algorithms=algorithms)


def _weights(qmodel: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.nn.Module]]:
    return {layer.name: (get_attr_tensor(qmodel, layer.weight.target).detach().clone(),
                         qmodel.get_submodule(layer.weight_fq.target)) for layer in weighted_layers(qmodel)}


# -- the config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms, message", [
    ([{"name": "adarond"}], "did you mean 'adaround'"),
    ([{"name": "adaround", "iter": 3}], "did you mean 'iters'"),
    ([{"name": "adaround", "iters": 0}], "iters=0 must be a positive int"),
    ([{"name": "brecq", "qdrop": 1.5}], r"qdrop=1.5 must be in \[0, 1\]"),
    (["adaround", "cle"], "'cle' cannot come after 'adaround'"),
    ([{"name": "mixed_precision", "low_bits": 8, "high_bits": 4}], "low_bits=8 must be below"),
    ([{"iters": 3}], "has no 'name'"),
])
def test_bad_algorithms_are_refused_where_written(algorithms, message):
    with pytest.raises(SpecError, match=message):
        presets.get("int8_float").replace(algorithms=algorithms)


def test_algorithms_are_ptq_only_and_parse_from_yaml_shapes():
    with pytest.raises(SpecError, match="post-training steps; a QAT config"):
        presets.get("qat_lsq").replace(algorithms=["adaround"])
    config = presets.get("int8_float").replace(algorithms=["cle", {"name": "adaround", "iters": 5}])
    assert config.algorithms == (Algorithm("cle"), Algorithm("adaround", {"iters": 5}))
    assert config.algorithms[1].get("iters") == 5 and config.algorithms[1].get("lr") > 0


def test_algorithms_need_calibration_data(tiny):
    gm, _ = tiny
    with pytest.raises(CalibrationError, match="need calibration data"):
        ModelQuantizer(_config("int8_float", "bias_correction")).quantize_model(gm, [])


# -- the graph ---------------------------------------------------------------------------------------------


def test_blocks_come_from_the_graph():
    model = torchvision_model("resnet18", size=32)
    gm = capture(model, (torch.randn(2, 3, 32, 32),))
    qmodel = ModelQuantizer(presets.get("int8_float")).quantize_model(gm, [torch.randn(4, 3, 32, 32)])
    layers = [layer.name for layer in weighted_layers(qmodel)]
    found = blocks(qmodel, max_layers=4)
    assert [name for b in found for name in (layer.name for layer in b.layers)] == layers  # each once, in order
    assert all(1 <= len(b.layers) <= 4 for b in found)
    # A basic block (two convs, plus the downsample where there is one) is never split; the stem conv
    # joins the first block and the classifier the last, since both stay within max_layers.
    assert [len(b.layers) for b in found] == [3, 2, 3, 2, 3, 2, 3, 3]
    # Each block hands on one value: the quantized output of its residual add.
    assert all(len(b.outputs) == 1 for b in found[:-1])
    assert all(len(b.layers) == 1 for b in blocks(qmodel, layerwise=True))


def test_replay_keeps_the_float_model_when_weights_are_rewritten(tiny):
    gm, calib = tiny
    qmodel = ModelQuantizer(_config()).quantize_model(gm, calib)
    replay = Replay(qmodel, [(x,) for x in calib])
    layer = weighted_layers(qmodel)[0]
    get_attr_tensor(qmodel, layer.weight.target).data.mul_(0)  # an algorithm rewriting a weight
    replay.advance_to(None)
    out = next(n for n in qmodel.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    reference = torch.cat([gm(x) for x in calib])
    assert torch.allclose(replay.values(node, quantized=False), reference, atol=1e-5)  # the float model


# -- what each algorithm does ------------------------------------------------------------------------------


def test_adaround_weights_are_the_floor_or_the_ceiling(tiny):
    gm, calib = tiny
    before = _weights(ModelQuantizer(_config(weight_bits=4)).quantize_model(gm, calib))
    qmodel = ModelQuantizer(_config("int8_float", {"name": "adaround", "iters": 40}, weight_bits=4)
                            ).quantize_model(gm, calib)
    flipped = 0
    for name, (w, fq) in _weights(qmodel).items():
        scale = fq.qparams()[0]
        k = w / scale
        assert torch.equal(k, torch.round(k)) or (k - torch.round(k)).abs().max() < 1e-3, name
        k0 = before[name][0] / scale
        lo = torch.floor(k0).clamp(fq.spec.qmin, fq.spec.qmax)
        hi = torch.ceil(k0).clamp(fq.spec.qmin, fq.spec.qmax)
        k = torch.round(k)
        assert bool(((k == lo) | (k == hi)).all()), name
        flipped += int((k != torch.round(k0).clamp(fq.spec.qmin, fq.spec.qmax)).sum())
    assert flipped > 0  # it learned something other than round-to-nearest
    record = qmodel.meta["qb_algorithms"][-1]
    assert record.name == "adaround" and record.seconds > 0 and len(record.details.rows) == 5


class _Values(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _channel_means(qmodel, calib, names, quantized: bool) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for x in calib:
            interp = _Values(qmodel, names)
            if quantized:
                interp.run(x)
            else:
                with disable_fake_quant(qmodel):
                    interp.run(x)
            for name, v in interp.values.items():
                axis = 1 if v.dim() == 4 else -1
                m = v.transpose(axis, -1).reshape(-1, v.shape[axis]).mean(0)
                sums[name] = sums.get(name, 0) + m / len(calib)
    return sums


def test_bias_correction_shrinks_each_layers_mean_output_error(tiny):
    gm, calib = tiny
    plain = ModelQuantizer(_config(weight_bits=4)).quantize_model(gm, calib)
    names = [layer.name for layer in weighted_layers(plain)]
    reference = _channel_means(plain, calib, names, quantized=False)
    corrected = ModelQuantizer(_config("int8_float", "bias_correction", weight_bits=4)).quantize_model(gm, calib)
    before = _channel_means(plain, calib, names, quantized=True)
    after = _channel_means(corrected, calib, names, quantized=True)
    for name in names:
        err_before = (before[name] - reference[name]).abs().mean()
        err_after = (after[name] - reference[name]).abs().mean()
        assert err_after < err_before, (name, float(err_before), float(err_after))
    report = corrected.meta["qb_algorithms"][0].details
    assert [r["layer"] for r in report.rows] == names and not report.skipped


def test_analytic_bias_correction_uses_the_bn_statistics(tiny):
    gm, calib = tiny
    corrected = ModelQuantizer(_config("int8_float", {"name": "bias_correction", "mode": "analytic"},
                                       weight_bits=4)).quantize_model(gm, calib)
    rows = corrected.meta["qb_algorithms"][0].details.rows
    hows = {r["layer"]: r["how"] for r in rows}
    assert hows["conv2d"] == "empirical"  # the input image has no BN statistics
    assert "analytic" in hows.values()
    for r in rows:  # the analytic shift predicts the measured one
        if r["how"] == "analytic":
            assert r["shift_after"] < r["shift_before"], r


def test_block_reconstruction_is_deterministic_with_a_seed(tiny):
    gm, calib = tiny
    config = _config("int8_float", {"name": "brecq", "iters": 15, "qdrop": 0.5, "seed": 3}, weight_bits=4,
                     act_bits=4)
    a = ModelQuantizer(config).quantize_model(gm, calib).state_dict()
    b = ModelQuantizer(config).quantize_model(gm, calib).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconstruction_lowers_the_output_error_at_four_bits(tiny):
    gm, calib = tiny

    def sqnr(qmodel):
        return check.sqnr_db(torch.cat([gm(x) for x in calib]), torch.cat([qmodel(x) for x in calib]))

    naive = sqnr(ModelQuantizer(_config(weight_bits=4)).quantize_model(gm, calib))
    learned = sqnr(ModelQuantizer(_config("int8_float", {"name": "adaround", "iters": 150}, weight_bits=4)
                                  ).quantize_model(gm, calib))
    assert learned > naive + 1.0, (naive, learned)


# -- exact export, whole graph -----------------------------------------------------------------------------


SCHEMES = {
    "float_cle_bc": _config("int8_float", "cle", "bias_correction"),
    "pow2_cle_adaround_bc": _config("int8_pow2", "cle", {"name": "adaround", "iters": 10}, "bias_correction"),
    "w4a8_adaround": _config("int8_float", "cle", {"name": "adaround", "iters": 10}, weight_bits=4),
    "w4a4_brecq": _config("int8_float", {"name": "brecq", "iters": 10}, weight_bits=4, act_bits=4),
    "mixed": _config("int8_float", "cle", {"name": "mixed_precision", "budget": 0.8},
                     {"name": "adaround", "iters": 5}),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_algorithm_keeps_the_export_exact(tiny, scheme, tmp_path):
    gm, calib = tiny
    quantizer = ModelQuantizer(SCHEMES[scheme])
    qmodel = quantizer.quantize_model(gm, calib)
    assert quantizer.coverage(qmodel).float_nodes == []
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, (calib[0],), tmp_path / "model.onnx")
    report = check.compare(path, frozen, calib, float_model=gm)
    assert report.max_lsb_err == 0 and report.top1_agreement == 100.0
    assert math.isfinite(report.sqnr_db)
    onnx_side = onnx_float_nodes(path)
    assert onnx_side.float_nodes == [] and onnx_side.float_movement == [] and onnx_side.integer_ops > 0
    if scheme == "mixed":
        bits = qmodel.meta["qb_algorithms"][1].details.bits
        assert set(bits.values()) == {4, 8}
        assert {fq.spec.dtype for _, fq in _weights(qmodel).values()} == {"int4", "int8"}


def test_pow2_scales_stay_powers_of_two(tiny):
    gm, calib = tiny
    qmodel = ModelQuantizer(SCHEMES["pow2_cle_adaround_bc"]).quantize_model(gm, calib)
    for _, fq in _weights(qmodel).values():
        scale = fq.qparams()[0]
        assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
