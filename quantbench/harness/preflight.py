"""Check a command line's Hydra overrides before anything runs, and say in one line what to type instead.

Hydra reports a bad override as a multi-line block (a list of options that
includes internal schema bases, the config search path, a link), and, inside
a job, exits 1. The command line calls :func:`check_overrides` first, in its
own process and before torch or MLflow are imported:

* every override parses (Hydra's grammar);
* every value of a config group (``model=...``, ``scheme=a,b``, each value
  of a sweep list) names a file in ``conf/<group>/``; otherwise the error
  suggests close matches, lists the choices (never the internal ``base_*``
  schemas), and, for ``model``, points to ``model.name=`` for any
  torchvision or timm model;
* the config composes against the schema, for the first job and once per
  swept value, so a bad value in the second position of a sweep list is
  caught too;
* the tracking URI can work, and ``run.runtime`` names a runtime that is installed.

:func:`sweep_file` resolves a command's task and ``--grid`` to its sweep file
(``conf/sweep/TASK.yaml``, or the named grid ``conf/sweep/TASK_GRID.yaml``);
an unknown task or grid is a :class:`~quantbench.errors.UsageError` listing
the ones there are.

Failures are :class:`~quantbench.errors.ConfigError`: one line, exit status 2.
:func:`explain` turns any Hydra or OmegaConf error into such a line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from quantbench.errors import ConfigError, UsageError
from quantbench.harness.paths import CONF_DIR, check_tracking_uri, known_options
from quantbench.registry import close_matches

__all__ = ["MODEL_NAME_HINT", "SweepFile", "check_group_values", "check_overrides", "explain", "check_task",
           "job_variants", "parse", "sweep_file", "sweep_grids", "sweep_tasks"]

#: How to use a model that has no file in conf/model: the README says the same.
MODEL_NAME_HINT = ("for any torchvision or timm model set model.name instead (e.g. model=resnet18 "
                   "model.name=efficientnet_b0, or model.name=timm:convnext_atto)")

_NOISE = re.compile(r"^\s*(full_key:|reference_type=|object_type=|Config search path|provider=|See https://hydra"
                    r"|Set the environment variable HYDRA_FULL_ERROR)")


def _groups() -> set[str]:
    return {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*") if p.is_dir()}


def parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as exc:
            reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "syntax error")
            raise ConfigError(f"{text}: not a valid override ({reason}); write KEY=VALUE, a sweep as KEY=a,b, "
                              "quote values with spaces or brackets") from exc
    return parsed


def _values(override: Any) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def _grid_owner(stem: str, tasks: Sequence[str]) -> str | None:
    """The task whose named grid ``conf/sweep/<stem>.yaml`` is (``digits_hard`` -> ``digits``), else None."""
    owners = [t for t in tasks if stem.startswith(f"{t}_") and len(stem) > len(t) + 1]
    return max(owners, key=len) if owners else None


def sweep_tasks() -> list[str]:
    """The tasks ``quantbench sweep TASK`` knows: the files of conf/sweep that are no task's named grid."""
    tasks = known_options("task")
    return [s for s in known_options("sweep") if _grid_owner(s, tasks) is None]


def sweep_grids(task: str) -> list[str]:
    """The named grids of ``task``: ``hard`` for ``conf/sweep/<task>_hard.yaml`` (``--grid hard``)."""
    tasks = known_options("task")
    return [s[len(task) + 1:] for s in known_options("sweep") if _grid_owner(s, tasks) == task]


@dataclass(frozen=True)
class SweepFile:
    """The sweep file a command reads: the task's own grid ``conf/sweep/TASK.yaml``, or the named grid
    ``conf/sweep/TASK_GRID.yaml`` (``--grid GRID``, ``make ... SWEEP=GRID``).

    Its ``name`` keys everything a grid owns: ``sweep=<name>`` (the jobs' config), the default
    sweep id, ``reports/<name>.md``, the README markers and ``conf/gates/<name>.yaml``.
    """

    task: str
    grid: str | None = None

    @property
    def name(self) -> str:
        return self.task if self.grid is None else f"{self.task}_{self.grid}"

    @property
    def path(self) -> str:
        return f"conf/sweep/{self.name}.yaml"

    def make(self, target: str) -> str:
        """``make sweep TASK=digits SWEEP=hard``: the make command of ``target`` for this grid."""
        return f"make {target} TASK={self.task}" + (f" SWEEP={self.grid}" if self.grid else "")

    def command(self, command: str) -> str:
        """``quantbench sweep digits --grid hard``: the command line of ``command`` for this grid."""
        return f"quantbench {command} {self.task}" + (f" --grid {self.grid}" if self.grid else "")

    def describe(self) -> str:
        """``task 'digits'`` or ``task 'digits' (grid 'hard')``: how messages name it."""
        return f"task {self.task!r}" + (f" (grid {self.grid!r})" if self.grid else "")


def check_task(task: str) -> None:
    """``quantbench sweep TASK`` needs ``conf/sweep/TASK.yaml`` (a task's own sweep, not a named grid).

    Raises:
        UsageError: one line with close matches and the tasks there are.
    """
    tasks = sweep_tasks()
    if task in tasks:
        return
    owner = _grid_owner(task, known_options("task"))
    if owner is not None and task in known_options("sweep"):
        grid = task[len(owner) + 1:]
        raise UsageError(f"{task!r} is the {grid} grid of task {owner!r} ({SweepFile(owner, grid).path}): "
                         f"name the task and the grid, {SweepFile(owner, grid).command('sweep')} "
                         f"({SweepFile(owner, grid).make('sweep')})")
    close = close_matches(task, tasks)
    raise UsageError(f"no sweep for task {task!r} (conf/sweep/{task}.yaml)"
                     + (f"; did you mean {' or '.join(close)}?" if close else "") + f" Tasks: {', '.join(tasks)}")


