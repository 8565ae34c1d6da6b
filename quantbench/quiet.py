"""Quiet by default: the library warnings and log lines that no user of quantbench can act on.

Each filter is narrow (one logger, or one message of one category) and says
why it exists. ``quantbench -v`` (``QUANTBENCH_VERBOSE=1``, inherited by Hydra
jobs, loky workers and torchrun ranks) turns every one of them off. A leaf
module: it imports only the standard library.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["quiet_logger", "quiet_warning", "verbose"]


def verbose() -> bool:
    """``QUANTBENCH_VERBOSE=1`` (``quantbench -v``): show everything."""
    return os.environ.get("QUANTBENCH_VERBOSE") == "1"


def quiet_logger(name: str, level: int = logging.WARNING) -> None:
    """Raise logger ``name`` to ``level`` (its INFO lines are noise here), unless verbose."""
    if not verbose():
        logging.getLogger(name).setLevel(level)


def quiet_warning(message: str, category: type[Warning] = Warning, module: str = "") -> None:
    """Ignore one warning (``message`` is a regex matched at its start), unless verbose."""
    if not verbose():
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
