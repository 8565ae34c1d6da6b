"""Where training and evaluation run: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantbench.errors import DeviceUnavailableError

__all__ = ["module_device", "resolve_device"]


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda[:i]"`` as given, checked.

    Raises:
        DeviceUnavailableError: CUDA was asked for and this torch sees none.
    """
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"task.device={str(spec)!r} but this machine has no CUDA device (torch {torch.__version__}): "
            "use task.device=cpu or task.device=auto"
        )
    return device


def module_device(obj: Any) -> torch.device:
    """Where a model's tensors live (the CPU for plain callables such as an onnxruntime predict)."""
    if isinstance(obj, nn.Module):
        for tensor in (*obj.parameters(), *obj.buffers()):
            return tensor.device
    return torch.device("cpu")
