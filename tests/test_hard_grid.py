"""A task's hard grid (``--grid hard``, ``make ... SWEEP=hard``): conf/sweep/<task>_hard.yaml, its own MLflow
experiment, report, README block and gate; an unknown grid is one line; its runs never enter the task's
own report, nor the task's runs its report, even in the cells both grids run (the same config hash).

Runs are logged into a real sqlite store with the tags, params and config hashes the harness writes
(as ``test_report.log_run`` does); no run trains anything. The grids here are shrunk to schemes that
exist in every checkout (``scheme=float,ptq_float,ptq_pow2``), as a sweep's overrides shrink them.
"""

from __future__ import annotations

import functools
import importlib
import time
from pathlib import Path

import pandas as pd
import pytest
from test_report import grid_of, log_run, metrics_of, store_of, table_rows

from quantbench.cli import main
from quantbench.errors import UsageError
from quantbench.harness.config import CONF_DIR, compose_config, resolve_tree, sweep_grid
from quantbench.harness.preflight import sweep_file, sweep_grids, sweep_tasks
from quantbench.harness.tracking import Store
from quantbench.report.gate import load_gates
from quantbench.report.record import Grid, resolve_grid
from quantbench.report.table import algorithms_label, hard_table

HARD_SCHEMES = ["float", "ptq_float", "ptq_float_cle_bc", "ptq_pow2", "ptq_pow2_cle_bc", "ptq_pow2_adaround",
                "ptq_w4a8", "ptq_w4a8_adaround", "ptq_w4a4", "ptq_w4a4_brecq", "ptq_mixed", "qat_w4a4_lsq"]
SMALL = ("model=resnet18", "scheme=float,ptq_float,ptq_pow2")  # the hard grid, shrunk by the sweep's overrides
SHARED = ("model=resnet18", "scheme=float,ptq_pow2")  # cells both digits grids run
HARD_HEADER = ["Model", "Scheme", "Algorithms", "Acc@1", "Drop vs float", "ONNX Acc@1", "SQNR vs float (dB)",
               "Top-1 agree w/ float (%)", "ONNX max LSB err", "ONNX parity (%)", "CLE (s)", "BC (s)",
               "AdaRound (s)", "BRECQ (s)", "Mixed prec. (s)", "PTQ total (s)", "QAT (s)"]
START, END = "<!-- quantbench:table:digits_hard:start -->", "<!-- quantbench:table:digits_hard:end -->"


@functools.cache
def hard_grid(*overrides: str) -> Grid:
    return resolve_grid("digits", overrides, grid="hard")


def log_hard(store: Store, scheme: str, metrics: dict[str, float], *, sweep: str, grid: Grid,
             algorithms: str | None = None, model: str = "resnet18") -> str:
    """One run of the hard grid as the harness records it: in the grid's own experiment (``digits_hard``)."""
    time.sleep(0.005)  # distinct start times
    rec = store.start_run("digits_hard", f"{model}-{scheme}", {
        "task": "digits", "model": model, "scheme": scheme, "sweep": sweep,
        "config_hash": grid.hashes[grid.cell(model, scheme)], "git_sha": "0123456789abcdef", "primary_metric": "top1"})
    params = {**grid.params[grid.cell(model, scheme)], "tracking.sweep_id": sweep, "run.force": "False"}
    if algorithms is not None:
        params["scheme.algorithms"] = algorithms
    rec.log_params(params)
    rec.log_metrics(metrics)
    rec.finish()
    return rec.run_id


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_hard_grid_resolves_to_its_file_and_experiment(tracking_overrides, monkeypatch, capsys):
    assert sweep_file("digits", "hard").name == "digits_hard"
    assert sweep_file("digits", "hard").path == "conf/sweep/digits_hard.yaml"
    for task in ("digits", "shapes", "imagenet"):
        assert (CONF_DIR / "sweep" / f"{task}_hard.yaml").is_file() and "hard" in sweep_grids(task)
        assert f"{task}_hard" not in sweep_tasks()
        models, schemes = sweep_grid(task, grid="hard")
        assert models == (["yolo_nas_nano"] if task == "shapes" else ["resnet18", "mobilenet_v2"])
        assert schemes == HARD_SCHEMES
        cfg = compose_config([f"sweep={task}_hard"])
        assert (cfg.task.name, cfg.tracking.experiment) == (task, f"{task}_hard")
    assert sweep_grid("digits", ["scheme=ptq_pow2"], grid="hard") == (["resnet18", "mobilenet_v2"], ["ptq_pow2"])
    anchors = (CONF_DIR / "sweep" / "imagenet_hard.yaml").read_text()
    assert all(a in anchors for a in ("Brevitas", "69.54", "71.25", "AIMET", "69.1", "69.75", "MQBench", "68.84",
                                      "71.06"))
    # A hard job is the task's job but for the experiment: the same baseline, the same config hash.
    for scheme in ("float", "ptq_pow2"):
        hard, own = (resolve_tree(compose_config([f"sweep={s}", "model=resnet18", f"scheme={scheme}"]))
                     for s in ("digits_hard", "digits"))
        assert {k: v for k, v in hard.items() if k != "tracking"} == {k: v for k, v in own.items() if k != "tracking"}
        assert hard_grid(*SHARED).hashes[("resnet18", scheme, "quantbench")] == grid_of(*SHARED).hashes[("resnet18", scheme, "quantbench")]

    launched = []  # the command line: the grid's sweep file and a sweep id that names it
    sweep_module = importlib.import_module("quantbench.harness.sweep")  # the package exports the function `sweep`
    monkeypatch.setattr(sweep_module, "launch", lambda argv: launched.append(list(argv)) or 0)
    assert main(["sweep", "digits", "--grid", "hard", *tracking_overrides, *SHARED]) == 0
    (argv,) = launched
    assert "sweep=digits_hard" in argv and any(a.startswith("tracking.sweep_id=digits_hard-") for a in argv)
    assert capsys.readouterr().out.startswith("sweep digits_hard-")


