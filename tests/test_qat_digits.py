"""QAT works: on scikit-learn's digits, 4-bit PTQ loses accuracy and LSQ / TQT QAT win it back.

A tiny CNN (three conv-bn-relu, two max pools, linear) is trained in float, then
quantized with 4-bit per-tensor weights and 4-bit activations, derived from the
``w4a8_*`` presets. (With the presets as they are, per-channel int4 weights and
int8 activations, this easy task loses under half a point, too little to see;
per-tensor weights after BN folding and 4-bit activations lose several.) PTQ
with float scales and with power-of-two scales is the baseline; LSQ (Esser et
al., arXiv 1902.08153, float steps) and TQT (Jain et al., arXiv 1903.08066,
log2 thresholds, pow2 scales) then train for a few epochs, BN frozen in the
last one (Krishnamoorthi, arXiv 1806.08342). Everything is seeded; the asserts
hold with margin, they do not pin exact numbers. Measured on one CPU core
(seed 2): float 98.9, PTQ float 96.6 / pow2 93.5, LSQ 98.8, TQT 98.5; ~4 s.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.engine import Config, ModelQuantizer, capture, presets, qat

SEED = 2
FLOAT_EPOCHS = 10
QAT_EPOCHS = 6
BATCH = 64
#: Adam learning rates: weights; LSQ steps (absolute, so small); TQT log2 thresholds (scale free).
LR, LSQ_LR, TQT_LR = 3e-3, 3e-3, 3e-2


class DigitsNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1000], perm[1000:]
    return x[train], y[train], x[val], y[val]


def _batches(x: torch.Tensor, y: torch.Tensor, seed: int):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), BATCH):
        idx = perm[i:i + BATCH]
        yield x[idx], y[idx]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def _harsh(name: str) -> Config:
    """The preset with per-tensor int4 weights and int4 activations."""
    config = presets.get(name)
    qc = config.global_quant_config
    act = qc.input_tensors.replace(dtype="int4")
    return config.replace(global_quant_config=qc.replace(weight=qc.weight.replace(qscheme="per_tensor"),
                                                         input_tensors=act, output_tensors=act))


def _train_float(xt, yt) -> nn.Module:
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for epoch in range(FLOAT_EPOCHS):
        for xb, yb in _batches(xt, yt, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def _train_qat(qmodel, xt, yt, quant_lr: float) -> None:
    """Two param groups, cosine decay, BN frozen for the last epoch (the usual QAT recipe)."""
    opt = torch.optim.Adam([{"params": qat.weight_parameters(qmodel), "lr": LR},
                            {"params": qat.quantizer_parameters(qmodel), "lr": quant_lr}])
    total = QAT_EPOCHS * math.ceil(len(xt) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    for epoch in range(QAT_EPOCHS):
        qmodel.train()
        if epoch == QAT_EPOCHS - 1:
            qat.set_bn_frozen(qmodel, True)
        for xb, yb in _batches(xt, yt, seed=100 + epoch):
            opt.zero_grad()
            F.cross_entropy(qmodel(xb), yb).backward()
            opt.step()
            sched.step()
    qmodel.eval()


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    try:
        xt, yt, xv, yv = _digits()
        model = _train_float(xt, yt)
        gm = capture(model, (xv[:2],))
        calib = [xt[i:i + BATCH] for i in range(0, 4 * BATCH, BATCH)]
        acc = {"float": _accuracy(model, xv, yv)}
        for key, preset in (("ptq_float", "w4a8_float"), ("ptq_pow2", "w4a8_pow2")):
            acc[key] = _accuracy(ModelQuantizer(_harsh(preset)).quantize_model(gm, calib), xv, yv)
        for key, preset, quant_lr in (("lsq", "w4a8_lsq", LSQ_LR), ("tqt", "w4a8_tqt", TQT_LR)):
            qmodel = ModelQuantizer(_harsh(preset)).quantize_model(gm, calib)
            _train_qat(qmodel, xt, yt, quant_lr)
            acc[key] = _accuracy(qmodel, xv, yv)
        print("digits accuracy %:", {k: round(v, 2) for k, v in acc.items()})
        return acc
    finally:
        torch.set_num_threads(threads)


def test_float_baseline(results):
    assert results["float"] > 96.0, results


def test_4bit_ptq_loses_accuracy(results):
    assert results["float"] - results["ptq_float"] >= 1.0, results
    assert results["float"] - results["ptq_pow2"] >= 2.5, results


@pytest.mark.parametrize(("method", "baseline"), [("lsq", "ptq_float"), ("tqt", "ptq_pow2")])
def test_qat_recovers_most_of_the_loss(results, method, baseline):
    loss = results["float"] - results[baseline]
    recovered = results[method] - results[baseline]
    assert recovered >= 0.5 * loss, results
    assert results[method] >= results["float"] - 1.5, results
