"""Hardware-aligned freeze for power-of-two NPUs: each pass alone, the check, and whole models.

Violations are built on purpose by moving quantizer positions of a pow2
model (the passes must bring each back into range), and whole torchvision
models must freeze for ``npu_pow2`` with nothing left to report and export
to ONNX with onnxruntime agreeing to the bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from engine_models import batches, reestimate_bn, torchvision_model
from torch import fx, nn

from quantbench.engine import (
    HardwareError,
    HardwareTarget,
    ModelQuantizer,
    Violation,
    capture,
    check,
    check_hardware,
    export_onnx,
    presets,
)
from quantbench.engine.graph import op_name
from quantbench.engine.passes import align as hw_passes
from quantbench.engine.targets import (
    avg_pool_factor,
    npu_avg_pool2d,
    npu_global_avg_pool,
    npu_hardsigmoid,
    operands,
)

SIZE = 14  # 14 -> 2x2 avg pool -> a 7x7 global pool: the 21/1024 factor


class NpuOps(nn.Module):
    """Every op an NPU rule touches: conv-bn-relu, add-relu, 2x2 avg pool, max pool, cat,
    a sigmoid gate (mul), SiLU, a 7x7 adaptive average pool, a mean and linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(y) + y)
        c = torch.cat([F.avg_pool2d(y, 2), F.max_pool2d(y, 2)], 1)
        c = c * torch.sigmoid(self.gate(c))
        c = F.silu(self.conv3(c))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1) + c.mean((2, 3)))


def _quantize(model: nn.Module, preset: str, size: int):
    x = batches(1, (4, 3, size, size), seed=1)[0]
    gm = capture(model, (x,))
    quantizer = ModelQuantizer(presets.get(preset))
    return gm, quantizer, quantizer.quantize_model(gm, batches(2, (8, 3, size, size), seed=2))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _quantize(reestimate_bn(NpuOps(), (8, 3, SIZE, SIZE)), "int8_pow2", SIZE)


@pytest.fixture
def static(tiny):
    """A pow2 fake-quant copy whose quantizers are static, ready for the alignment passes."""
    return hw_passes.to_static_pow2_quantizers(copy.deepcopy(tiny[2]))


def _rows(gm: fx.GraphModule, constraint: str) -> list[Violation]:
    return [r for r in check_hardware(gm) if r.constraint == constraint]


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _set_pos(gm: fx.GraphModule, quant, pos: float) -> None:
    gm.get_submodule(quant.name).scale = torch.full_like(quant.scale, 2.0 ** -pos)


def _state(gm: fx.GraphModule) -> tuple[str, dict]:
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def _assert_idempotent(gm: fx.GraphModule, pass_fn) -> None:
    code, state = _state(gm)
    again = pass_fn(gm)
    assert again.code == code
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


# -- NPU arithmetic --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, factor", [((7, 7), (21, 10)), ((3, 3), (7, 6)), ((5, 5), (10, 8)),
                                            ((6, 6), (7, 8)), ((14, 14), (21, 12)), ((2, 2), (1, 2)),
                                            ((1, 1), (1, 0)), ((9, 9), (101, 13)), ((4, 4), (1, 4))])
def test_avg_pool_factor_is_the_npu_table(kernel, factor):
    assert avg_pool_factor(*kernel) == factor


def test_avg_pool_factor_search_approximates_the_average():
    assert avg_pool_factor(3, 3, table=False) == (57, 9)  # mean: no fixed table
    for k in range(1, 32):
        mult, shift = avg_pool_factor(k, k)
        assert abs(mult / 2**shift * k * k - 1) < 0.025


def test_npu_pools_are_exact_sums_times_the_factor():
    x = torch.randint(-128, 128, (2, 4, 14, 14)).float() * 2**-5
    window = F.conv2d(x.double(), torch.ones(4, 1, 7, 7, dtype=torch.float64), None, 7, groups=4)
    assert torch.equal(npu_avg_pool2d(x, [7, 7], [7, 7], [0, 0], 21, 10).double(), window * 21 / 1024)
    total = x.double().sum((2, 3), keepdim=True)
    assert torch.equal(npu_global_avg_pool(x, [2, 3], True, 21, 12).double(), total * 21 / 4096)


def test_npu_hardsigmoid_is_relu6_x_plus_3_times_2731_over_2_14():
    x = torch.tensor([-4.0, -3.0, 0.0, 1.5, 3.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 3 * 2731, 4.5 * 2731, 6 * 2731, 6 * 2731]) / 16384
    assert torch.equal(npu_hardsigmoid(x), expected)
    assert torch.allclose(npu_hardsigmoid(x), (x * 2731 / 16384 + 0.5).clamp(0, 1), atol=2e-4)