@pytest.mark.parametrize("argv", [["sweep", "digits", "--grid", "hrd"], ["report", "digits", "--grid", "hrd"],
                                  ["gate", "digits", "--grid", "hrd"], ["ui", "--task", "digits", "--grid", "hrd"]])
def test_an_unknown_grid_is_one_line_exit_2_listing_the_grids(argv, capsys):
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"quantbench {argv[0]}: --grid hrd: no such grid of task 'digits' "
                           "(conf/sweep/digits_hrd.yaml); did you mean hard? Grids of digits: engines, hard")
    assert main(["sweep", "digits_hard"]) == 2  # the grid's file named as a task: how to name it
    line = _one_line(capsys.readouterr().err)
    assert "'digits_hard' is the hard grid of task 'digits'" in line and "quantbench sweep digits --grid hard" in line
    assert main(["report", "coco", "--grid", "hard"]) == 2
    assert "Task 'coco' has no named grid" in _one_line(capsys.readouterr().err)
    with pytest.raises(UsageError, match="did you mean digits[?] Tasks: .*digits") as err:
        sweep_file("digitz")
    assert "_hard" not in str(err.value)  # a grid's file is no task


def test_a_grid_without_a_gate_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    gates = load_gates(CONF_DIR / "gates" / "digits_hard.yaml")  # the digits hard grid's: exactness of every PTQ
    exact = {(c.metric, c.min, c.max) for c in gates.checks if c.schemes == ["ptq_*"]}
    assert exact == {("onnx/max_lsb_err", None, 0.0), ("onnx/parity_top1", 100.0, None)}
    (tmp_path / "gates").mkdir()
    monkeypatch.setattr("quantbench.report.gate.CONF_DIR", tmp_path)  # a grid with no gate file
    assert main(["gate", "digits", "--grid", "hard"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("quantbench gate: ") and "digits_hard.yaml: the hard grid of task 'digits' has no " \
        "gate file (a grid need not have one); write it, or pass --file PATH" in line


def test_the_hard_table_shows_the_new_columns_and_blanks_for_missing_metrics(tmp_path, tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), hard_grid(*SMALL)
    log_hard(store, "float", metrics_of(0, "float", 0), sweep="digits_hard-1", grid=grid, algorithms="[]")
    log_hard(store, "ptq_float", {"float/top1": 98.0, "quant/top1": 97.5, "time/quantize_s": 2.25},
             sweep="digits_hard-1", grid=grid)  # logged none of the new metrics, no scheme.algorithms param
    log_hard(store, "ptq_pow2", {
        **metrics_of(0, "ptq_pow2", 0.3), "fidelity/sqnr_db": 31.25, "fidelity/agree_top1": 99.72,
        "onnx/max_lsb_err": 0.0, "onnx/parity_top1": 100.0, "time/cle_s": 0.42, "time/bias_correction_s": 1.5,
        "time/adaround_s": 35.04, "time/quantize_s": 37.5},
        sweep="digits_hard-1", grid=grid, algorithms="['cle', 'bias_correction', {'name': 'adaround', 'iters': 50}]")
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\nplaceholder\n{END}\n<!-- quantbench:table:digits:start -->\nmine\n"
                      "<!-- quantbench:table:digits:end -->\n")

    out = tmp_path / "reports"
    assert main(["report", "digits", "--grid", "hard", "--out", str(out), "--readme", str(readme),
                 *tracking_overrides, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'digits_hard.md'} (3 rows of sweep digits_hard-1)" in printed
    text = (out / "digits_hard.md").read_text()
    assert text.startswith("<!-- Generated by `make report TASK=digits SWEEP=hard` (quantbench report digits "
                           "--grid hard) from the MLflow runs of sweep digits_hard-1")
    assert "# digits, hard grid: quantization results" in text and "Sweep of record: `digits_hard-1`" in text
    header = next(line for line in text.splitlines() if line.startswith("| "))
    assert [c.strip() for c in header.strip("|").split("|")] == HARD_HEADER
    rows = {row[1]: dict(zip(HARD_HEADER, row)) for row in table_rows(text)}
    assert list(rows) == ["float", "ptq_float", "ptq_pow2"]
    pow2 = rows["ptq_pow2"]
    assert (pow2["Model"], pow2["Algorithms"], pow2["Acc@1"], pow2["Drop vs float"], pow2["ONNX Acc@1"]) == \
        ("ResNet-18", "cle → bc → adaround", "97.70", "0.30", "97.70")
    assert (pow2["SQNR vs float (dB)"], pow2["Top-1 agree w/ float (%)"], pow2["ONNX max LSB err"],
            pow2["ONNX parity (%)"]) == ("31.2", "99.72", "0", "100.00")
    assert [pow2[h] for h in HARD_HEADER[10:]] == ["0.4", "1.5", "35.0", "", "", "37.5", ""]
    bare = rows["ptq_float"]  # nothing but the accuracy and the PTQ time: blanks, no crash
    assert (bare["Acc@1"], bare["Drop vs float"], bare["PTQ total (s)"]) == ("97.50", "0.50", "2.2")
    assert all(bare[h] == "" for h in HARD_HEADER if h not in ("Model", "Scheme", "Acc@1", "Drop vs float",
                                                                  "PTQ total (s)"))
    assert (rows["float"]["Acc@1"], rows["float"]["Drop vs float"], rows["float"]["Algorithms"]) == ("98.00", "", "")
    assert sorted(p.name for p in out.iterdir()) == ["digits_hard.md", "digits_hard_accuracy.png"]
    refreshed = readme.read_text()  # the grid's block only
    assert "placeholder" not in refreshed and "cle → bc → adaround" in refreshed and "\nmine\n" in refreshed

    # Runs logged before the new metrics existed, and a detection grid: blanks and the task's own metric.
    old = pd.DataFrame([{"model_name": "YOLO-NAS-style N", "scheme": "ptq_pow2", "primary_metric": "map50_95",
                         "params": {}, "float/map50_95": 0.6777, "quant/map50_95": 0.6749}])
    (header, _, row) = hard_table(old).splitlines()
    assert "| mAP@0.5:0.95 | Drop vs float | ONNX mAP@0.5:0.95 |" in header
    assert row.startswith("| YOLO-NAS-style N | ptq_pow2 |  | 0.6749 | 0.0028 |  |")
    assert algorithms_label({"scheme.algorithms": "['mixed_precision', 'brecq']"}) == "mixed → brecq"
    assert algorithms_label({"scheme.algorithms.cle.iterations": "20", "scheme.algorithms.adaround.iters": "5"}) \
        == "cle → adaround"


def test_hard_runs_stay_out_of_the_normal_report_and_back(tmp_path, tracking_overrides, capsys):
    """The two digits grids share cells (same config, same hash): each report still reads its own sweep."""
    store, own, hard = store_of(tracking_overrides), grid_of(*SHARED), hard_grid(*SHARED)
    for scheme in ("float", "ptq_pow2"):
        log_run(store, "resnet18", scheme, metrics_of(0, scheme, 0.4), sweep="digits-1", grid=own)  # 97.60
    for scheme in ("float", "ptq_pow2"):  # newer, complete, the same hashes: 11.11 marks the hard runs
        log_hard(store, scheme, {**metrics_of(0, scheme, 0), "quant/top1": 11.11, "onnx/top1": 11.11},
                 sweep="digits_hard-2", grid=hard)
    out = str(tmp_path / "reports")
    normal = [*tracking_overrides, *SHARED]

    assert main(["report", "digits", "--out", out, *normal]) == 0
    text = (tmp_path / "reports" / "digits.md").read_text()
    assert "Sweep of record: `digits-1`" in text and "11.11" not in text and "digits_hard" not in text
    assert table_rows(text)[1][2].startswith("97.60")
    assert "note:" not in capsys.readouterr().out  # no newer sweep of its config either
    assert main(["gate", "digits", *normal]) == 0
    assert "gate digits: PASS on sweep digits-1" in capsys.readouterr().out
    assert main(["report", "digits", "--out", out, "--sweep", "digits_hard-2", *normal]) == 2
    assert "unknown sweep 'digits_hard-2' for task 'digits'" in _one_line(capsys.readouterr().err)

    assert main(["report", "digits", "--grid", "hard", "--out", out, *normal]) == 0
    text = (tmp_path / "reports" / "digits_hard.md").read_text()
    assert "Sweep of record: `digits_hard-2`" in text and "97.60" not in text and "`digits-1`" not in text
    assert table_rows(text)[1][3] == "11.11"
    capsys.readouterr()
    assert main(["report", "digits", "--grid", "hard", "--out", out, "--sweep", "digits-1", *normal]) == 2
    assert "unknown sweep 'digits-1' for task 'digits' (grid 'hard')" in _one_line(capsys.readouterr().err)
    assert Path(out, "digits.md").read_text().count("Sweep of record: `digits-1`") == 1  # the normal report stands
