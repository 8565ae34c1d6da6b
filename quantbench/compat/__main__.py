"""``python -m quantbench.compat --install-hook``: write quantbench_compat.pth into this environment's site-packages."""

import sys

from quantbench.compat.hook import PTH_NAME, write_pth

if sys.argv[1:] != ["--install-hook"]:
    sys.exit(f"usage: python -m quantbench.compat --install-hook   (writes site-packages/{PTH_NAME})")
print(f"wrote {write_pth()}")
