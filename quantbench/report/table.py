"""The results table, in the format of AMD Quark's FX-mode results (Model | Method | Acc@1 / Acc@5), plus
ONNX accuracy, parity, int8 speedup and quantize time; and the README block that mirrors it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

__all__ = ["PRIMARY", "MetricFormat", "readme_markers", "replace_block", "results_table"]

_NA = "—"


@dataclass(frozen=True)
class MetricFormat:
    """How a task's primary metric is shown: the header and the metric keys (without stage prefix)."""

    header: str
    keys: tuple[str, ...]
    digits: int


#: Keyed by the task's ``primary_metric`` (logged as a run tag).
PRIMARY: dict[str, MetricFormat] = {
    "top1": MetricFormat("Acc@1 / Acc@5", ("top1", "top5"), 2),
    "map50_95": MetricFormat("mAP@0.5:0.95", ("map50_95",), 4),
}


def _num(row: pd.Series, key: str) -> float | None:
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _accuracy(row: pd.Series, stage: str, fmt: MetricFormat) -> str:
    values = [_num(row, f"{stage}/{k}") for k in fmt.keys]
    if all(v is None for v in values):
        return _NA
    return " / ".join(_NA if v is None else f"{v:.{fmt.digits}f}" for v in values)


def _speedup(row: pd.Series) -> str:
    fp32, int8 = _num(row, "latency/ort_fp32_ms"), _num(row, "latency/ort_int8_ms")
    return f"{fp32 / int8:.2f}x" if fp32 and int8 else _NA


def _parity(row: pd.Series) -> str:
    value = _num(row, "onnx/parity_top1")
    return _NA if value is None else f"{value:.2f} %"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _quantize_time(row: pd.Series) -> str:
    quant, qat = _num(row, "time/quantize_s"), _num(row, "time/qat_s")
    if quant is None and qat is None:
        return _NA
    text = _seconds(quant) or _NA
    return f"{text} + QAT {_seconds(qat)}" if qat is not None else text


def _stage(row: pd.Series, fmt: MetricFormat) -> str:
    """The accuracy a row reports: the fake-quant model's, or the float model's (float scheme)."""
    return "quant" if _num(row, f"quant/{fmt.keys[0]}") is not None else "float"


_COLUMNS: tuple[tuple[str, Callable[[pd.Series, MetricFormat], Any]], ...] = (
    ("Model", lambda r, f: r["model_name"]),
    ("Method", lambda r, f: r["method"]),
    ("{header}", lambda r, f: _accuracy(r, _stage(r, f), f)),
    ("ONNX {header}", lambda r, f: _accuracy(r, "onnx", f)),
    ("ONNX parity (top-1 agree)", lambda r, f: _parity(r)),
    ("Int8 speedup (ORT)", lambda r, f: _speedup(r)),
    ("Quantize time", lambda r, f: _quantize_time(r)),
)


def results_table(runs: pd.DataFrame) -> str:
    """A markdown table of ``runs`` (one row each, already ordered)."""
    primary = runs["primary_metric"].iloc[0] if len(runs) else "top1"
    fmt = PRIMARY.get(primary)
    if fmt is None:
        raise KeyError(f"no table format for primary metric {primary!r}; known: {sorted(PRIMARY)}")
    headers = [name.format(header=fmt.header) for name, _ in _COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in runs.iterrows():
        lines.append("| " + " | ".join(str(cell(row, fmt)) for _, cell in _COLUMNS) + " |")
    return "\n".join(lines)


def readme_markers(task: str) -> tuple[str, str]:
    return f"<!-- quantbench:table:{task}:start -->", f"<!-- quantbench:table:{task}:end -->"


def replace_block(text: str, task: str, block: str) -> str | None:
    """``text`` with the lines between the task's markers replaced by ``block``; None without markers."""
    start, end = readme_markers(task)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{start}\n{block.strip()}\n{end}", text, count=1)
