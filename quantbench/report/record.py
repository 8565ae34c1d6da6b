"""The runs of record: which sweep a report or a gate reads, and its one run per model x scheme.

A results table must come from one sweep of one config, never from whatever ran
last: a one-epoch smoke run or a half-finished sweep must not land in the README.
Reports and gates therefore read *the runs of record*:

* **The grid**: the models x schemes that ``quantbench sweep TASK <overrides>``
  runs: the sweep file's lists, each replaced by the overrides' value(s) of the
  same key, as Hydra's basic sweeper does (a gate file's ``models``/``schemes``
  replace them for the gate). So a report or gate is given the overrides the
  sweep was given (CI: ``model=resnet18 scheme=float,ptq_pow2 task.cache_dir=...``).
  A task's named grid (``--grid hard``: ``conf/sweep/TASK_hard.yaml``) is read
  the same way; its sweep file logs to an MLflow experiment of its own
  (``tracking.experiment: TASK_hard``), so its runs are never among the task's
  own grid's, even in the cells both grids share (same config, same hash).
* **The config**: each cell's config hash is computed from the config that
  cell's job composes (``sweep=<sweep file>``, the overrides, ``model=M scheme=S``), as
  the harness computes the ``config_hash`` tag (:func:`quantbench.harness.tracking.run_hash`).
  A run counts for a cell only when its tag equals that hash, so a run of
  another config (a smoke run, other epochs, another data root) never counts.
  The hash is the harness's own definition of "the same measurement" (resume
  skips on it): it covers every resolved leaf but the tracking node and the
  settings that do not change a result (``HASH_EXCLUDE``: the store's URI,
  ``run.threads``, ...), and needs no hand-kept list of "params that matter".
  A recipe changed in ``conf/`` changes the hash: sweeps of the old recipe no
  longer match, and the report asks for a new sweep.
* **The sweep**: runs are grouped by their ``sweep`` tag (``quantbench sweep
  --id``, default ``TASK-<time>``). Ad-hoc runs (``quantbench run``: tag
  ``adhoc-<time>``) belong to no sweep and are never read. A sweep's run of a
  cell is its newest run of that cell with the cell's hash. A cell that a sweep
  has no run of may be one it *skipped* because a FINISHED run of the same
  config was already in the store (a sweep killed, then run again under a new
  id): the newest such run of an earlier sweep (one that started before this
  sweep's last run) stands in, and the report names it. A sweep run with
  ``run.force=true`` skips nothing, so nothing stands in for its cells.
* **Complete**: every cell's run is FINISHED. By default the newest complete
  sweep is the record; ``--sweep ID`` names one; ``--partial`` accepts an
  incomplete one (the newest, or ID), which the report labels partial.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from quantbench.errors import BadInputError
from quantbench.harness.config import (
    CONF_DIR,
    GRID_AXES,
    compose_config,
    resolve_tree,
    sweep_engines,
    sweep_grid,
)
from quantbench.harness.paths import project_root
from quantbench.harness.preflight import parse, sweep_file
from quantbench.harness.tracking import Store, flatten, hashed, run_exclude, run_hash
from quantbench.report.runs import NATIVE_ENGINE as NATIVE
from quantbench.report.runs import engine_of, load_runs, task_store

__all__ = ["ADHOC_PREFIX", "Grid", "ReportError", "Selection", "SweepRecord", "is_sweep_id", "resolve_grid",
           "select", "sweep_records"]

#: The ``sweep`` tag of a run that ``quantbench run`` made outside a sweep (``tracking.sweep_id``'s default).
ADHOC_PREFIX = "adhoc-"
GRID_KEYS = GRID_AXES
_SHOWN = 4  # cells, sweeps or keys named in one line before "..."

Cell = tuple[str, str, str]  # model, scheme, engine


class ReportError(BadInputError):
    """Nothing to report or gate: no sweep of the config, an unknown or incomplete sweep, a README
    without the table's markers. The one-line message says what to run or pass."""


def is_sweep_id(tag: object) -> bool:
    """True for the ``sweep`` tag of a sweep's run; False for an ad-hoc run's (or none)."""
    return isinstance(tag, str) and bool(tag) and not tag.startswith(ADHOC_PREFIX)


def _shorten(items: Sequence[str], n: int = _SHOWN) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _row_cell(row) -> Cell:
    return (row["model"], row["scheme"], engine_of(row))


def _run_cells(runs: pd.DataFrame) -> list[Cell]:
    engines = runs["engine"] if "engine" in runs else [None] * len(runs)
    return [(m, s, engine_of(e)) for m, s, e in zip(runs["model"], runs["scheme"], engines)]


