"""Small models and helpers shared by the engine tests (real torchvision code, toy sizes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import quantbench  # noqa: F401  (makes torchvision importable on a CPU-only torch)


class TinyAllOps(nn.Module):
    """conv/bn/relu, a residual add, cat, max pool, nearest and bilinear upsample,
    ``x * 0.5 + 1``, a ReLU module called twice, sigmoid, mean and linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.relu(self.conv2(y) + y)  # add+relu, the same ReLU module again
        c = torch.cat([z, z * 0.5 + 1], dim=1)
        c = F.max_pool2d(c, 2)
        c = F.interpolate(c, scale_factor=2.0, mode="nearest")
        d = torch.sigmoid(self.conv3(c))
        d = F.interpolate(d, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.fc(d.mean((2, 3)))


def reestimate_bn(model: nn.Module, shape: tuple[int, ...], batches: int = 4, seed: int = 0) -> nn.Module:
    """Random-init model with BN statistics re-estimated on random data, so activations
    are not degenerate (what a trained network's BN would look like)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, generator=g))
    return model.eval()


def torchvision_model(name: str, size: int = 32, num_classes: int = 10, seed: int = 0) -> nn.Module:
    import torchvision  # after quantbench: see quantbench.compat

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, num_classes=num_classes)
    return reestimate_bn(model, (16, 3, size, size), seed=seed)


def batches(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]



class TinyViT(nn.Module):
    """ViT/DeiT patterns: patch-embed conv, class-token concat, position-embedding add, LayerNorm,
    attention written out (q*scale, q @ k^T, softmax, attn @ v), GELU MLP, layer scale, class-token head."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 5, patch: int = 4, size: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.gamma * self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


class TinyEfficientNet(nn.Module):
    """EfficientNet/MobileNetV3 patterns: conv-BN-SiLU, depthwise conv, squeeze-excitation
    (mean, 1x1 convs, SiLU, sigmoid gate times the activation), a residual, a GroupNorm."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.gn = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x)
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self.pw(y * s) + x
        y = F.hardswish(self.gn(y))
        return self.head(y.mean((2, 3)))
