"""The machine a latency was measured on, and the optional runtimes installed on it.

An int8 speedup is a property of the model *and* the CPU: onnxruntime's and OpenVINO's int8 kernels use
VNNI (``vpdpbusd``) or AMX tiles where the CPU has them and fall back to AVX2 multiply-adds (``vpmaddubsw``)
where it does not, so the same model runs ~1.5x faster in int8 on one machine and ~3x on another. A run
therefore records the CPU model, its core count and the instruction-set extensions that decide int8 (and
bf16) speed; reports can then tell which machine a number came from.

Torch-free and cheap (reads ``/proc/cpuinfo`` once), so the harness can describe the machine before any
model is built; OpenVINO's presence is checked without importing it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from quantbench.errors import BadInputError

__all__ = ["INT8_ISA", "OPENVINO_HINT", "Machine", "RuntimeUnavailableError", "describe", "import_openvino",
           "openvino_version", "require_openvino", "telemetry_declined"]

#: The ``/proc/cpuinfo`` flags that decide int8 / bf16 kernel speed, in the order a report lists them:
#: AVX2 (the baseline x86 int8 path), AVX-512, its VNNI and bf16 dot products, AVX-VNNI (VNNI on 256-bit
#: registers: Alder Lake, Zen 5) and AMX (Sapphire Rapids tiles).
INT8_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")

#: How to get OpenVINO: the fix the one-line error names.
OPENVINO_HINT = "install it with `pip install openvino` (or `make install`: it is pinned in constraints.txt)"


class RuntimeUnavailableError(BadInputError):
    """A runtime asked for is not installed here: one line naming it and how to install it."""


@dataclass(frozen=True)
class Machine:
    """What a measurement ran on.

    Attributes:
        cpu: the CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere).
        cores: the logical CPUs the machine has.
        cpus_allowed: the logical CPUs this process may run on (a cgroup, SLURM, ``taskset``).
        isa: the :data:`INT8_ISA` extensions the CPU has, in that order.
    """

    cpu: str
    cores: int
    cpus_allowed: int
    isa: tuple[str, ...]


def _cpuinfo(path: Path) -> tuple[str | None, set[str]]:
    """The first ``model name`` and the ``flags`` of ``path`` (None and no flags where it is unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, set()
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip() or None
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, flags


@functools.cache
def describe(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> Machine:
    """This machine: CPU model, core counts and its int8-relevant ISA extensions (cached per path)."""
    name, flags = _cpuinfo(Path(cpuinfo))
    cpu = name or platform.processor() or platform.machine() or "unknown"
    cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return Machine(cpu=cpu, cores=cores, cpus_allowed=allowed, isa=tuple(f for f in INT8_ISA if f in flags))


def openvino_version() -> str | None:
    """The installed ``openvino`` distribution's version, or None (no import of OpenVINO itself)."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_openvino(context: str = "OpenVINO") -> None:
    """Raise :class:`RuntimeUnavailableError` when OpenVINO cannot be imported here (cheap: no import).

    Args:
        context: what asked for it, the start of the message (``run.runtime=both``).
    """
    try:
        found = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RuntimeUnavailableError(f"{context}: the openvino package is not installed in {sys.prefix}; "
                                      f"{OPENVINO_HINT}")


#: ``CI=true``: openvino_telemetry's consent check then declines (it treats a CI job as "no"), so the
#: telemetry object that ``import openvino`` (its ``tools.ovc`` package) and NNCF build at import neither
#: writes a client id and usage counter under ``~/intel`` nor sends anything. ``NNCF_CI``: NNCF installs
#: its telemetry stub. Both are read when the package is imported, never later.
TELEMETRY_OFF = {"CI": "true", "NNCF_CI": "1"}


@contextmanager
def telemetry_declined() -> Iterator[None]:
    """Import Intel's packages (openvino, nncf) inside this block: :data:`TELEMETRY_OFF` is set for it, and
    the environment is as it was afterwards. Nothing of quantbench's runs is ever sent anywhere."""
    saved = {k: os.environ.get(k) for k in TELEMETRY_OFF}
    os.environ.update(TELEMETRY_OFF)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_openvino(context: str = "OpenVINO") -> ModuleType:
    """``import openvino`` with its telemetry declined (:func:`telemetry_declined`); one line naming the fix
    (:class:`RuntimeUnavailableError`) when it is not installed."""
    require_openvino(context)
    if "openvino" not in sys.modules:
        with telemetry_declined():
            import openvino  # noqa: F401
    return sys.modules["openvino"]