def _label(cell: Cell) -> str:
    return f"{cell[0]} x {cell[1]}" + (f" x {cell[2]}" if cell[2] != NATIVE else "")


@dataclass(frozen=True)
class Grid:
    """The cells a report or gate reads and the config hash each cell's run must carry."""

    task: str
    models: tuple[str, ...]
    schemes: tuple[str, ...]
    hashes: Mapping[Cell, str]
    params: Mapping[Cell, Mapping[str, str]] = field(repr=False)  # each cell's logged params, for messages
    excluded: Mapping[Cell, tuple[str, ...]] = field(repr=False)  # what each cell's hash leaves out
    engines: tuple[str, ...] = (NATIVE,)

    @property
    def cells(self) -> list[Cell]:
        """Model-major, then scheme, then engine, in the sweep file's (or the overrides') order: the table's order."""
        return [(m, s, e) for m in self.models for s in self.schemes for e in self.engines]

    def cell(self, model: str, scheme: str, engine: str = NATIVE) -> Cell:
        return (model, scheme, engine)


def resolve_grid(task: str, overrides: Iterable[str] = (), *, models: Sequence[str] | None = None,
                 schemes: Sequence[str] | None = None, grid: str | None = None) -> Grid:
    """The grid of ``quantbench sweep TASK [--grid GRID] <overrides>`` (or ``models`` x ``schemes``) and each
    cell's hash.

    Raises:
        ReportError: the overrides sweep over another key (several runs per model x scheme).
    """
    parsed = parse(list(overrides))
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override() and o.key_or_group not in GRID_KEYS]
    if swept:
        raise ReportError(f"{swept[0]}: a report or gate reads one run per model x scheme, and this sweeps "
                          f"{swept[0]} too; give it the one value to read")
    name = sweep_file(task, grid).name
    base = [f"sweep={name}", *(o.input_line for o in parsed if o.key_or_group not in GRID_KEYS)]
    swept_models, swept_schemes = sweep_grid(task, [o.input_line for o in parsed], grid=grid)
    models = tuple(models or swept_models)
    schemes = tuple(schemes or swept_schemes)
    engines = tuple(sweep_engines(task, [o.input_line for o in parsed], grid=grid))
    # The tracking node is left out of every hash (HASH_EXCLUDE) and of the differences messages name,
    # so the cells are composed without its overrides, and once per process for the same conf/ files.
    untracked = tuple(o.input_line for o in parse(list(base[1:])) if o.key_or_group.split(".")[0] != "tracking")
    hashes, params, excluded = _cells(name, untracked, tuple((m, s, e) for m in models for s in schemes
                                                             for e in engines), _conf_stamp())
    return Grid(task, models, schemes, hashes, params, excluded, engines)


def _conf_stamp() -> int:
    """Changes when a file of conf/ changes: a new key for :func:`_cells`."""
    return max((p.stat().st_mtime_ns for p in CONF_DIR.rglob("*.yaml")), default=0)


@functools.lru_cache(maxsize=16)
def _cells(name: str, overrides: tuple[str, ...], cells: tuple[Cell, ...],
           stamp: int) -> tuple[dict[Cell, str], dict[Cell, dict[str, str]], dict[Cell, tuple[str, ...]]]:
    """Each cell's hash, logged params and what its hash leaves out: one compose per cell (about 0.1 s each)
    of sweep file ``name``."""
    hashes, params, excluded = {}, {}, {}
    for cell in cells:
        job = compose_config([f"sweep={name}", *overrides, f"model={cell[0]}", f"scheme={cell[1]}",
                              f"engine={cell[2]}"])
        tree = resolve_tree(job)
        hashes[cell], params[cell], excluded[cell] = run_hash(tree), flatten(tree), run_exclude(tree)
    return hashes, params, excluded


