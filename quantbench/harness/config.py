"""Composing quantbench's Hydra config outside a Hydra job (CLI, reports, gates, tests)."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any, Iterable, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from quantbench.harness.paths import CONF_DIR, known_options

__all__ = ["CONF_DIR", "compose_config", "first_job_overrides", "known_options", "resolve_tree", "sweep_engines", "sweep_grid"]


#: How many composed configs :func:`compose_config` keeps (last used first).
COMPOSED_KEPT = 64
_COMPOSED: OrderedDict[tuple, DictConfig] = OrderedDict()


def _conf_stamp() -> tuple:
    """Every YAML file under ``conf/`` with its size and modification time: a config composed before
    any of them changed is not reused."""
    stamps = []
    for path in CONF_DIR.rglob("*.yaml"):
        try:
            st = path.stat()
        except OSError:  # removed while listed
            continue
        stamps.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(sorted(stamps))


def compose_config(overrides: Iterable[str] = (), *, hydra_config: bool = False) -> DictConfig:
    """The primary config with ``overrides``, validated against the schema.

    Hydra takes a quarter of a second to compose one; a CLI command, a report or a gate composes the
    same overrides several times. So the composed configs are kept for the process (keyed by the
    overrides, ``conf/``'s files and their stamps, and for Hydra's node the working directory it
    records) and each call gets a copy of its own. A composition that fails is never kept.
    """
    overrides = list(overrides)
    key = (tuple(overrides), hydra_config, os.getcwd() if hydra_config else None, _conf_stamp())
    if key in _COMPOSED:
        _COMPOSED.move_to_end(key)
        return copy.deepcopy(_COMPOSED[key])
    # The schema imports the engine's spec (torch): only when composing.
    from quantbench.harness.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="quantbench"):
        cfg = compose("config", overrides=overrides, return_hydra_config=hydra_config)
    _COMPOSED[key] = copy.deepcopy(cfg)
    while len(_COMPOSED) > COMPOSED_KEPT:
        _COMPOSED.popitem(last=False)
    return cfg


def resolve_tree(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain, resolved containers, without Hydra's own node."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    tree = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    tree.pop("hydra", None)
    return tree


def first_job_overrides(overrides: Iterable[str]) -> list[str]:
    """Sweep overrides (``a=1,2``) reduced to their first value: the config of a sweep's first job."""
    out = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            out.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        else:
            out.append(override.input_line)
    return out


def _values(key: str, spec: str) -> list[str]:
    override = OverridesParser.create().parse_overrides([f"{key}={spec}"])[0]
    if override.is_discrete_sweep():
        return [str(v) for v in override.sweep_string_iterator()]
    return [override.get_value_element_as_str()]


#: The config groups a sweep's grid spans: a report's rows and columns.
GRID_AXES = ("model", "scheme", "engine")


def _swept(task: str, overrides: Iterable[str], grid: str | None, keys: tuple[str, ...]) -> dict[str, list[str]]:
    from quantbench.harness.preflight import sweep_file

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    name = sweep_file(task, grid).name
    cfg = compose_config([f"sweep={name}", *(o.input_line for o in parsed if o.key_or_group not in GRID_AXES)],
                         hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    values = {g: _values(g, str(params[g])) if g in params else [str(cfg[g].name)] for g in keys}
    for o in parsed:
        if o.key_or_group in keys:
            values[o.key_or_group] = ([str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override()
                                      else [o.get_value_element_as_str()])
    return values


def sweep_engines(task: str, overrides: Iterable[str] = (), *, grid: str | None = None) -> list[str]:
    """The engines that ``quantbench sweep TASK [--grid GRID] <overrides>`` runs, in order (``engine=`` of the
    sweep file or the overrides; ``quantbench`` alone by default)."""
    return _swept(task, overrides, grid, ("engine",))["engine"]


def sweep_grid(task: str, overrides: Iterable[str] = (), *, grid: str | None = None) -> tuple[list[str], list[str]]:
    """The models and schemes that ``quantbench sweep TASK [--grid GRID] <overrides>`` runs, in order.

    The sweep file's lists (``conf/sweep/TASK.yaml``, or ``conf/sweep/TASK_GRID.yaml``), each replaced
    by the overrides' value(s) of the same key (``model=resnet18``, ``scheme=float,ptq_pow2``), as
    Hydra's basic sweeper does.
    """
    values = _swept(task, overrides, grid, ("model", "scheme"))
    return values["model"], values["scheme"]
