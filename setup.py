"""Packaging hook: the wheel also ships ``quantbench_compat.pth`` at the root of site-packages.

Everything else is in pyproject.toml. The .pth file installs quantbench's
torchvision import hook at interpreter start (see quantbench/compat/hook.py),
so ``import torchvision`` works on a CPU-only torch in any script, in any
order. An editable install cannot ship it: ``make install`` writes it with
``python -m quantbench.compat --install-hook``.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_HOOK = Path(__file__).resolve().parent / "quantbench" / "compat" / "hook.py"


def _hook_module():
    spec = importlib.util.spec_from_file_location("_quantbench_compat_hook", _HOOK)  # stdlib only
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the .pth file next to the packages."""

    def run(self):
        super().run()
        hook = _hook_module()
        Path(self.build_lib, hook.PTH_NAME).write_text(hook.PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, _hook_module().PTH_NAME))]


setup(cmdclass={"build_py": BuildPyWithPth})
