"""Quiet by default: the library warnings and log lines that no user of quantbench can act on.

Each filter is narrow (one logger, or one message of one category) and says
why it exists. ``quantbench -v`` (``QUANTBENCH_VERBOSE=1``, inherited by Hydra
jobs, loky workers and torchrun ranks) turns every one of them off. A leaf
module: it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

__all__ = ["quiet_logger", "quiet_loggers", "quiet_warning", "verbose"]


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


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise loggers ``names`` to ``level`` for the duration of a block (e.g. one import), unless verbose."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)
