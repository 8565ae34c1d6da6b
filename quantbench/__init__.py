"""quantbench: a benchmark harness for quantizing vision models.

Importing the package is cheap: it imports neither torch nor torchvision. It
installs the import hook that makes torchvision and timm importable on a
CPU-only torch when they are first imported (see :mod:`quantbench.compat`).
The quantization engine is :mod:`quantbench.engine`; the command line is
:mod:`quantbench.cli`.
"""

from quantbench.compat import install_import_hook

install_import_hook()

__version__ = "0.1.0"
__all__ = ["__version__"]
