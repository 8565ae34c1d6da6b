"""Progress bars for calibration, training, evaluation and sweeps.

tqdm, silenced when ``CI`` is set to a true value or stderr is not a terminal
(log files stay readable). One helper so every loop behaves the same.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_disabled"]

T = TypeVar("T")


def progress_disabled() -> bool:
    """True under CI (``CI=true``/``1``), when stderr is not a TTY, and on torchrun ranks other than 0."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("RANK", "0") != "0":
        return True
    return not sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str = "", **kwargs) -> Iterable[T]:
    """Wrap an iterable in a tqdm bar unless progress output is disabled."""
    return tqdm(iterable, desc=desc, disable=progress_disabled(), leave=False, dynamic_ncols=True, **kwargs)
