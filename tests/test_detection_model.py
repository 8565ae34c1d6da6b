"""The YOLO-NAS-style detector: forward, re-parameterisation, export, full-graph quantization with
ORT parity, the loss on hand-made cases and the outside-the-graph decoding."""

from __future__ import annotations

import math

import pytest
import torch

import quantbench  # noqa: F401  (the CPU torchvision shim, before any torchvision import)
from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets
from tasks.detection.loss import (
    DetectionLoss,
    LossConfig,
    TaskAlignedAssigner,
    dfl_loss,
    giou,
    varifocal_loss,
)
from tasks.detection.model import QARepVGGBlock, build_detector
from tasks.detection.postprocess import NmsConfig, decode, make_anchors, postprocess

SIZE = 64


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector("yolo_nas_test", 3)
    _randomize_bn(model)
    return model.eval()


def test_forward_shapes_and_anchor_count(detector):
    cls, reg = detector(torch.rand(2, 3, SIZE, SIZE))
    n = sum((SIZE // s) ** 2 for s in detector.strides)
    assert cls.shape == (2, 3, n) and reg.shape == (2, 4 * (detector.reg_max + 1), n)
    assert make_anchors(SIZE, detector.strides).points.shape == (n, 2)


def test_reparameterize_keeps_outputs():
    torch.manual_seed(1)
    model = build_detector("yolo_nas_test", 3)
    _randomize_bn(model, 1)
    for m in model.modules():
        if isinstance(m, QARepVGGBlock) and m.alpha is not None:
            m.alpha.data.fill_(0.7)
    model.eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    assert model.reparameterized
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in _rep_blocks(model))
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def _rep_blocks(model):
    return [c for m in model.modules() if isinstance(m, QARepVGGBlock) for c in m.children()]


@pytest.fixture(scope="module")
def deployed(detector):
    import copy

    model = copy.deepcopy(detector).reparameterize()
    example = (torch.rand(2, 3, SIZE, SIZE),)
    return model, example


@pytest.mark.slow  # the fast tier's detection run (test_detection_sweep.py) checks its fp32 export against ORT
def test_float_export_matches_onnxruntime(deployed, tmp_path):
    model, example = deployed
    gm = capture(model, example)
    path = export_onnx(gm, example, tmp_path / "fp32.onnx")
    session = check.ort_session(path)
    assert len(session.get_outputs()) == 2
    x = torch.rand(3, 3, SIZE, SIZE)
    ours, theirs = model(x), check.ort_predict_fn(session)(x)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("preset", ["int8_pow2"])  # float scales: the shapes sweep test (ptq_float)
def test_whole_detector_quantized_and_onnx_parity(deployed, tmp_path, preset):
    """Every compute node quantized, head included; onnxruntime within 1 LSB on both raw outputs."""
    model, example = deployed
    torch.manual_seed(0)
    calib = [torch.rand(4, 3, SIZE, SIZE) for _ in range(2)]
    quantizer = ModelQuantizer(presets.get(preset))
    qmodel = quantizer.quantize_model(capture(model, example), calib)
    coverage = quantizer.coverage(qmodel)
    assert coverage.float_nodes == [] and coverage.fraction == 1.0
    heads = [n for n in qmodel.graph.nodes if "heads" in str(n.meta.get("nn_module_stack", ""))]
    assert heads, "the heads should be in the captured graph"
    frozen = quantizer.freeze(qmodel)
    path = export_onnx(frozen, example, tmp_path / f"{preset}.onnx")
    report = check.compare(path, frozen, calib)
    assert report.max_lsb_err <= 1.0
    assert report.top1_agreement >= 99.0
    assert all(s is not None for s in check.output_scales(frozen)), "both outputs must leave the graph quantized"


def test_giou_and_dfl_by_hand():
    a, b = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 3.0, 3.0])
    assert giou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    assert giou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    reg_max = 8
    uniform = torch.zeros(1, 4, reg_max + 1)
    assert dfl_loss(uniform, torch.full((1, 4), 2.3), reg_max).item() == pytest.approx(math.log(reg_max + 1))
    logits = torch.zeros(1, 4, reg_max + 1)
    logits[..., 2], logits[..., 3] = 3.0, 1.0  # p2, p3 known in closed form
    logp = logits.log_softmax(-1)
    expected = -(0.7 * logp[0, 0, 2] + 0.3 * logp[0, 0, 3])
    assert dfl_loss(logits, torch.full((1, 4), 2.3), reg_max).item() == pytest.approx(expected.item(), rel=1e-5)


