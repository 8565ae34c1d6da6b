"""``make gate TASK=x``: accuracy gates over the newest run of every model x scheme.

``conf/gates/<task>.yaml`` lists checks, each for the model x scheme pairs its
patterns match: a minimum of a metric and/or a maximum drop of a metric from
the same run's float model (``float/<name>``). Every pair the task's sweep
grid names must have a run: a missing pair, a newest run that FAILED, or a
missing metric fails the gate like a regression does, so a gate can never
pass by having nothing to look at.

The gate file is checked against :class:`GateFile` when loaded, so a typo
(``max_dorp``) fails naming the key.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
from omegaconf import OmegaConf

from quantbench.harness.config import CONF_DIR, sweep_grid
from quantbench.report.runs import latest, load_runs, task_store

__all__ = ["GateCheck", "GateFile", "GateResult", "evaluate_gates", "format_results", "load_gates", "passed",
           "run_gate"]


@dataclass
class GateCheck:
    """One check: ``metric >= min``, ``metric <= max`` and/or ``float/<name> - metric <= max_drop``.

    Drops are in the metric's own unit: percentage points for top-1, mAP
    (a fraction) for detection.
    """

    metric: str = "quant/top1"
    models: list[str] = field(default_factory=lambda: ["*"])
    schemes: list[str] = field(default_factory=lambda: ["*"])
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None

    def applies(self, model: str, scheme: str) -> bool:
        return (any(fnmatch.fnmatchcase(model, p) for p in self.models)
                and any(fnmatch.fnmatchcase(scheme, p) for p in self.schemes))


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


def load_gates(path: Path) -> GateFile:
    """Load and validate a gate file."""
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "gates").glob("*.yaml")))
        raise FileNotFoundError(f"no gate file {path}; known gates: {known}")
    merged = OmegaConf.merge(OmegaConf.structured(GateFile), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _value(row: pd.Series, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or pd.isna(value) else float(value)


def _show(value: float | None) -> str:
    """Enough digits for both accuracies in percent (97.31) and mAP fractions (0.6123)."""
    return "missing" if value is None else f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _check(row: pd.Series, check: GateCheck, model: str, scheme: str) -> list[GateResult]:
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
    return results


def evaluate_gates(gates: GateFile, runs: pd.DataFrame, models: list[str], schemes: list[str]) -> list[GateResult]:
    """Apply ``gates`` to the newest run (any status) of every model x scheme."""
    newest = latest(runs, finished_only=False).set_index(["model", "scheme"]) if len(runs) else None
    results = []
    for model in models:
        for scheme in schemes:
            checks = [c for c in gates.checks if c.applies(model, scheme)]
            row = newest.loc[(model, scheme)] if newest is not None and (model, scheme) in newest.index else None
            if row is None:
                results.append(GateResult(model, scheme, "run exists", "missing", "a FINISHED run", False))
            elif row["status"] != "FINISHED":
                results.append(GateResult(model, scheme, "run FINISHED", row["status"],
                                          (row.get("error") or "")[:80], False))
            else:
                results.extend(r for c in checks for r in _check(row, c, model, scheme))
    return results


def format_results(results: Iterable[GateResult]) -> str:
    """A plain-text pass/fail table."""
    frame = pd.DataFrame([{"model": r.model, "scheme": r.scheme, "check": r.check, "value": r.value,
                           "limit": r.limit, "result": "PASS" if r.passed else "FAIL"} for r in results])
    return frame.to_string(index=False) if len(frame) else "(no checks)"


def run_gate(task: str, overrides: Iterable[str] = (), *, path: Path | None = None) -> list[GateResult]:
    """Load ``conf/gates/<task>.yaml`` and evaluate it against the task's runs."""
    overrides = list(overrides)
    gates = load_gates(path or CONF_DIR / "gates" / f"{task}.yaml")
    grid_models, grid_schemes = sweep_grid(task, overrides)
    store, experiment = task_store(task, overrides)
    runs = load_runs(store, experiment)
    return evaluate_gates(gates, runs, gates.models or grid_models, gates.schemes or grid_schemes)


def passed(results: list[GateResult]) -> bool:
    """True when there was something to check and every check passed."""
    return bool(results) and all(r.passed for r in results)
