"""The registry of task kinds: which adapter class a kind has, and the config schemas it owns.

A task package registers its kind when it is imported, from a module that
imports nothing heavy (its config module)::

    TASK_KINDS.add("classification", TaskKind(
        adapter="tasks.classification.adapter.ClassificationTask",
        data=DataConfig, train=TrainConfig))

The harness imports the package named by each ``conf/task/*.yaml``
``_target_`` and stores every registered kind's schemas in Hydra's
ConfigStore as ``data/base_<kind>`` and ``train/base_<kind>_train``; the
YAML files of that kind name them in their defaults list. One dataclass per
config group, owned by the task that reads it: nothing is mirrored.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantbench.registry import Registry
from quantbench.training.config import ModelConfig

__all__ = ["TASK_KINDS", "TaskKind"]


@dataclass(frozen=True)
class TaskKind:
    """A kind of task (classification, detection) and the schemas of its config groups.

    Attributes:
        adapter: Import path of its :class:`~quantbench.training.protocol.TaskAdapter` class
            (what ``conf/task/*.yaml`` names as ``_target_``).
        data: Schema of its ``conf/data/*.yaml`` files.
        train: Schema of its ``conf/train/*.yaml`` files (``baseline`` and ``qat`` recipes).
        model: Schema of ``conf/model/*.yaml`` (shared by the kinds unless one needs more).
    """

    adapter: str
    data: type
    train: type
    model: type = ModelConfig


#: kind name -> :class:`TaskKind`.
TASK_KINDS: Registry[TaskKind] = Registry("task kind", hint="(a task package registers its kind on import)")
