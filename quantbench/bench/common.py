"""Models shared by the benchmarks: no downloads here, so random weights whose BatchNorm
statistics are re-estimated on random data (activations then look like a trained network's)."""

from __future__ import annotations

import torch
from torch import nn

import quantbench  # noqa: F401  (torchvision import shim)

__all__ = ["random_bn_model"]


def random_bn_model(name: str, size: int, num_classes: int = 1000, batches: int = 2) -> nn.Module:
    """A torchvision model in eval mode with re-estimated BatchNorm statistics."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=num_classes)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, 3, size, size))
    return model.eval()
