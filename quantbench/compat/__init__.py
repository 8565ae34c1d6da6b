"""Compatibility shims applied once at ``import quantbench``.

Only :mod:`quantbench.compat.torchvision_ops` lives here: it makes torchvision
and timm importable on a CPU-only torch whose torchvision wheel was built for
CUDA. It is a no-op where torchvision's own extension loads.
"""

from quantbench.compat.torchvision_ops import ensure_torchvision_ops, torchvision_ops_status

__all__ = ["ensure_torchvision_ops", "torchvision_ops_status"]