@dataclass
class SweepRecord:
    """One sweep's run of each cell of a grid (any status), and the cells an earlier sweep's run stands in for."""

    sweep_id: str
    grid: Grid
    cells: dict[Cell, pd.Series]
    reused: dict[Cell, str]  # cell -> the sweep id of the run that stands in for it
    first_start: pd.Timestamp
    last_start: pd.Timestamp

    @property
    def finished(self) -> list[Cell]:
        return [c for c in self.grid.cells if c in self.cells and self.cells[c]["status"] == "FINISHED"]

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.grid.cells)

    def gaps(self) -> list[str]:
        """``model x scheme [x engine] STATUS`` of every cell without a FINISHED run (``missing``: no run at all)."""
        return [f"{_label(c)} {self.cells[c]['status'] if c in self.cells else 'missing'}"
                for c in self.grid.cells if c not in self.finished]

    def summary(self) -> str:
        """``3 of 14 model x scheme cells FINISHED`` (``model x scheme x engine`` in an engines grid), and what
        the others are."""
        axes = "model x scheme" + (" x engine" if len(self.grid.engines) > 1 else "")
        text = f"{len(self.finished)} of {len(self.grid.cells)} {axes} cells FINISHED"
        gaps = self.gaps()
        return text + (f" ({_shorten(gaps)})" if gaps else "")

    def frame(self, *, finished_only: bool = True) -> pd.DataFrame:
        """The runs in grid order, with a ``reused_from`` column (the stand-in's sweep id, else empty)."""
        rows = [self.cells[c].copy() for c in self.grid.cells
                if c in self.cells and (not finished_only or self.cells[c]["status"] == "FINISHED")]
        for row in rows:
            row["reused_from"] = self.reused.get(_row_cell(row), "")
        return pd.DataFrame(rows).reset_index(drop=True)

    def git_shas(self) -> list[str]:
        """The distinct commits the runs ran at (12 characters, ``+dirty`` kept)."""
        shas = [str(r.get("git_sha") or "unknown") for r in self.cells.values()]
        return list(dict.fromkeys(s[:12] + ("+dirty" if s.endswith("+dirty") else "") for s in shas))


def sweep_records(runs: pd.DataFrame, grid: Grid) -> list[SweepRecord]:
    """Every sweep with a run of the grid's config, newest first (by its newest run's start)."""
    if runs.empty:
        return []
    runs = runs.assign(_cell=_run_cells(runs))
    keep = [grid.hashes.get(c) == h and is_sweep_id(s) for c, h, s in zip(runs["_cell"], runs["config_hash"],
                                                                          runs["sweep"])]
    swept = runs.loc[np.array(keep, dtype=bool)].sort_values("start_time", ascending=False, kind="stable")
    records = []
    for sweep_id, own in swept.groupby("sweep", sort=False):
        cells = {row["_cell"]: row for _, row in own.drop_duplicates("_cell").iterrows()}  # newest per cell
        last = own["start_time"].max()
        reused: dict[Cell, str] = {}
        if not own["force"].any():  # a forced sweep skipped nothing: nothing stands in for it
            donors = swept[(swept["sweep"] != sweep_id) & (swept["status"] == "FINISHED")
                           & (swept["start_time"] < last)].drop_duplicates("_cell")
            for _, row in donors.iterrows():
                if row["_cell"] not in cells:
                    cells[row["_cell"]] = row
                    reused[row["_cell"]] = str(row["sweep"])
        records.append(SweepRecord(str(sweep_id), grid, cells, reused, own["start_time"].min(), last))
    return sorted(records, key=lambda r: r.last_start, reverse=True)


@dataclass
class Selection:
    """The sweep of record, and the newer sweeps of the same config that were not read."""

    record: SweepRecord
    store: Store
    newer: list[SweepRecord] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return not self.record.complete

    def notes(self) -> list[str]:
        """One line per thing a reader should know that the table does not show."""
        out = []
        if self.partial:
            out.append(f"PARTIAL: sweep {self.record.sweep_id} is incomplete: {self.record.summary()}")
        for r in self.newer:
            out.append(f"newer sweep {r.sweep_id} not read: {r.summary()}")
        return out


def _uri(store: Store) -> str:
    return store.uri.replace(f"{project_root()}/", "")


def _sweep_ids(runs: pd.DataFrame) -> list[str]:
    """Every sweep id of the experiment (any config), newest first."""
    if runs.empty:
        return []
    newest = runs.sort_values("start_time", ascending=False, kind="stable")["sweep"]
    return [s for s in dict.fromkeys(newest) if is_sweep_id(s)]


