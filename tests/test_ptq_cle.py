"""Cross-layer equalization and high-bias absorption (quantbench.engine.ptq.cle; DFQ, arXiv 1906.04721).

Graphs are what CLE sees in the engine: ``capture`` then the PTQ pre-quant passes (BN folded).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from quantbench.engine import capture
from quantbench.engine.graph import copy_graph, get_attr_tensor, op_name
from quantbench.engine.ops import ops_of_kind
from quantbench.engine.passes.prequant import PREQUANT_PTQ, run_passes
from quantbench.engine.ptq.cle import CleReport, equalize
from quantbench.errors import ConfigError
from tests.engine_models import reestimate_bn, torchvision_model


def _randomize_bn(model: nn.Module, seed: int = 0, log_gamma=(-2.0, 1.0), beta_std: float = 0.5,
                  size: int = 16) -> nn.Module:
    """BN scales spread over ~1.5 decades and random shifts (what trained BN layers look like: folded
    weights with very unequal channel ranges), running statistics re-estimated on random data."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty(m.num_features).uniform_(*log_gamma, generator=g).exp())
                m.bias.copy_(torch.randn(m.num_features, generator=g) * beta_std)
    return reestimate_bn(model, (16, 3, size, size), seed=seed)


class DWSep(nn.Module):
    """conv-bn-act -> depthwise conv-bn-act -> pointwise conv-bn-act -> pool -> linear."""

    def __init__(self, act=nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), act())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), act())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.pw(self.dw(self.conv(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def _graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return run_passes(copy_graph(capture(model.eval(), (x,))), PREQUANT_PTQ)


def _x(n: int = 8, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def _weighted(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in ops_of_kind("weighted")}


def _weight(gm: fx.GraphModule, name: str) -> torch.Tensor:
    return get_attr_tensor(gm, _weighted(gm)[name].args[1].target).detach()


def _bias(gm: fx.GraphModule, name: str) -> torch.Tensor:
    return get_attr_tensor(gm, _weighted(gm)[name].args[2].target).detach()


def _quantize_weights(gm: fx.GraphModule, bits: int) -> fx.GraphModule:
    """A copy of ``gm`` with every weight rounded to nearest on a symmetric per-tensor grid."""
    q = copy_graph(gm)
    qmax = 2 ** (bits - 1) - 1
    for node in _weighted(q).values():
        w = get_attr_tensor(q, node.args[1].target)
        with torch.no_grad():
            scale = w.abs().max() / qmax
            w.copy_((w / scale).round().clamp(-qmax, qmax) * scale)
    return q


def _node_outputs(gm: fx.GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    got = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                got[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return got


def _chain_sqnr(gm: fx.GraphModule, chains: list[list[str]], x: torch.Tensor, bits: int) -> list[float]:
    """Per chain: the SQNR at the chain's last layer output with only the chain's weights quantized (CLE leaves
    that output unchanged in float, so before / after compare the same function)."""
    ref = _node_outputs(gm, x, {c[-1] for c in chains})
    qmax = 2 ** (bits - 1) - 1
    out = []
    for chain in chains:
        weights = [get_attr_tensor(gm, _weighted(gm)[name].args[1].target) for name in chain]
        saved = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w in weights:  # in place, restored below
                scale = w.abs().max() / qmax
                w.copy_((w / scale).round().clamp(-qmax, qmax) * scale)
        try:
            out.append(_sqnr(ref[chain[-1]], _node_outputs(gm, x, {chain[-1]})[chain[-1]]))
        finally:
            with torch.no_grad():
                for w, v in zip(weights, saved):
                    w.copy_(v)
    return out


@pytest.fixture(scope="module")
def dwsep():
    torch.manual_seed(0)
    x = _x()
    return _graph(_randomize_bn(DWSep()), x), x


def test_keep_preserves_the_function_and_finds_the_depthwise_chain(dwsep):
    gm0, x = dwsep
    gm = copy_graph(gm0)
    report = equalize(gm, relu6="keep", absorb_bias=False)
    assert isinstance(report, CleReport)
    assert report.pairs == 3 and report.relu6_replaced == 0 and report.absorbed == 0
    assert report.chains == [["conv2d", "conv2d_1", "conv2d_2", "linear"]]  # through the pool and the flatten
    assert "3 pairs" in str(report)
    with torch.no_grad():
        assert _rel(gm(x), gm0(x)) <= 1e-5
    assert not torch.equal(_weight(gm, "conv2d_1"), _weight(gm0, "conv2d_1"))


def test_ranges_are_equalized(dwsep):
    gm0, _ = dwsep
    gm = copy_graph(gm0)
    equalize(gm, absorb_bias=False)

    def out_ranges(g, name):
        w = _weight(g, name)
        return w.reshape(w.shape[0], -1).abs().amax(1)

    def in_ranges(g, name):  # a dense layer: range of each input channel
        w = _weight(g, name)
        return w.transpose(0, 1).reshape(w.shape[1], -1).abs().amax(1)

    for name in ("conv2d", "conv2d_1", "conv2d_2"):  # max/min of the channel ranges drops
        before, after = out_ranges(gm0, name), out_ranges(gm, name)
        assert after.max() / after.min() < before.max() / before.min(), name
    # at convergence each pair is balanced: range of output channel i of the first layer == range of input
    # channel i of the second (DFQ eq. 12 gives scale 1); the depthwise layer's input channel i is its filter i
    torch.testing.assert_close(out_ranges(gm, "conv2d"), out_ranges(gm, "conv2d_1"), rtol=1e-4, atol=0)
    torch.testing.assert_close(out_ranges(gm, "conv2d_1"), in_ranges(gm, "conv2d_2"), rtol=1e-4, atol=0)
    torch.testing.assert_close(out_ranges(gm, "conv2d_2"), in_ranges(gm, "linear"), rtol=1e-4, atol=0)


def test_relu6_is_replaced_or_kept():
    torch.manual_seed(0)
    x = _x()
    # Mild BN scales: the ReLU6 clips little, so its replacement changes the function little.
    gm0 = _graph(_randomize_bn(DWSep(nn.ReLU6), log_gamma=(-1.0, 0.0), beta_std=0.3), x)
    assert sum(op_name(n) == "hardtanh" for n in gm0.graph.nodes) == 3

    kept = copy_graph(gm0)
    report = equalize(kept, relu6="keep", absorb_bias=False)
    assert (report.pairs, report.relu6_replaced) == (0, 0)

    only_replaced = copy_graph(gm0)
    assert equalize(only_replaced, iterations=0, absorb_bias=False).relu6_replaced == 3

    gm = copy_graph(gm0)
    report = equalize(gm, relu6="relu", absorb_bias=False)
    assert (report.pairs, report.relu6_replaced) == (3, 3)
    assert not any(op_name(n) == "hardtanh" for n in gm.graph.nodes)
    assert sum(op_name(n) == "relu" for n in gm.graph.nodes) == 3
    with torch.no_grad():
        assert _rel(gm(x), only_replaced(x)) <= 1e-5  # equalization itself is exact; the ReLU6 -> ReLU is not
        assert _rel(gm(x), gm0(x)) < 0.05


def test_high_bias_absorption():
    torch.manual_seed(0)
    x = _x()
    gm0 = _graph(_randomize_bn(DWSep(), log_gamma=(-2.0, 0.0), beta_std=1.0), x)
    plain = copy_graph(gm0)
    assert equalize(plain, absorb_bias=False).absorbed == 0
    assert equalize(copy_graph(gm0), batches=None).absorbed == 0  # nothing to measure: nothing absorbed

    gm = copy_graph(gm0)
    report = equalize(gm, batches=[(x[:4],), (x[4:],)])
    assert report.absorbed > 0
    c = _bias(plain, "conv2d") - _bias(gm, "conv2d")  # b1 -= c, c >= 0
    assert (c >= -1e-6).all() and (c > 1e-3).any()
    assert not torch.allclose(_bias(gm, "conv2d_1"), _bias(plain, "conv2d_1"))  # W2 c moved into b2
    with torch.no_grad():
        change = _rel(gm(x), plain(x))
    assert 0 < change < 0.05, change  # ReLU(h - c) + c = ReLU(h) except where h < c and at padded borders


def test_absorption_creates_a_missing_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 4, 1, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = M()
    with torch.no_grad():
        model.a.bias.copy_(torch.linspace(-1, 4, 6))
    x = _x(size=8)
    gm0 = _graph(model, x)
    gm = copy_graph(gm0)
    report = equalize(gm, batches=[(x,)])
    assert report.pairs == 1 and report.absorbed > 0
    b = _weighted(gm)["conv2d_1"].args[2]
    assert isinstance(b, fx.Node) and b.op == "get_attr" and isinstance(get_attr_tensor(gm, b.target), nn.Parameter)
    with torch.no_grad():
        assert _rel(gm(x), gm0(x)) < 1e-2  # 1x1 convs: only where h < c does it change


def test_grouped_linear_and_homogeneous_paths_are_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # grouped, 2 -> 3 channels per group
            self.m = nn.Conv2d(12, 24, 3, groups=12)  # depth multiplier 2
            self.fc1 = nn.Linear(24, 16)
            self.fc2 = nn.Linear(16, 7)

        def forward(self, x):
            y = self.g(nn.functional.leaky_relu(self.a(x), 0.1))
            y = nn.functional.max_pool2d(torch.relu(y), 2)
            y = self.m(y).mean((2, 3))  # global mean, then token-wise linears
            return self.fc2(torch.relu(self.fc1(y)))

    torch.manual_seed(0)
    model = M()
    with torch.no_grad():  # unequal channel ranges
        for layer in (model.a, model.g, model.m, model.fc1):
            layer.weight.mul_(torch.logspace(-1, 1, layer.weight.shape[0]).reshape(-1, *[1] * (layer.weight.dim() - 1)))
    x = _x(size=10)
    gm0 = _graph(model, x)
    gm = copy_graph(gm0)
    report = equalize(gm, absorb_bias=False)
    assert report.pairs == 4 and report.chains == [["conv2d", "conv2d_1", "conv2d_2", "linear", "linear_1"]]
    with torch.no_grad():
        assert _rel(gm(x), gm0(x)) <= 1e-5


def test_branches_and_concats_are_not_paired():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = self.b(y) + y  # y has two users
            return self.c(torch.cat([z, z], 1))  # cat: not channel-preserving

    x = _x(size=4)
    gm = _graph(M(), x)
    report = equalize(gm)
    assert (report.pairs, report.chains) == (0, [])


def test_bad_arguments():
    x = _x(size=4)
    gm = _graph(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)), x)
    with pytest.raises(ConfigError, match="relu6"):
        equalize(gm, relu6="clip")
    with pytest.raises(ConfigError, match="iterations"):
        equalize(gm, iterations=-1)
    with pytest.raises(Exception, match="equalize needs"):
        equalize(nn.Linear(2, 2))


def test_resnet18_pairs_and_exactness():
    x = _x(size=32)
    gm0 = _graph(torchvision_model("resnet18", size=32), x[:2])
    gm = copy_graph(gm0)
    report = equalize(gm, relu6="keep", batches=[(x,)])
    # conv1 -> relu -> conv2 inside each basic block; every other conv output meets a residual add
    assert report.pairs == 8 and report.relu6_replaced == 0 and all(len(c) == 2 for c in report.chains)
    with torch.no_grad():
        assert _rel(gm(x), gm0(x)) < 1e-3  # absorption at the padded borders of 3x3 convs
    plain = copy_graph(gm0)
    equalize(plain, absorb_bias=False)
    with torch.no_grad():
        assert _rel(plain(x), gm0(x)) <= 1e-5
    before, after = _chain_sqnr(gm0, report.chains, x, 4), _chain_sqnr(plain, report.chains, x, 4)
    assert sum(after) > sum(before)


def test_mobilenet_v2_per_tensor_weight_sqnr_improves():
    x = _x(size=32)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v2", num_classes=10)
    gm0 = _graph(_randomize_bn(model, size=32), x[:2])
    relu = copy_graph(gm0)  # the float function CLE keeps: ReLU6 -> ReLU, nothing else
    assert equalize(relu, iterations=0, absorb_bias=False).relu6_replaced == 35
    gm = copy_graph(gm0)
    report = equalize(gm, absorb_bias=False)
    # expand -> dw -> project chains (DFQ triples), block 1's and the last's longer, the head through pool + flatten
    assert report.pairs == 37 and report.relu6_replaced == 35 and len(report.chains) == 16
    assert report.chains[-1][-1] == "linear"
    with torch.no_grad():
        ref = relu(x)
        assert _rel(gm(x), ref) < 1e-4  # exact up to float32 rounding, which a deep random net amplifies
        before = _sqnr(ref, _quantize_weights(relu, 8)(x))
        after = _sqnr(ref, _quantize_weights(gm, 8)(x))
    assert after > before + 10, (before, after)
    before4, after4 = _chain_sqnr(relu, report.chains, x, 4), _chain_sqnr(gm, report.chains, x, 4)
    assert sum(after4) / len(after4) > sum(before4) / len(before4) + 3, (before4, after4)
