"""Compatibility shims, applied before the import they fix and importing nothing heavy themselves.

:mod:`quantbench.compat.torchvision_ops` makes torchvision and timm importable
on a CPU-only torch whose torchvision wheel was built for CUDA (a no-op where
torchvision's own extension loads). :mod:`quantbench.compat.hook` applies it
just before torchvision is first imported, whatever imports it: ``import
quantbench`` installs the hook, and so does the ``quantbench_compat.pth`` file
at interpreter start, so import order does not matter.
"""

from __future__ import annotations

from typing import Any

from quantbench.compat.hook import install as install_import_hook

__all__ = ["ensure_torchvision_ops", "install_import_hook", "torchvision_ops_status"]


def __getattr__(name: str) -> Any:  # the shim imports torch: only on use
    if name in ("ensure_torchvision_ops", "torchvision_ops_status"):
        from quantbench.compat import torchvision_ops

        return getattr(torchvision_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
