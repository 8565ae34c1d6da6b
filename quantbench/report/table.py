"""The results table, in the format of AMD Quark's FX-mode results (Model | Method | Acc@1 / Acc@5), plus
ONNX accuracy, parity, int8 speedup and quantize time; the hard grid's table (the algorithms of each
scheme, the drop from float, output fidelity, exactness in onnxruntime and each algorithm's time); and
the README block that mirrors either."""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from quantbench.report.runs import engine_of, is_unsupported

__all__ = ["ALGORITHM_TIMES", "PRIMARY", "MetricFormat", "algorithm_names", "algorithms_label", "engines_table",
           "hard_table",
           "readme_markers", "replace_block", "results_table"]

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


def _speedup(row: pd.Series, runtime: str = "ort") -> str:
    """fp32 / int8 latency of one runtime's logged medians (``ort``; ``ov``: OpenVINO, ``run.runtime``)."""
    fp32, int8 = _num(row, f"latency/{runtime}_fp32_ms"), _num(row, f"latency/{runtime}_int8_ms")
    return f"{fp32 / int8:.2f}x" if fp32 and int8 else _NA


def _has_openvino(runs: pd.DataFrame) -> bool:
    """Whether any run measured OpenVINO's int8 latency (``run.runtime=openvino|both``)."""
    return "latency/ov_int8_ms" in runs.columns and bool(runs["latency/ov_int8_ms"].notna().any())


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
#: Shown after onnxruntime's speedup when a run measured OpenVINO too.
_OV_COLUMN = ("Int8 speedup (OpenVINO)", lambda r, f: _speedup(r, "ov"))


#: The deploy stage's settings (threads, batch) in the order a cell lists them (quantbench/harness/deploy.py).
DEPLOY_CELLS = ((1, 1), (1, 8), (2, 1), (2, 8))


def _deploy(row: pd.Series, runtime: str = "ort") -> str:
    """``t1b1 · t1b8 · t2b1 · t2b8`` int8 speedups at the deploy size (``deploy/[ov_]speedup_t{T}_b{B}``)."""
    prefix = "" if runtime == "ort" else f"{runtime}_"
    values = [_num(row, f"deploy/{prefix}speedup_t{t}_b{b}") for t, b in DEPLOY_CELLS]
    if all(v is None for v in values):
        return _NA
    return " · ".join(_NA if v is None else f"{v:.2f}" for v in values) + "x"


def _deploy_columns(runs: pd.DataFrame) -> list:
    """The deploy-size speedup columns (onnxruntime; OpenVINO where measured), when any run logged them."""
    if "deploy/size" not in runs.columns or not runs["deploy/size"].notna().any():
        return []
    size = int(runs["deploy/size"].max())
    cells = " · ".join(f"t{t}b{b}" for t, b in DEPLOY_CELLS)
    out = [(f"Int8 speedup at {size}x{size} (ORT; {cells})", lambda r, f: _deploy(r))]
    if "deploy/ov_speedup_t1_b1" in runs.columns and runs["deploy/ov_speedup_t1_b1"].notna().any():
        out.append((f"Int8 speedup at {size}x{size} (OpenVINO)", lambda r, f: _deploy(r, "ov")))
    return out