# -- each pass alone --------------------------------------------------------------------------------------
def test_to_static_pow2_quantizers_gives_an_own_int8_bias(tiny):
    gm = copy.deepcopy(tiny[2])
    assert _rows(gm, "bias_bits")
    gm = hw_passes.to_static_pow2_quantizers(gm)
    assert not _rows(gm, "bias_bits")
    biases = [operands(gm, n).inputs[2] for n in gm.graph.nodes if op_name(n) in ("conv2d", "linear")]
    assert len(biases) == 5 and all(b.dtype == "int8" and b.settable for b in biases)
    _assert_idempotent(gm, hw_passes.to_static_pow2_quantizers)


def test_float_scales_are_refused_naming_the_quantizer(tiny):
    model = reestimate_bn(NpuOps(), (8, 3, SIZE, SIZE))
    _, quantizer, qmodel = _quantize(model, "int8_float", SIZE)
    with pytest.raises(HardwareError) as err:
        quantizer.freeze(qmodel, target="npu_pow2")
    message = str(err.value)
    assert "\n" not in message and "activation_fq_x" in message and "pow2 preset" in message


def test_replace_sigmoid_and_silu(static):
    assert len(_rows(static, "npu_activation")) == 2
    gm = hw_passes.replace_sigmoid_with_hardsigmoid(static)
    gm = hw_passes.replace_silu_with_hardswish(gm)
    assert not _rows(gm, "npu_activation")
    names = [op_name(n) for n in gm.graph.nodes]
    assert "sigmoid" not in names and "silu" not in names and names.count("npu_hardsigmoid") == 2
    gate = gm.get_submodule("activation_fq_silu_hardsigmoid")
    assert float(gate.scale) == 2.0**-7  # the NPU holds hardswish's factor as int8 at position 7
    _assert_idempotent(gm, hw_passes.replace_silu_with_hardswish)
    _assert_idempotent(gm, hw_passes.replace_sigmoid_with_hardsigmoid)


def test_rewrite_avg_pools_then_align_their_scales(static):
    assert len(_rows(static, "npu_avg_pool")) == 3
    gm = hw_passes.rewrite_avg_pools(static)
    assert not _rows(gm, "npu_avg_pool")
    calls = {n.name: (n.target.__name__, n.args[-2:]) for n in gm.graph.nodes if op_name(n).startswith("npu_")}
    assert calls["avg_pool2d"] == ("npu_avg_pool2d", (1, 2))
    assert calls["adaptive_avg_pool2d"] == ("npu_global_avg_pool", (21, 10))
    assert calls["mean"] == ("npu_global_avg_pool", (21, 10))
    _assert_idempotent(gm, hw_passes.rewrite_avg_pools)
    assert {r.node for r in _rows(gm, "shared_scale")} >= {"adaptive_avg_pool2d", "mean"}
    gm = hw_passes.align_pool_scales(gm)
    assert not _rows(gm, "shared_scale")
    for name in ("avg_pool2d", "adaptive_avg_pool2d", "mean"):
        pool = operands(gm, _node(gm, name))
        assert pool.inputs[0].name == pool.output.name  # one quantizer module: shared by construction
    _assert_idempotent(gm, hw_passes.align_pool_scales)


def test_align_concat_scales(static):
    cat = operands(static, _node(static, "cat"))
    static.add_submodule("split_fq", copy.deepcopy(static.get_submodule(cat.output.name)))
    user = next(iter(_node(static, "cat").users))
    user.target = "split_fq"  # an output quantizer of its own, one position finer
    static.get_submodule("split_fq").scale = static.get_submodule("split_fq").scale / 2
    static.recompile()
    assert [r.node for r in _rows(static, "shared_scale")] == ["cat"]
    gm = hw_passes.align_concat_scales(static)
    assert not _rows(gm, "shared_scale")
    _assert_idempotent(gm, hw_passes.align_concat_scales)


@pytest.mark.parametrize("constraint, node, operand, pos, pass_name, fixed", [
    ("shift_cut", "conv2d_1", 1, 40.0, "constrain_shift_cut", 16.0),  # weight far too fine
    ("shift_cut", "conv2d_1", "out", 30.0, "constrain_shift_cut", 0.0),  # output finer than the product
    ("shift_read", "add", 0, 20.0, "constrain_shift_read", 7.0),
    ("shift_write", "add", "out", 40.0, "constrain_shift_write", -7.0),
    ("shift_write", "mul", "out", -40.0, "constrain_shift_write", 32.0),
    ("shift_bias", "linear", 2, -20.0, "constrain_shift_bias", 15.0),  # bias far too coarse
])
def test_constrain_shift_passes_fix_deliberate_violations(static, constraint, node, operand, pos, pass_name,
                                                          fixed):
    ops = operands(static, _node(static, node))
    _set_pos(static, ops.output if operand == "out" else ops.inputs[operand], pos)
    rows = [r for r in _rows(static, constraint) if r.node == node]
    assert len(rows) == 1 and not rows[0].allowed[0] <= rows[0].value <= rows[0].allowed[1], rows
    gm = getattr(hw_passes, pass_name)(static)
    rows = [r for r in _rows(gm, constraint) if r.node == node]
    assert not rows, rows
    ops = operands(gm, _node(gm, node))
    pos_in = [float(q.pos.max()) for q in ops.inputs if q is not None]
    value = {"shift_cut": lambda: pos_in[1] + pos_in[0] - float(ops.output.pos),
             "shift_read": lambda: max(pos_in) - min(pos_in),
             "shift_write": lambda: (min(pos_in) if node == "add" else sum(pos_in)) - float(ops.output.pos),
             "shift_bias": lambda: pos_in[1] + pos_in[0] - pos_in[2]}[constraint]()
    assert value == fixed  # moved to the nearest end of the range, no further
    _assert_idempotent(gm, getattr(hw_passes, pass_name))


