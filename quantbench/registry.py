"""One registry idiom for everything that is looked up by name (after timm's ``models/_registry.py``).

Presets, observers, op kinds, models, task kinds, optimizers and schedulers are
each a :class:`Registry`. An entry is registered under its function or class
name (or an explicit one); a duplicate raises; ``list`` takes shell-style
wildcards; an unknown name raises :class:`UnknownNameError`, whose one-line
message lists the close matches, or the known names when nothing is close::

    PRESETS = Registry("preset")

    @PRESETS.register
    def int8_pow2() -> Config: ...

    PRESETS.get("int8_pow2")        # the function
    PRESETS.list("int8_*")          # ['int8_float', 'int8_pow2', ...]

This module is a leaf: it imports nothing of quantbench, so every layer (the
engine included) can use it.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar, overload

from quantbench.errors import ConfigError

__all__ = ["DuplicateNameError", "Registry", "UnknownNameError", "close_matches", "suggest"]

T = TypeVar("T")

_builtin_list = list


class UnknownNameError(ConfigError, KeyError):
    """A name that its registry does not hold; the message names the registry and the close matches.

    A :class:`~quantbench.errors.ConfigError` (a bad input: exit status 2), and
    a ``KeyError`` so that ``except KeyError`` around a lookup keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A second entry under a name that is already registered (a bug, not a bad input)."""


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names of ``known`` that look like ``name`` (a typo's likely intent), best first."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)


def suggest(name: str, known: list[str], kind: str, *, hint: str = "", limit: int = 12) -> str:
    """The one-line message for an unknown ``name``: the close matches, else (a few of) the known names."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        choices = f"did you mean {', '.join(close)}?"
    elif len(known) <= limit:
        choices = f"known: {', '.join(known)}" if known else "none is registered"
    else:
        choices = f"known: {', '.join(known[:limit])}, ... ({len(known)} in all)"
    return f"unknown {kind} {name!r}; {choices}{(' ' + hint) if hint else ''}"


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: What an entry is, for messages ("preset", "observer", ...).
        hint: Appended to the unknown-name message (how to list or add entries).
    """

    def __init__(self, kind: str, *, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    @overload
    def register(self, entry: T) -> T: ...

    @overload
    def register(self, entry: None = None, *, name: str | None = None, **meta: Any) -> Callable[[T], T]: ...

    def register(self, entry: Any = None, *, name: str | None = None, **meta: Any) -> Any:
        """Register ``entry`` under ``name`` (default: its ``__name__``); usable as a bare or called decorator.

        ``meta`` is kept beside the entry (:meth:`meta`), e.g. the config
        schemas of a task kind.

        Raises:
            DuplicateNameError: The name is taken.
        """

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"a {self.kind} needs a name: pass name=...")
            if key in self._entries:
                raise DuplicateNameError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return add if entry is None else add(entry)

    def add(self, name: str, entry: T, **meta: Any) -> T:
        """Register ``entry`` under ``name`` (the non-decorator form)."""
        return self.register(name=name, **meta)(entry)

    def get(self, name: str) -> T:
        """The entry of ``name``.

        Raises:
            UnknownNameError: ``name`` is not registered; the message lists close matches.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(suggest(str(name), self.list(), self.kind, hint=self.hint)) from None

    def meta(self, name: str) -> dict[str, Any]:
        """What was registered beside ``name`` (``register(..., **meta)``)."""
        self.get(name)
        return self._meta[name]

    def list(self, pattern: str = "*") -> _builtin_list[str]:  # noqa: A003 - the timm name
        """Registered names matching a shell-style wildcard (case-sensitive), sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