def results_table(runs: pd.DataFrame) -> str:
    """A markdown table of ``runs`` (one row each, already ordered); OpenVINO's int8 speedup beside
    onnxruntime's when a run measured it, and the deploy-size speedups when runs logged them."""
    fmt = _format(runs)
    columns = list(_COLUMNS)
    if _has_openvino(runs):
        columns.insert([name for name, _ in columns].index("Int8 speedup (ORT)") + 1, _OV_COLUMN)
    at = [name for name, _ in columns].index("Quantize time")
    columns[at:at] = _deploy_columns(runs)
    headers = [name.format(header=fmt.header) for name, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in runs.iterrows():
        lines.append("| " + " | ".join(str(cell(row, fmt)) for _, cell in columns) + " |")
    return "\n".join(lines)


#: How the hard table names each PTQ algorithm of ``scheme.algorithms`` (others: their own name).
_SHORT = {"bias_correction": "bc", "mixed_precision": "mixed"}
#: The engine's stage order: the order for algorithms found only as nested params (no list to keep).
_STAGE_ORDER = ("cle", "mixed_precision", "bias_correction", "adaround", "brecq")

#: The hard table's time columns: header -> metric (seconds). ``time/quantize_s`` is the whole PTQ
#: stage, its algorithms included; ``time/qat_s`` the QAT training.
ALGORITHM_TIMES: tuple[tuple[str, str], ...] = (
    ("CLE (s)", "time/cle_s"),
    ("BC (s)", "time/bias_correction_s"),
    ("AdaRound (s)", "time/adaround_s"),
    ("BRECQ (s)", "time/brecq_s"),
    ("Mixed prec. (s)", "time/mixed_precision_s"),
    ("PTQ total (s)", "time/quantize_s"),
    ("QAT (s)", "time/qat_s"),
)


def algorithm_names(params: Any) -> list[str]:
    """The algorithm names of a run's ``scheme.algorithms`` param, in their order.

    ``params`` is the run's logged params (a dict) or the param's value. The harness logs a list
    leaf as its Python text (``['cle', {'name': 'adaround', 'iters': 500}]``): an entry is a name
    or a mapping with ``name``. A mapping of algorithms logs nested keys
    (``scheme.algorithms.cle.iterations``), read in the engine's stage order. Nothing logged: [].
    """
    if isinstance(params, dict):
        value = params.get("scheme.algorithms")
        if value is None:
            nested = {k.split(".")[2] for k in params if k.startswith("scheme.algorithms.") and k.count(".") >= 2}
            return sorted(nested, key=lambda n: (_STAGE_ORDER.index(n) if n in _STAGE_ORDER else len(_STAGE_ORDER), n))
    else:
        value = params
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    text = str(value).strip()
    if text in ("", "None", "null"):
        return []
    try:
        entries = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        entries = [part.strip(" '\"") for part in text.strip("[]()").split(",")]
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        return [text]
    names = [entry.get("name") if isinstance(entry, dict) else entry for entry in entries]
    return [str(n) for n in names if n not in (None, "")]


def algorithms_label(params: Any) -> str:
    """``cle → bc → adaround``: a run's algorithms, compact, in order ("" for none)."""
    return " → ".join(_SHORT.get(n, n) for n in algorithm_names(params))


def _fixed(value: float | None, digits: int) -> str:
    """A number with ``digits`` decimals; blank when it was not logged."""
    if value is None:
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _secs(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _drop(row: pd.Series, fmt: MetricFormat) -> str:
    """float minus the row's headline metric (points of top-1, mAP): blank for the float row itself."""
    key = fmt.keys[0]
    stage = _stage(row, fmt)
    ref, value = _num(row, f"float/{key}"), _num(row, f"{stage}/{key}")
    if stage == "float" or ref is None or value is None:
        return ""
    return f"{ref - value:.{fmt.digits}f}"


_HARD_COLUMNS: tuple[tuple[str, Callable[[pd.Series, MetricFormat], Any]], ...] = (
    ("Model", lambda r, f: r["model_name"]),
    ("Scheme", lambda r, f: r["scheme"]),
    ("Algorithms", lambda r, f: algorithms_label(r.get("params") if isinstance(r.get("params"), dict) else {})),
    ("{metric}", lambda r, f: _fixed(_num(r, f"{_stage(r, f)}/{f.keys[0]}"), f.digits)),
    ("Drop vs float", lambda r, f: _drop(r, f)),
    ("ONNX {metric}", lambda r, f: _fixed(_num(r, f"onnx/{f.keys[0]}"), f.digits)),
    ("SQNR vs float (dB)", lambda r, f: _fixed(_num(r, "fidelity/sqnr_db"), 1)),
    ("Top-1 agree w/ float (%)", lambda r, f: _fixed(_num(r, "fidelity/agree_top1"), 2)),
    ("ONNX max LSB err", lambda r, f: _fixed(_num(r, "onnx/max_lsb_err"), 0)),
    ("ONNX parity (%)", lambda r, f: _fixed(_num(r, "onnx/parity_top1"), 2)),
    *((header, lambda r, f, key=key: _secs(_num(r, key))) for header, key in ALGORITHM_TIMES),
)


def _format(runs: pd.DataFrame) -> MetricFormat:
    primary = runs["primary_metric"].iloc[0] if len(runs) else "top1"
    fmt = PRIMARY.get(primary)
    if fmt is None:
        raise KeyError(f"no table format for primary metric {primary!r}; known: {sorted(PRIMARY)}")
    return fmt


def hard_table(runs: pd.DataFrame) -> str:
    """The hard grid's markdown table of ``runs`` (one row each, already ordered): per model x scheme the
    algorithms, the task metric (fake-quant; float for the float row) and its drop from float, the ONNX
    metric, output fidelity to float (``fidelity/sqnr_db``, ``fidelity/agree_top1``), exactness in
    onnxruntime (``onnx/max_lsb_err``, ``onnx/parity_top1``) and each algorithm's time (``time/*_s``).
    A metric the run did not log is a blank cell."""
    fmt = _format(runs)
    metric = fmt.header.split(" / ")[0]
    headers = [name.format(metric=metric) for name, _ in _HARD_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in runs.iterrows():
        lines.append("| " + " | ".join(str(cell(row, fmt)) for _, cell in _HARD_COLUMNS) + " |")
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


# -- the engines grid: quantbench against the peer toolkits ---------------------------------------------

def _metric(row: pd.Series, fmt: MetricFormat) -> float | None:
    """The deployed model's task metric: onnxruntime's, else the torch side's (float for the float row)."""
    for stage in ("onnx", "quant", "float"):
        value = _num(row, f"{stage}/{fmt.keys[0]}")
        if value is not None:
            return value
    return None


def _engine_cell(row: pd.Series | None, fmt: MetricFormat, notes: dict[str, int]) -> str:
    """``metric · SQNR dB · speedup`` of one run; ``n/a [k]`` (footnote k: the reason) where unsupported."""
    if row is None:
        return _NA
    if is_unsupported(row):
        reason = str(row.get("engine_reason") or "unsupported")
        k = notes.setdefault(reason, len(notes) + 1)
        return f"n/a [{k}]"
    if row.get("status") != "FINISHED":
        return str(row.get("status") or _NA)
    metric, sqnr = _metric(row, fmt), _sqnr(row)
    parts = [_fixed(metric, fmt.digits) or _NA]
    if sqnr is not None:
        parts.append(f"{sqnr:.1f} dB")
    speed, ov = _speedup(row), _speedup(row, "ov")
    if speed != _NA:
        parts.append(speed + (f" (OV {ov})" if ov != _NA else ""))
    text = " · ".join(parts)
    if row.get("engine_status") == "approximate":
        note = str(row.get("engine_notes") or "an approximation of the scheme")
        text = f"≈ {text} [{notes.setdefault(note, len(notes) + 1)}]"
    return text


def _sqnr(row: pd.Series) -> float | None:
    """The deployed model's output SQNR vs float: over the validation set, else on the parity batches."""
    value = _num(row, "fidelity/onnx_sqnr_db")
    return value if value is not None else _num(row, "onnx/sqnr_db")


def _best_marks(cells: dict[str, pd.Series | None], fmt: MetricFormat) -> set[str]:
    """The engines of a row with the highest ONNX SQNR (the fidelity the gates compare)."""
    scores = {e: _sqnr(r) for e, r in cells.items() if r is not None and not is_unsupported(r)}
    scores = {e: v for e, v in scores.items() if v is not None}
    if len(scores) < 2:
        return set()
    best = max(scores.values())
    return {e for e, v in scores.items() if v >= best - 1e-9}


def engines_table(runs: pd.DataFrame) -> str:
    """The side-by-side table of an engines grid: model x scheme rows, one column per engine, each cell
    ``metric · SQNR vs float · int8 speedup`` of the engine's ONNX model in onnxruntime (the best SQNR of a
    row in bold), ``n/a [k]`` where the engine cannot express the scheme (footnote k gives the reason);
    then the detail table, one row per run."""
    fmt = _format(runs)
    engines = list(dict.fromkeys(engine_of(r) for _, r in runs.iterrows()))
    keyed = {(r["model"], r["scheme"], engine_of(r)): r for _, r in runs.iterrows()}
    rows = list(dict.fromkeys((r["model"], r["scheme"]) for _, r in runs.iterrows()))
    names = {r["model"]: r["model_name"] for _, r in runs.iterrows()}
    methods = {r["scheme"]: r["method"] for _, r in runs.iterrows()}
    notes: dict[str, int] = {}
    metric = fmt.header.split(" / ")[0]
    ov = _has_openvino(runs)
    lines = ["| Model | Method | " + " | ".join(engines) + " |", "|---|---|" + "---|" * len(engines)]
    for model, scheme in rows:
        cells = {e: keyed.get((model, scheme, e)) for e in engines}
        best = _best_marks(cells, fmt)
        shown = [(f"**{_engine_cell(r, fmt, notes)}**" if e in best else _engine_cell(r, fmt, notes))
                 for e, r in cells.items()]
        lines.append(f"| {names.get(model, model)} | {methods.get(scheme, scheme)} | " + " | ".join(shown) + " |")
    out = ["\n".join(lines), "",
           f"Each cell: ONNX {metric} in onnxruntime · its output SQNR vs the float model over the validation set "
           "(dB) · int8 speedup over the same fp32 export (ORT, interleaved"
           + ("; OV: OpenVINO's, where the run measured it" if ov else "") + "). Bold: the best SQNR of the row. "
           "≈: the engine ran an approximation of the scheme (the footnote says how it differs); n/a: it cannot "
           "express the scheme (the footnote says why)."]
    if notes:
        out += [""] + [f"[{k}] {reason}" for reason, k in notes.items()]
    detail = [f"| Model | Method | Engine | Version | {metric} (torch) | ONNX {metric} | SQNR vs float (dB) | ONNX parity "
              "(top-1 agree w/ torch) | Int8 speedup |" + (" Int8 speedup (OpenVINO) |" if ov else "")
              + " Quantize time |", "|---|---|---|---|---|---|---|---|---|" + ("---|" if ov else "") + "---|"]
    for _, r in runs.iterrows():
        if is_unsupported(r):
            continue
        detail.append("| " + " | ".join([
            str(r["model_name"]), str(r["method"]), engine_of(r), str(r.get("engine_version") or "") or _NA,
            _fixed(_num(r, f"quant/{fmt.keys[0]}"), fmt.digits) or _NA, _fixed(_num(r, f"onnx/{fmt.keys[0]}"),
                                                                               fmt.digits) or _NA,
            _fixed(_sqnr(r), 1) or _NA, _parity(r), _speedup(r), *([_speedup(r, "ov")] if ov else []),
            _quantize_time(r)]) + " |")
    out += ["", "\n".join(detail)]
    return "\n".join(out)
