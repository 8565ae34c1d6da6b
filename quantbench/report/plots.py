"""Report plots: accuracy per scheme per model, and per-node SQNR of the worst layers.

Matplotlib through :class:`~matplotlib.figure.Figure` only (no pyplot), so no
global backend state and no display is needed.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd
from matplotlib.figure import Figure

from quantbench.harness.tracking import Store
from quantbench.report.runs import engine_of, is_unsupported

__all__ = ["accuracy_plot", "engines_plot", "node_sqnr_plot"]

log = logging.getLogger(__name__)


def _headline(row: pd.Series, metric: str) -> float:
    """The accuracy a row stands for: fake-quant, or float for the float scheme."""
    for key in (f"quant/{metric}", f"float/{metric}"):
        value = row.get(key)
        if value is not None and not pd.isna(value):
            return float(value)
    return float("nan")


def accuracy_plot(runs: pd.DataFrame, path: Path, metric: str = "top1") -> None:
    """Grouped bars: one group per scheme, one bar per model."""
    schemes = list(dict.fromkeys(runs["scheme"]))
    table = runs.assign(_v=[_headline(r, metric) for _, r in runs.iterrows()]).pivot_table(
        index="scheme", columns="model", values="_v", sort=False).reindex(schemes)
    names = dict(zip(runs["model"], runs["model_name"]))
    fig = Figure(figsize=(max(6.0, 0.9 * len(schemes) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(table.columns), 1)
    for i, model in enumerate(table.columns):
        ax.bar([j + i * width for j in range(len(schemes))], table[model], width, label=names[model])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(schemes))], schemes, rotation=30, ha="right")
    low, high = table.min().min(), table.max().max()
    top = 1.0 if pd.notna(high) and high <= 1.0 else 100.0  # mAP is a fraction, accuracy a percentage
    margin = 0.05 * top
    ax.set_ylim(max(0.0, low - margin) if pd.notna(low) else 0.0,
                top * 1.005 if pd.notna(high) and high <= top else None)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per scheme (fake-quant; float for the float row)")
    ax.legend()
    fig.savefig(path, dpi=100)


#: MLflow's switch for the tqdm bars it draws around artifact downloads and uploads.
_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextlib.contextmanager
def _no_download_bars() -> Iterator[None]:
    """MLflow draws a tqdm "Downloading artifacts" bar for each artifact it downloads, a dozen per report:
    noise around a few-kB CSV that buries the table the report prints. MLflow reads its switch at each
    download, so it is turned off here, around ours only (and left alone when the user has set it)."""
    if _PROGRESS_BAR_ENV in os.environ:
        yield
        return
    os.environ[_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(_PROGRESS_BAR_ENV, None)


def _node_rows(store: Store, run_id: str, tmp: Path) -> list[dict]:
    try:
        local = store.client.download_artifacts(run_id, "node_sqnr.csv", str(tmp))
    except Exception as exc:  # MLflow raises several types for a missing artifact
        log.debug("run %s has no node_sqnr.csv (%s)", run_id, type(exc).__name__)  # a float run has none
        return []
    with open(local, newline="") as f:
        return [{"node": r["node"], "op": r["op"], "sqnr_db": float(r["sqnr_db"])} for r in csv.DictReader(f)]


def node_sqnr_plot(store: Store, runs: pd.DataFrame, path: Path, layers: int = 10) -> bool:
    """One panel per model: each scheme's ``layers`` worst tensors by SQNR, worst first.

    Schemes quantize different graphs (QAT keeps BatchNorm, PTQ folds it), so
    the curves are compared by rank, and the legend names each scheme's
    worst tensor. Returns False (and writes nothing) when no run has a
    per-node table.
    """
    panels = []
    with tempfile.TemporaryDirectory() as tmp, _no_download_bars():
        for _, group in runs.groupby("model", sort=False):
            curves = []
            for _, row in group.iterrows():
                rows = [r for r in _node_rows(store, row["run_id"], Path(tmp) / row["run_id"])
                        if r["sqnr_db"] != float("inf")]
                if rows:
                    rows.sort(key=lambda r: r["sqnr_db"])
                    curves.append((row["scheme"], rows[:layers]))
            if curves:
                panels.append((group["model_name"].iloc[0], curves))
    if not panels:
        return False
    fig = Figure(figsize=(8, 3.2 * len(panels)), layout="constrained")
    for ax, (name, curves) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        for scheme, rows in curves:
            ax.plot(range(1, len(rows) + 1), [r["sqnr_db"] for r in rows], marker="o",
                    label=f"{scheme} (worst: {rows[0]['node']})")
        ax.set_xlabel("rank (1 = worst quantized tensor)")
        ax.set_ylabel("SQNR vs float (dB)")
        ax.set_title(f"{name}: the {layers} worst tensors per scheme")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return True


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def engines_plot(runs: pd.DataFrame, path: Path, metric: str = "top1") -> bool:
    """Accuracy of the deployed ONNX model against its int8 speedup in onnxruntime, one marker per engine
    (one point per model x scheme it ran); False (nothing written) when no run has both."""
    rows = []
    for _, r in runs.iterrows():
        if is_unsupported(r):
            continue
        acc, fp32, int8 = r.get(f"onnx/{metric}"), r.get("latency/ort_fp32_ms"), r.get("latency/ort_int8_ms")
        if any(v is None or pd.isna(v) for v in (acc, fp32, int8)) or not int8:
            continue
        rows.append((engine_of(r), f"{r['model']} {r['scheme']}", float(fp32) / float(int8), float(acc)))
    if not rows:
        return False
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    engines = list(dict.fromkeys(e for e, *_ in rows))
    for i, engine in enumerate(engines):
        pts = [(x, y) for e, _, x, y in rows if e == engine]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)], s=45,
                   label=engine, alpha=0.8)
    ax.set_xlabel("int8 speedup over fp32 (onnxruntime)")
    ax.set_ylabel(f"ONNX {metric}")
    ax.set_title("accuracy vs int8 speedup, per engine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True
