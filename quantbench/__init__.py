"""quantbench: a benchmark harness for quantizing vision models.

Importing the package makes torchvision and timm importable on a CPU-only torch
(see :mod:`quantbench.compat`). The quantization engine is
:mod:`quantbench.engine`.
"""

from quantbench.compat import ensure_torchvision_ops

ensure_torchvision_ops()

__version__ = "0.1.0"
__all__ = ["__version__"]