def _config_difference(sweep_id: str, runs: pd.DataFrame, grid: Grid) -> str:
    """How sweep ``sweep_id``'s runs differ from the grid's config, in a few ``key=value`` words."""
    own = runs.loc[(runs["sweep"] == sweep_id).to_numpy(dtype=bool)]
    inside = own.loc[np.array([c in grid.hashes for c in _run_cells(own)], dtype=bool)]
    if inside.empty:
        cells = list(dict.fromkeys(_label(c) for c in _run_cells(own)))
        return (f"its cells ({_shorten(cells, 2)}) are not in the grid "
                f"({','.join(grid.models)} x {','.join(grid.schemes)}): pass its model=/scheme= overrides")
    row = inside.iloc[0]
    cell = _row_cell(row)
    expected, logged = grid.params[cell], row["params"]
    keys = sorted(k for k in set(expected) | set(logged)
                  if expected.get(k) != logged.get(k) and hashed(k, grid.excluded[cell]))
    if not keys:
        return "its config hash differs (the code that hashes configs changed?)"
    shown = [f"{k}={str(logged.get(k, '(unset)'))[:60]} (here {str(expected.get(k, '(unset)'))[:60]})"
             for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"it ran {', '.join(shown)}{more}: pass the sweep's own overrides"


def select(task: str, overrides: Iterable[str] = (), *, sweep: str | None = None, partial: bool = False,
           models: Sequence[str] | None = None, schemes: Sequence[str] | None = None,
           newest_if_none_complete: bool = False, grid: str | None = None) -> Selection:
    """The runs of record of ``task`` for the config of ``overrides`` (see the module docstring).

    Args:
        grid: the task's named grid (``hard``: ``conf/sweep/<task>_hard.yaml``); None: the task's own.
        sweep: read this sweep id (default: the newest complete sweep).
        partial: accept an incomplete sweep: ``sweep``, or else the newest one.
        models, schemes: the grid (default: the sweep's, after ``overrides``).
        newest_if_none_complete: with no complete sweep, read the newest one (a gate, whose missing
            and FAILED cells then fail) instead of raising.

    Raises:
        ReportError: no sweep of the config; ``sweep`` unknown, of another config, or incomplete
            without ``partial``; no complete sweep without ``partial``.
    """
    overrides = list(overrides)
    source = sweep_file(task, grid)
    cells = resolve_grid(task, overrides, models=models, schemes=schemes, grid=grid)
    store, experiment = task_store(task, overrides, grid=grid)
    runs = load_runs(store, experiment)
    records = sweep_records(runs, cells)
    where = f"{source.describe()} in {_uri(store)}"
    rerun = source.make("sweep")
    known = _sweep_ids(runs)
    if sweep is not None:
        if sweep not in known:
            close = difflib.get_close_matches(sweep, known, n=3, cutoff=0.6)
            what = (f"{sweep!r} is an ad-hoc run (quantbench run), not a sweep" if sweep.startswith(ADHOC_PREFIX)
                    and sweep in set(runs["sweep"]) else f"unknown sweep {sweep!r}")
            listing = (f"known sweeps, newest first: {_shorten(known, 10)}" if known
                       else f"it has no sweeps: run `{rerun}`")
            raise ReportError(f"--sweep {sweep}: {what} for {where}"
                              + (f"; did you mean {' or '.join(close)}?" if close else "") + f"; {listing}")
        record = next((r for r in records if r.sweep_id == sweep), None)
        if record is None:
            raise ReportError(f"--sweep {sweep}: sweep {sweep!r} of {where} ran another config than "
                              f"{source.path} with these overrides: {_config_difference(sweep, runs, cells)}")
        if not record.complete and not partial:
            raise ReportError(f"--sweep {sweep}: sweep {sweep!r} of {where} is incomplete: {record.summary()}; "
                              f"complete it ({source.command('sweep')} --id {sweep} and the sweep's overrides), "
                              "or add --partial to read it as it is")
    elif not records:
        if runs.empty:
            raise ReportError(f"no runs of {where}; run `{rerun}` first")
        others = [s for s in known if s not in {r.sweep_id for r in records}]
        if others:
            detail = (f"the sweeps there ran other configs ({_shorten(others)}; {others[0]}: "
                      f"{_config_difference(others[0], runs, cells)})")
        else:
            detail = "it holds only ad-hoc runs (quantbench run), which are never reported"
        raise ReportError(f"no sweep of the config of {source.path} with these overrides in {where}: "
                          f"{detail}; or run `{rerun}`")
    else:
        complete = [r for r in records if r.complete]
        if complete and not partial:
            record = complete[0]
        elif partial or newest_if_none_complete:
            record = records[0]
        else:
            raise ReportError(f"no complete sweep of {where}: the newest, {records[0].sweep_id!r}, has "
                              f"{records[0].summary()}; run `{rerun}` (it redoes only what is "
                              f"missing), or add --partial to read {records[0].sweep_id!r} as it is")
    newer = [r for r in records if r.last_start > record.last_start]
    return Selection(record, store, newer)
