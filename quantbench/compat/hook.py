"""An import hook that applies the torchvision shim just before torchvision is first imported.

Why a hook: the shim (:mod:`quantbench.compat.torchvision_ops`) has to run
*before* ``import torchvision``, whichever module imports it first: a user's
script that starts with ``import torch, torchvision``, ``timm``, or quantbench
itself. A :class:`importlib.abc.MetaPathFinder` on :data:`sys.meta_path` is
Python's supported way to act on an import before it happens; it costs
nothing until torchvision is imported, and it imports nothing heavy itself.

Who installs it:

* ``import quantbench`` (so ``import quantbench`` before torchvision is enough);
* the ``quantbench_compat.pth`` file in the environment's site-packages, which
  Python's :mod:`site` module runs at every interpreter start, so that import
  order does not matter for any script in that environment. A wheel install
  ships it; ``make install`` (an editable install, which cannot ship one)
  writes it with ``python -m quantbench.compat --install-hook``.

The hook removes itself once torchvision has been imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["PTH_NAME", "PTH_LINE", "install", "installed", "pth_path", "write_pth"]

#: The file name in site-packages; sorts after setuptools' ``__editable__.*.pth``, which puts quantbench on the path.
PTH_NAME = "quantbench_compat.pth"
#: One ``import`` line (what :mod:`site` executes); a no-op if quantbench was uninstalled and the file left behind.
PTH_LINE = ("import importlib.util as _qb_u; _qb_u.find_spec('quantbench') is not None "
            "and __import__('quantbench.compat.hook').compat.hook.install()\n")


class _RunAfterExec(importlib.abc.Loader):
    """Wraps a module's real loader and calls ``after(module)`` once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)


class TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on ``import torchvision`` it prepares the ops, lets the real finders locate
    torchvision, and finishes the shim once torchvision has executed; then it leaves :data:`sys.meta_path`.

    It stays until that import happens: a mere ``importlib.util.find_spec("torchvision")`` (an
    availability check) reaches it too, and the import that follows must still be finished.
    """

    def __init__(self) -> None:
        self._busy = False  # the shim's own find_spec("torchvision") must not come back here

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" or self._busy:
            return None
        self._busy = True
        try:
            # The shim imports torch: only now that torchvision is wanted.
            from quantbench.compat import torchvision_ops

            if not torchvision_ops.prepare():
                _remove()  # native ops, no torchvision, or already imported: nothing to finish
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _RunAfterExec(spec.loader, _finish)
                    return spec
            return None
        finally:
            self._busy = False


def _finish(module: ModuleType) -> None:
    from quantbench.compat import torchvision_ops

    torchvision_ops.finish(module)
    _remove()


def installed() -> bool:
    """Whether the hook is waiting on :data:`sys.meta_path`."""
    return any(isinstance(f, TorchvisionShimFinder) for f in sys.meta_path)


def _remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionShimFinder)]


def install() -> None:
    """Put the hook first on :data:`sys.meta_path`, unless torchvision is already imported; idempotent."""
    if "torchvision" in sys.modules or installed():
        return
    sys.meta_path.insert(0, TorchvisionShimFinder())


def pth_path() -> Path:
    """Where :func:`write_pth` writes: this interpreter's site-packages (purelib)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def write_pth(path: Path | None = None) -> Path:
    """Write the ``.pth`` file that installs the hook at interpreter start; returns its path."""
    path = path or pth_path()
    if not path.is_file() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
    return path