# -- the check and the whole freeze -----------------------------------------------------------------------
def test_check_reports_float_scales(tiny):
    model = reestimate_bn(NpuOps(), (8, 3, SIZE, SIZE))
    _, quantizer, qmodel = _quantize(model, "int8_float", SIZE)
    rows = check_hardware(quantizer.freeze(qmodel))
    pow2 = [r for r in rows if r.constraint == "pow2_scale"]
    assert pow2 and pow2[0].node == "quantize" and "not a power of two" in str(pow2[0])


def test_check_reports_a_pow2_model_frozen_for_ort(tiny):
    _, quantizer, qmodel = tiny
    broken = copy.deepcopy(qmodel)
    add = operands(broken, _node(broken, "add"))
    _set_pos(broken, add.inputs[0], 20.0)  # conv2d_1's output: add reads 20 vs 4, conv2d_1 cuts < 0
    rows = check_hardware(quantizer.freeze(broken, target="ort"))
    found = {(r.node, r.constraint) for r in rows}
    # the add and its relu are one integer kernel (qadd, then an integer clamp) once frozen
    assert ("qlinear_1", "shift_cut") in found and ("qadd", "shift_read") in found
    assert {r.constraint for r in rows} >= {"bias_bits", "npu_avg_pool", "npu_activation"}
    assert all(isinstance(r, Violation) and r.node in {n.name for n in quantizer.freeze(broken).graph.nodes}
               for r in rows)
    assert not check_hardware(quantizer.freeze(broken, target="npu_pow2"))


def test_npu_freeze_of_the_tiny_model_matches_onnxruntime(tiny, tmp_path):
    gm, quantizer, qmodel = tiny
    frozen = quantizer.freeze(qmodel, target="npu_pow2")
    assert check_hardware(frozen) == []
    assert frozen.meta["qb_frozen_target"] == "npu_pow2"
    assert quantizer.freeze(qmodel).meta["qb_frozen_target"] == "ort"
    names = {op_name(n) for n in frozen.graph.nodes}
    assert {"npu_avg_pool2d", "npu_global_avg_pool", "npu_hardsigmoid"} <= names
    assert not names & {"sigmoid", "silu", "avg_pool2d", "adaptive_avg_pool2d", "mean"}
    x = batches(1, (4, 3, SIZE, SIZE), seed=1)[0]
    path = export_onnx(frozen, (x,), tmp_path / "tiny_npu.onnx")
    report = check.compare(path, frozen, batches(3, (8, 3, SIZE, SIZE), seed=3), float_model=gm)
    assert report.max_lsb_err <= 1.0 and report.top1_agreement == 100.0, report


def test_int32_bias_variant_keeps_the_derived_bias(tiny):
    _, quantizer, qmodel = tiny
    target = HardwareTarget("npu_pow2_int32_bias", bias_dtype="int32")
    frozen = quantizer.freeze(qmodel, target=target)
    assert check_hardware(frozen, target) == []
    assert {o.inputs[2].dtype for o in map(lambda n: operands(frozen, n), frozen.graph.nodes)
            if o is not None and o.op in ("conv2d", "linear")} == {"int32"}
    with pytest.raises(ValueError, match="npu_pow2"):
        quantizer.freeze(qmodel, target="npu")


def test_qat_tqt_model_freezes_for_the_npu(tmp_path):
    torch.manual_seed(0)
    _, quantizer, qmodel = _quantize(reestimate_bn(NpuOps(), (8, 3, SIZE, SIZE)), "qat_tqt", SIZE)
    assert check_hardware(quantizer.freeze(qmodel, target="npu_pow2")) == []


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "mobilenet_v2"])
def test_torchvision_models_fit_the_npu(name, tmp_path):
    gm, quantizer, qmodel = _quantize(torchvision_model(name, size=32), "int8_pow2", 32)
    frozen = quantizer.freeze(qmodel, target="npu_pow2")
    assert check_hardware(frozen) == []
    if name == "resnet18":
        x = batches(1, (4, 3, 32, 32), seed=1)[0]
        path = export_onnx(frozen, (x,), tmp_path / "resnet18_npu.onnx")
        report = check.compare(path, frozen, batches(2, (8, 3, 32, 32), seed=3), float_model=gm)
        assert report.max_lsb_err <= 1.0 and report.top1_agreement == 100.0, report