def test_varifocal_by_hand():
    logits = torch.tensor([[-2.0, 1.0]])
    target = torch.tensor([[0.0, 0.6]])
    p = torch.sigmoid(logits)
    neg = 0.75 * p[0, 0] ** 2 * math.log(1 + math.exp(-2.0))  # BCE(z, 0) = log(1 + e^z)
    pos = 0.6 * -(0.6 * torch.log(p[0, 1]) + 0.4 * torch.log(1 - p[0, 1]))
    assert varifocal_loss(logits, target, 0.75, 2.0).item() == pytest.approx((neg + pos).item(), rel=1e-6)


def test_assigner_by_hand():
    """Points inside the box only, at most top_k, and a point claimed twice goes to the better overlap."""
    anchors = make_anchors(64, (8, 16, 32))
    n = anchors.points.shape[0]
    scores = torch.full((1, n, 2), 0.5)
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [24.0, 24.0, 56.0, 56.0]]])
    pred = gt[0, 0].expand(1, n, 4).clone()  # every point predicts box 0 exactly
    labels, valid = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    inside0 = ((anchors.points > 8) & (anchors.points < 40)).all(1)
    inside1 = ((anchors.points > 24) & (anchors.points < 56)).all(1)
    few = TaskAlignedAssigner(top_k=4)(scores, pred, anchors.points, gt, labels, valid)
    assert 0 < few.fg[0].sum() <= 8 and (few.fg[0] <= (inside0 | inside1)).all()
    out = TaskAlignedAssigner(top_k=n)(scores, pred, anchors.points, gt, labels, valid)
    fg = out.fg[0]
    assert torch.equal(fg, inside0 | inside1)  # every point inside a box, nothing else
    both = inside0 & inside1
    assert both.any() and torch.equal(out.boxes[0, both], gt[0, 0].expand(int(both.sum()), 4))
    assert torch.equal(out.boxes[0, inside1 & ~inside0], gt[0, 1].expand(int((inside1 & ~inside0).sum()), 4))
    # soft targets: box 0's best point scores box 0's best IoU (1.0), its class only
    assert out.scores[0, :, 0].max().item() == pytest.approx(1.0, abs=1e-5)
    assert out.scores[0, ~fg].abs().sum() == 0


def test_loss_of_a_perfect_prediction_has_no_box_error():
    reg_max, size = 8, 64
    anchors = make_anchors(size, (8, 16, 32))
    n = anchors.points.shape[0]
    box = torch.tensor([12.0, 12.0, 44.0, 44.0])  # stride-8 points sit at whole strides from its sides
    ltrb = torch.cat([anchors.points - box[:2], box[2:] - anchors.points], 1) / anchors.strides[:, None]
    reg = torch.full((1, 4, reg_max + 1, n), -30.0)
    idx = ltrb.clamp(0, reg_max).round().long().T  # [4, N]; exact integers for stride-8 points inside
    reg.scatter_(2, idx.unsqueeze(0).unsqueeze(2), 30.0)
    cls = torch.full((1, 2, n), -8.0)
    loss_fn = DetectionLoss(anchors, reg_max, LossConfig(top_k=4))
    target = [{"boxes": box[None], "labels": torch.tensor([1])}]
    total, parts = loss_fn((cls, reg.reshape(1, -1, n).requires_grad_()), target)
    assert parts["iou"] == pytest.approx(0.0, abs=1e-5)
    assert parts["dfl"] < 1e-3
    assert parts["cls"] > 0.1  # the class score is still wrong
    total.backward()


def test_decode_and_nms():
    reg_max = 8
    anchors = make_anchors(64, (8, 16, 32))
    n = anchors.points.shape[0]
    cls = torch.full((1, 2, n), -10.0)
    reg = torch.full((1, 4, reg_max + 1, n), -30.0)
    reg[:, :, 2] = 30.0  # every side: 2 strides
    peak = 9  # point (12, 12) on the stride-8 grid
    cls[0, 1, peak] = 4.0
    cls[0, 1, peak + 1] = 3.0  # a shifted duplicate of lower score
    boxes, scores = decode(cls, reg.reshape(1, -1, n), anchors, reg_max)
    cx, cy = anchors.points[peak].tolist()
    assert torch.allclose(boxes[0, peak], torch.tensor([cx - 16, cy - 16, cx + 16, cy + 16]))
    dets = postprocess((cls, reg.reshape(1, -1, n)), anchors, reg_max, NmsConfig(score_threshold=0.5, iou_threshold=0.5))  # IoU of the two: 0.6
    assert dets[0]["labels"].tolist() == [1] and dets[0]["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(4.0)))
    with pytest.raises(ValueError, match="image_size"):
        decode(cls, reg.reshape(1, -1, n), make_anchors(96, (8, 16, 32)), reg_max)
