"""Before N jobs run at once on this machine: their order, and the float baselines they share.

Two things would make a local parallel sweep (``--jobs N``) slower than it has
to be, and are cheap to avoid before the launcher starts:

* **The tail.** Hydra makes the jobs in grid order, QAT schemes last, and
  QAT runs take several times longer than PTQ runs. Dispatched last, one long
  QAT run keeps a single worker busy after the others have finished. QAT
  schemes go first (longest processing time first, the classic greedy
  schedule).
* **The float baseline.** Every run of a model needs the same baseline; a
  task without pretrained weights trains it once and caches it. In a
  parallel sweep the first jobs of a model would all need it at once: one
  trains it with 1/N of the cores while the others wait for it. Missing
  baselines are therefore trained here first, using every core (one
  baseline with all of them, or up to N at once, each with its share), and
  only for models that still have unfinished runs.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Mapping, Sequence

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from joblib import Parallel, delayed

from quantbench.errors import DataError
from quantbench.harness.config import compose_config, resolve_tree
from quantbench.harness.run import build_task, check_config, resolve_threads
from quantbench.harness.tracking import Store, error_line, run_hash

__all__ = ["longest_first", "sweep_values", "warm_baselines"]

log = logging.getLogger(__name__)


def sweep_values(params: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, list[str]]:
    """Each swept key and its values, as Hydra's basic sweeper sees them (the command line replaces params)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    values: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_discrete_sweep():
            values[override.get_key_element()] = [str(v) for v in override.sweep_string_iterator()]
        elif override.get_key_element() in values:
            values[override.get_key_element()] = [override.get_value_element_as_str()]
    return values


def _with(base: Sequence[str], assignments: Sequence[str]) -> list[str]:
    """``base`` (one job's overrides) with ``assignments`` replacing the same keys."""
    keys = {a.split("=", 1)[0] for a in assignments}
    return [o for o in base if o.split("=", 1)[0].lstrip("+~") not in keys] + list(assignments)


def longest_first(values: Mapping[str, list[str]], base: Sequence[str]) -> list[str]:
    """A ``scheme=...`` override that lists the QAT schemes first (empty when there is nothing to move).

    ``base``: the overrides of one job (no sweeps).
    """
    schemes = values.get("scheme", [])
    qat = [s for s in schemes if compose_config(_with(base, [f"scheme={s}"])).scheme.qat]
    ordered = qat + [s for s in schemes if s not in qat]
    return [] if ordered == schemes else [f"scheme={','.join(ordered)}"]


def _jobs(values: Mapping[str, list[str]]) -> list[list[str]]:
    keys = list(values)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values.values())]


def _baseline_identity(tree: Mapping[str, Any]) -> str:
    """What a float baseline depends on, as the harness sees it (the task refines it with its own key)."""
    return json.dumps({k: tree[k] for k in ("task", "data", "model")} | {"train": tree["train"]["baseline"]},
                      sort_keys=True, default=str)


def _build_baseline(tree: Mapping[str, Any], threads: int) -> str | None:
    """Train or load one float baseline (in a worker); a data error comes back as its line, others are logged."""
    if not logging.getLogger().handlers:  # a fresh worker process: show its training progress too
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s [%(processName)s]: %(message)s")
    torch.set_num_threads(threads)
    try:
        build_task(tree).build_model()
    except Exception as exc:
        if isinstance(exc, DataError):
            return error_line(exc, typed=False)
        log.warning("float baseline of %s: %s; its runs will report it", tree["model"]["name"], error_line(exc))
    return None


def warm_baselines(base: Sequence[str], values: Mapping[str, list[str]], store: Store, jobs: int = 1) -> int:
    """Train (or load) the float baseline of every model that has an unfinished run; returns how many.

    ``base``: the overrides of one job (no sweeps); ``values``: the swept keys.
    Up to ``jobs`` baselines train at once, in joblib worker processes that
    share the cores (one baseline trains in this process with all of them).

    Models with pretrained weights or a checkpoint have nothing to train. A
    data set that is missing or corrupt stops the sweep here, as it would in
    every job; any other problem is left to the job, which records it.

    Raises:
        DataError: the task reported missing or corrupt data.
    """
    todo: dict[str, dict[str, Any]] = {}
    for job in _jobs(values):
        tree = resolve_tree(compose_config(_with(base, job)))
        model = tree["model"]
        if model.get("pretrained") or model.get("checkpoint"):
            continue
        chash = run_hash(tree)
        if tree["run"]["force"] or store.find_finished(tree["tracking"]["experiment"], chash) is None:
            todo.setdefault(_baseline_identity(tree), tree)
    if not todo:
        return 0
    for tree in todo.values():
        check_config(tree)
    workers = max(1, min(jobs, len(todo)))
    threads = max(1, resolve_threads(0) // workers)
    log.info("float baselines of %s before the parallel jobs start (%d at a time, %d threads each)",
             ", ".join(t["model"]["name"] for t in todo.values()), workers, threads)
    if workers == 1:
        before = torch.get_num_threads()
        try:
            errors = [_build_baseline(tree, threads) for tree in todo.values()]
        finally:
            torch.set_num_threads(before)
    else:
        errors = Parallel(n_jobs=workers, backend="loky")(
            delayed(_build_baseline)(tree, threads) for tree in todo.values())
    for line in errors:
        if line:
            raise DataError(line)
    return len(todo)
