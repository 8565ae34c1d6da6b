"""Bad inputs: each one is one line on stderr and exit status 2, and nothing already recorded is lost.

A bad input is something the user or the machine must fix (a server that is
down, a full disk, a corrupt file, a device that is not there), as opposed to
a bug or a scheme that fails on a model. The harness reports these classes by
their one-line message, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ArtifactWriteError",
    "BadInputError",
    "DeviceUnavailableError",
    "TrackingUnavailableError",
    "UnsafeConfigError",
]


class BadInputError(RuntimeError):
    """Base class: a bad input; the message is one line that names the culprit and the fix."""


class TrackingUnavailableError(BadInputError):
    """The tracking server does not answer; raised before any run starts."""


class ArtifactWriteError(BadInputError):
    """An artifact could not be written (a full disk); the run is marked FAILED, the sweep goes on."""


class DeviceUnavailableError(BadInputError):
    """The config asks for a device (CUDA) this machine does not have."""


class UnsafeConfigError(BadInputError):
    """The config names code to run that is not one of the project's own classes."""
