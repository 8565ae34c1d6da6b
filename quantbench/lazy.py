"""Package facades that load their names on first use (PEP 562), so that importing a light module of a
package (a config dataclass, a registry) does not import torch or MLflow through its ``__init__``.

A leaf module: it imports only the standard library.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str],
                 exported: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``name`` is loaded from module ``where[name]`` on first use.

    Usage, at the end of a package's ``__init__``::

        __getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
    """
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exported))

    return __getattr__, __dir__