def sweep_file(task: str, grid: str | None = None) -> SweepFile:
    """The sweep file of ``task`` and its named ``grid`` (None: the task's own ``conf/sweep/TASK.yaml``).

    Raises:
        UsageError: an unknown task, or a grid the task has no file for: one line with the close
            matches and the grids there are.
    """
    check_task(task)
    if grid is None:
        return SweepFile(task)
    grids = sweep_grids(task)
    if grid not in grids:
        close = close_matches(grid, grids)
        known = (f"Grids of {task}: {', '.join(grids)}" if grids
                 else f"Task {task!r} has no named grid (conf/sweep/{task}_<grid>.yaml)")
        raise UsageError(f"--grid {grid}: no such grid of task {task!r} (conf/sweep/{task}_{grid}.yaml)"
                         + (f"; did you mean {' or '.join(close)}?" if close else ".")
                         + f" {known}; without --grid: {SweepFile(task).path}")
    return SweepFile(task, grid)


def check_group_values(key: str, values: Iterable[str]) -> None:
    """Each value of config group ``key`` must be a file in ``conf/<key>/``.

    Raises:
        ConfigError: one line with close matches, the choices and (for ``model``) the ``model.name`` hint.
    """
    choices = known_options(key)
    for value in values:
        if value in choices:
            continue
        close = close_matches(value, choices)
        line = f"{key}={value}: no such {key} config (conf/{key}/{value}.yaml)."
        if close:
            line += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        line += f" Choices: {', '.join(choices)}"
        if key == "model":
            line += f"; {MODEL_NAME_HINT}"
        raise ConfigError(line)


def _check_groups(parsed: Sequence[Any]) -> None:
    groups = _groups()
    for override in parsed:
        key = override.key_or_group
        if key in groups and not key.startswith("hydra") and not override.is_delete():
            check_group_values(key, _values(override))


def job_variants(parsed: Sequence[Any]) -> list[list[str]]:
    """The first job, then one job per further value of each swept key (the others at their first value)."""
    from quantbench.harness.config import first_job_overrides

    first = first_job_overrides([o.input_line for o in parsed])
    variants = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in _values(override)[1:]:
                variants.append([*first[:i], f"{override.get_key_element()}={value}", *first[i + 1:]])
    return variants


def check_overrides(overrides: Sequence[str], *, compose: bool = True) -> list[Any]:
    """Check a run's or a sweep's overrides; returns the composed configs of :func:`job_variants`
    (the first job first), or ``[]`` without ``compose``.

    Raises:
        ConfigError: the first bad override, as one line.
    """
    from omegaconf import OmegaConf

    from quantbench.harness.config import compose_config
    from quantbench.harness.schema import check_runtime

    parsed = parse(list(overrides))
    _check_groups(parsed)
    if not compose:
        return []
    jobs = []
    for variant in job_variants(parsed):
        try:
            cfg = compose_config(variant)
            tracking = OmegaConf.to_container(cfg.tracking, resolve=True)
        except Exception as exc:
            if not _is_config_error(exc):
                raise
            raise ConfigError(explain(exc, variant)) from exc
        check_tracking_uri(tracking.get("uri"))
        check_runtime(str(cfg.run.runtime))
        jobs.append(cfg)
    return jobs


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (HydraException, OmegaConfBaseException))


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _override_for(key: str, overrides: Sequence[str]) -> str:
    for text in overrides:
        if text.lstrip("+~").split("=", 1)[0] == key:
            return text
    return key


def explain(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """One line for a Hydra / OmegaConf error: the override at fault, what is wrong, what to type instead."""
    from hydra.errors import MissingConfigException

    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if isinstance(exc, MissingConfigException) and missing:
        group, name = missing.groups()
        try:
            check_group_values(group, [name])
        except ConfigError as err:
            return str(err)
    for cause in _causes(exc):
        full_key = getattr(cause, "full_key", None)
        parent = getattr(cause, "parent_node", None)
        key = getattr(cause, "key", None)
        if not full_key:
            continue
        message = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        if "not in" in message and parent is not None and key is not None:  # an unknown key
            known = [str(k) for k in parent.keys() if str(k) != "hydra"] if hasattr(parent, "keys") else []
            where = full_key.rsplit(".", 1)[0] if "." in full_key else "the config"
            close = close_matches(str(key), known)
            hint = f"did you mean {' or '.join(f'{where}.{c}' if where != 'the config' else c for c in close)}? " \
                if close else ""
            return (f"{_override_for(_requested_key(text, full_key), overrides)}: {where} has no key {key!r}; "
                    f"{hint}its keys: {', '.join(known)}")
        return f"{_override_for(full_key, overrides)}: {message}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _NOISE.match(ln)]
    return "; ".join(lines) or type(exc).__name__


def _requested_key(text: str, fallback: str) -> str:
    found = re.search(r"Could not override '([^']+)'", text)
    return found.group(1) if found else fallback
