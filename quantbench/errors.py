"""The error contract: what went wrong, as a type, so that every layer agrees on what a failure means.

A *bad input* is something the user or the machine must fix (a missing data
set, a corrupt image, a typo in a config value, a device that is not there, a
tracking server that is down, a full disk). It is a :class:`BadInputError`:
its message is one line that names the culprit and the fix, and the command
line prints that line and exits with status 2, without a traceback. Anything
else is a bug (or a scheme that fails on a model): a traceback and status 1.

The harness maps these types to exit codes and run records by ``isinstance``,
never by class name or message text::

    BadInputError                          one line, exit 2
    ├── ConfigError (ValueError)           a config value that cannot work (the key is named)
    │   └── UnsafeConfigError              a config that names code outside the project
    ├── DataError                          the task's data set: stops every run of a sweep
    │   ├── DataNotFoundError (FileNotFoundError)
    │   └── CorruptDataError (ValueError)
    ├── WeightsError                       weights that do not load or do not fit the model (model.checkpoint)
    │   └── WeightsNotFoundError (FileNotFoundError)   a checkpoint or pretrained weights that are not there
    ├── DeviceUnavailableError             e.g. task.device=cuda on a machine without CUDA
    ├── TrackingUnavailableError           the MLflow server does not answer
    ├── ArtifactWriteError                 an artifact could not be written (a full disk)
    └── UsageError                         a bad command line: an unknown task, a bad option, a busy port

This module is a leaf (it imports nothing of quantbench), so the engine, the
training layer, the tasks and the harness all raise the same classes;
:mod:`quantbench.training` re-exports them for tasks.
"""

from __future__ import annotations

__all__ = [
    "ArtifactWriteError",
    "BadInputError",
    "ConfigError",
    "CorruptDataError",
    "DataError",
    "DataNotFoundError",
    "DeviceUnavailableError",
    "TrackingUnavailableError",
    "UnsafeConfigError",
    "UsageError",
    "WeightsError",
    "WeightsNotFoundError",
    "one_line",
]


class BadInputError(RuntimeError):
    """Base class: a bad input; the message is one line that names the culprit and the fix.

    Subclasses keep a one-argument constructor, so a DataLoader worker that
    raises one is re-raised in the main process with the same type.
    """


class ConfigError(BadInputError, ValueError):
    """A config value that cannot work: the message names the key (``data.calib_size``) and what it accepts."""


class UnsafeConfigError(ConfigError):
    """The config names code to run that is not one of the project's own classes."""


class DataError(BadInputError):
    """The task's data set is missing or holds a corrupt file.

    It concerns every run of the task, so a sweep stops at the first one
    instead of failing each run the same way.
    """


class DataNotFoundError(DataError, FileNotFoundError):
    """The data set is not where the config says; the message says where it looked and how to get it."""


class CorruptDataError(DataError, ValueError):
    """A file of the data set does not decode and the policy is to fail; the message names the file
    and the setting that skips such files."""


class WeightsError(BadInputError):
    """Weights that are there but cannot be used: a file that is not a (safely loadable) PyTorch
    checkpoint, or a state_dict of another architecture; the message names the key (``model.checkpoint``)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """Weights could not be found or loaded; the message says which key supplies them."""


class DeviceUnavailableError(BadInputError):
    """The config asks for a device (CUDA) this machine does not have."""


class TrackingUnavailableError(BadInputError):
    """The tracking server does not answer; raised before any run starts."""


class ArtifactWriteError(BadInputError):
    """An artifact could not be written (a full disk); the run is marked FAILED, the sweep goes on."""


class UsageError(BadInputError):
    """A bad command line (an unknown task, a bad option value, a busy port); the message names it and the fix."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    A DataLoader worker re-raises an exception in the main process as the same
    type with the message ``Caught X in DataLoader worker process N.`` followed
    by the worker's traceback; the original message is the traceback's last
    line, after ``X: ``.
    """
    text = str(exc).strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        name = type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return lines[0] if lines else type(exc).__name__
