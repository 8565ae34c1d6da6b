"""``make gate TASK=x``: accuracy gates over the runs of record (the sweep a report reads).

``conf/gates/<task>.yaml`` (a task's named grid: ``conf/gates/<task>_<grid>.yaml``, which a
grid need not have) lists checks, each for the model x scheme pairs its
patterns match: a minimum of a metric and/or a maximum drop of a metric from
the same run's float model (``float/<name>``). The gate reads one sweep's runs
(:mod:`quantbench.report.record`): the newest complete sweep of the task's
config, ``--sweep ID``, or, when no sweep is complete, the newest one. Every
pair of the grid (the gate file's ``models``/``schemes``, else the sweep's)
must have a run in it: a missing pair, a run that FAILED, or a missing metric
fails the gate like a regression does, so a gate can never pass by having
nothing to look at.

A gate file is checked when loaded: YAML that does not parse, an unknown key
(``max_dorp``) or a value of the wrong type is one line that names the file,
the line and the key, with the close matches (a :class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantbench.errors import ConfigError
from quantbench.harness.config import CONF_DIR
from quantbench.harness.preflight import sweep_file
from quantbench.registry import suggest
from quantbench.report.record import Selection, select
from quantbench.report.runs import engine_of, is_unsupported

__all__ = ["GateCheck", "GateFile", "GateOutcome", "GateResult", "check_gate", "evaluate_gates", "format_results",
           "load_gates", "passed", "run_gate"]


@dataclass
class GateCheck:
    """One check: ``metric >= min``, ``metric <= max``, ``float/<name> - metric <= max_drop`` and/or
    ``metric - (the best other engine's metric on the same model x scheme) >= min_vs_peers``.

    Drops are in the metric's own unit: percentage points for top-1, mAP
    (a fraction) for detection. ``engines`` selects the runs of an engines grid the check applies
    to (``[quantbench]``); ``min_vs_peers`` compares with the engines that ran the same model x
    scheme exactly (an engine that cannot express the scheme, or only approximates it, is no peer
    there; with no peer the comparison is not made).
    """

    metric: str = "quant/top1"
    models: list[str] = field(default_factory=lambda: ["*"])
    schemes: list[str] = field(default_factory=lambda: ["*"])
    engines: list[str] = field(default_factory=lambda: ["*"])
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    min_vs_peers: float | None = None

    def applies(self, model: str, scheme: str, engine: str = "quantbench") -> bool:
        return (any(fnmatch.fnmatchcase(model, p) for p in self.models)
                and any(fnmatch.fnmatchcase(scheme, p) for p in self.schemes)
                and any(fnmatch.fnmatchcase(engine, p) for p in self.engines))


@dataclass
class GateFile:
    """A task's gates; ``models``/``schemes`` default to the task's sweep grid."""

    models: list[str] | None = None
    schemes: list[str] | None = None
    checks: list[GateCheck] = field(default_factory=list)


@dataclass
class GateResult:
    model: str
    scheme: str
    check: str
    value: str
    limit: str
    passed: bool
    engine: str = "quantbench"


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (``conf/gates/digits.yaml``)."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def _key_lines(text: str) -> dict[tuple, int]:
    """The 1-based line of every mapping key and list item of a YAML text, by its path (``("checks", 0, "min")``)."""
    lines: dict[tuple, int] = {}

    def walk(node: Any, where: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*where, key.value)] = key.start_mark.line + 1
                walk(value, (*where, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*where, i)] = item.start_mark.line + 1
                walk(item, (*where, i))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:  # the lines are a courtesy; the data was loaded already
        pass
    return lines


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def load_gates(path: Path) -> GateFile:
    """Load and validate a gate file.

    Raises:
        ConfigError: the file is not there, is not YAML, has an unknown key or a value of the wrong type;
            one line with the file, the line and the key.
    """
    path = Path(path)
    shown = _shown(path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "gates").glob("*.yaml")))
        raise ConfigError(f"{shown}: no such gate file; pass an existing --file PATH (conf/gates/ holds {known})")
    text = path.read_text()
    try:  # OmegaConf's own YAML loader (1e-3 is a float), as OmegaConf.load reads a file
        data = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context or ""
        if exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            context += f" from line {exc.context_mark.line + 1}"
        problem = ": ".join(str(p) for p in (context, exc.problem) if p)
        raise ConfigError(f"{shown}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({problem}); "
                          "fix that line of the gate file") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{shown}: not a gate file ({first}); it is a YAML mapping with a checks: list") from None
    lines = _key_lines(text)

    def fail(where: tuple, message: str) -> ConfigError:
        line = next((lines[where[:n]] for n in range(len(where), 0, -1) if where[:n] in lines), None)
        key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where).lstrip(".")
        return ConfigError(f"{shown}{f':{line}' if line else ''}: {key + ': ' if key else ''}{message}")

    def check_value(where: tuple, value: Any) -> Any:
        key = where[-1]
        if key in ("min", "max", "max_drop", "min_vs_peers"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise fail(where, f"{value!r} is not a number; give a number, e.g. {key}: 1.0")
            return None if value is None else float(value)
        if key == "metric" and not (isinstance(value, str) and value):
            raise fail(where, f"{value!r}: name a logged metric, e.g. quant/top1")
        if key in ("models", "schemes", "engines") and value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise fail(where, f"{value!r} is not a list of names; write e.g. [{'resnet18' if key == 'models' else 'ptq_*'}]")
        return value

    if not isinstance(data, dict):
        raise fail((), "a gate file is a mapping with a checks: list (and optional models:, schemes:)")
    for key in data:
        if key not in _fields(GateFile):
            raise fail((key,), suggest(str(key), _fields(GateFile), "gate file key"))
    checks = data.get("checks")
    if not isinstance(checks, list) or not checks:
        raise fail(("checks",), "needs a list of checks (- metric: quant/top1 ... max_drop: 1.0)")
    parsed = []
    for i, check in enumerate(checks):
        if not isinstance(check, dict):
            raise fail(("checks", i), "a check is a mapping (metric:, and min:, max: or max_drop:)")
        for key in check:
            if key not in _fields(GateCheck):
                raise fail(("checks", i, key), suggest(str(key), _fields(GateCheck), "gate check key"))
        if all(check.get(k) is None for k in ("min", "max", "max_drop", "min_vs_peers")):
            raise fail(("checks", i), "checks nothing; give it min:, max:, max_drop: or min_vs_peers:")
        parsed.append(GateCheck(**{k: check_value(("checks", i, k), v) for k, v in check.items()}))
    return GateFile(models=check_value(("models",), data.get("models")),
                    schemes=check_value(("schemes",), data.get("schemes")), checks=parsed)


def _value(row: pd.Series, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or pd.isna(value) else float(value)


def _show(value: float | None) -> str:
    """Enough digits for both accuracies in percent (97.31) and mAP fractions (0.6123)."""
    return "missing" if value is None else f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _check(row: pd.Series, check: GateCheck, model: str, scheme: str,
           peers: dict[str, pd.Series] | None = None) -> list[GateResult]:
    results = []
    value = _value(row, check.metric)
    shown = _show(value)
    if check.min is not None:
        ok = value is not None and value >= check.min
        results.append(GateResult(model, scheme, f"{check.metric} >= min", shown, f"{check.min:g}", ok))
    if check.max is not None:
        ok = value is not None and value <= check.max
        results.append(GateResult(model, scheme, f"{check.metric} <= max", shown, f"{check.max:g}", ok))
    if check.max_drop is not None:
        ref = _value(row, "float/" + check.metric.split("/", 1)[-1])
        drop = None if value is None or ref is None else ref - value
        ok = drop is not None and drop <= check.max_drop
        results.append(GateResult(model, scheme, f"drop of {check.metric} from float",
                                  _show(drop), f"{check.max_drop:g}", ok))
    if check.min_vs_peers is not None:
        scores = {e: _value(r, check.metric) for e, r in (peers or {}).items()}
        scores = {e: v for e, v in scores.items() if v is not None}
        if scores:
            best = max(scores, key=scores.get)
            margin = None if value is None else value - scores[best]
            ok = margin is not None and margin >= check.min_vs_peers
            results.append(GateResult(model, scheme, f"{check.metric} - best peer's ({best})", _show(margin),
                                      f">= {check.min_vs_peers:g}", ok))
    return results


def _exact(row: pd.Series) -> bool:
    """A run of the scheme itself: quantbench's, or a peer's whose mapping is exact (not approximate)."""
    status = row.get("engine_status")
    return not isinstance(status, str) or status in ("", "supported")


def evaluate_gates(gates: GateFile, runs: pd.DataFrame, models: list[str], schemes: list[str],
                   engines: Iterable[str] = ("quantbench",)) -> list[GateResult]:
    """Apply ``gates`` to the newest run (any status) in ``runs`` of every model x scheme (x engine).

    A peer engine's run of a scheme it cannot express (``engine_status=unsupported``) needs only to
    have FINISHED: its metrics do not exist, and it is no peer in a ``min_vs_peers`` comparison."""
    engines = list(engines)
    newest: dict[tuple[str, str, str], pd.Series] = {}
    if len(runs):
        frame = runs.assign(_engine=[engine_of(e) for e in (runs["engine"] if "engine" in runs else [None] * len(runs))])
        for _, row in frame.sort_values("start_time", ascending=False).iterrows():
            newest.setdefault((row["model"], row["scheme"], row["_engine"]), row)
    results = []
    for model in models:
        for scheme in schemes:
            for engine in engines:
                row = newest.get((model, scheme, engine))
                if row is None:
                    results.append(GateResult(model, scheme, "run exists", "missing", "a FINISHED run", False, engine))
                elif row["status"] != "FINISHED":
                    results.append(GateResult(model, scheme, "run FINISHED", row["status"],
                                              (row.get("error") or "")[:80], False, engine))
                elif not is_unsupported(row):
                    peers = {e: r for e in engines if e != engine and (r := newest.get((model, scheme, e))) is not None
                             and r["status"] == "FINISHED" and _exact(r)}
                    for c in gates.checks:
                        if c.applies(model, scheme, engine):
                            for r in _check(row, c, model, scheme, peers):
                                r.engine = engine
                                results.append(r)
    return results


def format_results(results: Iterable[GateResult]) -> str:
    """A plain-text pass/fail table."""
    results = list(results)
    several = any(r.engine != "quantbench" for r in results)
    frame = pd.DataFrame([{"model": r.model, "scheme": r.scheme, **({"engine": r.engine} if several else {}),
                           "check": r.check, "value": r.value, "limit": r.limit,
                           "result": "PASS" if r.passed else "FAIL"} for r in results])
    return frame.to_string(index=False) if len(frame) else "(no checks)"


@dataclass
class GateOutcome:
    """The results of a gate, and the runs of record it read."""

    results: list[GateResult]
    selection: Selection

    @property
    def passed(self) -> bool:
        return passed(self.results)


def check_gate(task: str, overrides: Iterable[str] = (), *, path: Path | None = None,
               sweep: str | None = None, grid: str | None = None) -> GateOutcome:
    """Load ``conf/gates/<task>.yaml`` (``conf/gates/<task>_<grid>.yaml``, or ``path``) and evaluate it
    against the runs of record.

    ``overrides``: the ones the sweep was given (they name the store, the grid and the config).

    Raises:
        UsageError: an unknown task or grid.
        ConfigError: a malformed gate file, or a named grid without one (before anything else is read).
        ReportError: no sweep of the config; an unknown or other-config ``sweep``.
    """
    overrides = list(overrides)
    source = sweep_file(task, grid)
    default = CONF_DIR / "gates" / f"{source.name}.yaml"
    if path is None and grid is not None and not default.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "gates").glob("*.yaml")))
        raise ConfigError(f"{_shown(default)}: the {grid} grid of task {task!r} has no gate file (a grid need not "
                          f"have one); write it, or pass --file PATH (conf/gates/ holds {known})")
    gates = load_gates(path or default)
    selection = select(task, overrides, sweep=sweep, partial=sweep is not None, models=gates.models,
                       schemes=gates.schemes, newest_if_none_complete=True, grid=grid)
    grid = selection.record.grid
    runs = selection.record.frame(finished_only=False)
    return GateOutcome(evaluate_gates(gates, runs, list(grid.models), list(grid.schemes), grid.engines), selection)


def run_gate(task: str, overrides: Iterable[str] = (), *, path: Path | None = None,
             sweep: str | None = None, grid: str | None = None) -> list[GateResult]:
    """The results of :func:`check_gate`."""
    return check_gate(task, overrides, path=path, sweep=sweep, grid=grid).results


def passed(results: list[GateResult]) -> bool:
    """True when there was something to check and every check passed."""
    return bool(results) and all(r.passed for r in results)
