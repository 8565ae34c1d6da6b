"""Is a RUNNING record still running? Process tags, a heartbeat, and the stale-run verdict.

A run killed with SIGKILL (or a node that died) cannot mark its own MLflow
record; it stays RUNNING forever and would hide that the work is missing.
Every run therefore records where it runs (``host``, ``pid`` and the process's
start time, which tells a reused pid apart) and refreshes a ``heartbeat`` tag
from a background thread. A later sweep judges a RUNNING record:

* same host: stale as soon as its process is gone (exact, no waiting);
* another host (a cluster): stale when its heartbeat is older than
  ``stale_after_s``.

Stale records are marked FAILED with ``error = killed: ...`` and redone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping

__all__ = ["HOST", "Heartbeat", "process_alive", "process_tags", "stale_reason"]

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags that let a later process decide whether this one is still alive."""
    pid = os.getpid()
    return {"host": HOST, "pid": str(pid), "pid_start": _start_time(pid),
            "heartbeat": str(int(time.time() * 1000))}


def process_alive(pid: int, start: str = "") -> bool:
    """True when ``pid`` runs on this host and, if ``start`` is known, is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return not start or _start_time(pid) in ("", start)


def stale_reason(tags: Mapping[str, str], start_time_ms: int, stale_after_s: float,
                 now_ms: int | None = None) -> str | None:
    """Why a RUNNING record is stale (one line), or None while its run may still be going."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    host, pid = tags.get("host", ""), tags.get("pid", "")
    if host == HOST and pid.isdigit():
        if process_alive(int(pid), tags.get("pid_start", "")):
            return None
        return f"killed: its process {pid} on {host} is gone (the run never finished)"
    beat = int(tags.get("heartbeat") or start_time_ms or 0)
    age = (now_ms - beat) / 1000.0
    if age > stale_after_s:
        return f"killed: no heartbeat from {host or 'its host'} for {age:.0f} s (tracking.stale_after_s={stale_after_s:g})"
    return None


class Heartbeat:
    """Calls ``beat()`` every ``interval_s`` seconds from a daemon thread until :meth:`stop`.

    A failed beat is logged and retried at the next interval: a tracking server
    that is briefly away must not kill the run it watches.
    """

    def __init__(self, beat: Callable[[], Any], interval_s: float) -> None:
        self._beat, self._interval = beat, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="quantbench-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if self._interval > 0:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # keep beating; the next one may get through
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
