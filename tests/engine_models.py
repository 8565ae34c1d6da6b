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

