"""Task adapters: the only place that knows datasets, models and metrics.

The harness reaches an adapter only through ``_target_`` in ``conf/task/*.yaml``;
``quantbench`` never imports ``tasks``. Importing this package imports
:mod:`quantbench` first, because that is what makes torchvision and timm
importable on a CPU-only torch (see :mod:`quantbench.compat`), and every adapter
needs them.
"""

import quantbench  # noqa: F401 - side effect: torchvision/timm become importable

__all__: list[str] = []
