"""The report of record: one sweep's runs of the task's config, never an ad-hoc, smoke or half-finished
sweep's; the README only on request; gate files that do not work are one line naming the file.

Runs are logged into a real sqlite MLflow store with the config hash the harness gives each cell
(``test_report.log_run``); the first test checks that hash against the harness's own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_report import grid_of, log_grid, log_run, metrics_of, store_of, table_rows

from quantbench.cli import main
from quantbench.errors import ConfigError
from quantbench.harness.config import compose_config, first_job_overrides
from quantbench.harness.paths import project_root
from quantbench.report import ReportError, write_report
from quantbench.report.gate import load_gates
from quantbench.report.record import select

TWO = ("model=resnet18", "scheme=float,ptq_pow2")  # a two-cell sweep: what most tests here sweep
CI = ("model=resnet18", "scheme=float,ptq_float,ptq_pow2,qat_lsq", "task.cache_dir=/tmp/qb-ci-cache")  # .ci/run's
QB = str(Path(sys.executable).with_name("quantbench"))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


def _quant(markdown: str) -> list[str]:
    return [row[2].split(" / ")[0] for row in table_rows(markdown)]


@pytest.mark.parametrize("scheme", [pytest.param("ptq_pow2", marks=pytest.mark.slow), "qat_lsq"])  # ~5 s each
def test_the_hash_of_a_cell_is_the_one_the_harness_gives_the_job(tracking_overrides, scheme):
    """A sweep job of the cell finds the logged run as its own (same config hash) and skips it."""
    from quantbench.harness.run import run

    store = store_of(tracking_overrides)
    log_run(store, "resnet18", scheme, metrics_of(0, scheme, 0.3))
    job = first_job_overrides(["sweep=digits", "tracking.sweep_id=s1", *tracking_overrides, "model=resnet18",
                               f"scheme={scheme}"])
    result = run(compose_config(job))
    assert result.status == "SKIPPED" and result.config_hash == grid_of().hashes[("resnet18", scheme, "quantbench")]


def test_report_reads_the_newest_complete_sweep_only(tmp_path, tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    args = ["report", "digits", "--out", str(tmp_path / "reports"), *tracking_overrides, *TWO]
    log_grid(store, drop=0.5, sweep="old", grid=grid)  # quant/top1 97.50
    log_grid(store, drop=0.4, sweep="new", grid=grid)  # 97.60: the newest complete sweep
    log_run(store, "resnet18", "ptq_pow2", {**metrics_of(0, "ptq_pow2", 0), "quant/top1": 11.11},
            sweep="adhoc-20250101-000000", grid=grid)  # `quantbench run`, the same config
    log_run(store, "resnet18", "ptq_pow2", {**metrics_of(0, "ptq_pow2", 0), "quant/top1": 22.22},
            sweep="adhoc-20250101-000001", chash="smoke0123456789a")  # `quantbench run experiment=smoke`
    for scheme in ("float", "ptq_pow2"):  # `make sweep ARGS=experiment=smoke`: a complete sweep of another config
        log_run(store, "resnet18", scheme, {**metrics_of(0, scheme, 0), "quant/top1": 33.33}, sweep="smoke",
                chash=f"smoke{scheme}")
    log_run(store, "resnet18", "float", metrics_of(0, "float", 0), sweep="killed", grid=grid, force=True)
    log_run(store, "resnet18", "ptq_pow2", {**metrics_of(0, "ptq_pow2", 0), "quant/top1": 44.44}, sweep="killed",
            grid=grid, force=True, fail="killed: its process is gone")  # the newest sweep is incomplete
    readme = (project_root() / "README.md").read_text()
    block = readme[readme.index("<!-- quantbench:table:digits:start"):readme.index("quantbench:table:digits:end")]

    assert main(args) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "reports" / "digits.md").read_text()
    assert "from the MLflow runs of sweep new;" in text and "Sweep of record: `new`" in text
    assert _quant(text) == ["98.00", "97.60"]
    assert not any(v in text for v in ("11.11", "22.22", "33.33", "44.44", "97.50"))
    assert "rows of sweep new)" in out and "note: newer sweep killed not read: 1 of 2" in out
    now = (project_root() / "README.md").read_text()  # no --readme: the README is left alone
    assert block == now[now.index("<!-- quantbench:table:digits:start"):now.index("quantbench:table:digits:end")]

    assert main([*args, "--sweep", "old"]) == 0  # an older sweep, by name
    text = (tmp_path / "reports" / "digits.md").read_text()
    assert "Sweep of record: `old`" in text and _quant(text) == ["98.00", "97.50"]

    assert main([*args, "--partial"]) == 0  # the newest sweep as it is, labelled
    text = (tmp_path / "reports" / "digits.md").read_text()
    assert "**Partial**: sweep `killed` is incomplete: 1 of 2 model x scheme cells FINISHED " \
           "(resnet18 x ptq_pow2 FAILED)" in text and len(table_rows(text)) == 1
    assert "PARTIAL" in capsys.readouterr().out


def test_unknown_or_incomplete_sweep_is_one_line_exit_2(tmp_path, tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    base = ["report", "digits", "--out", str(tmp_path), *tracking_overrides, *TWO]
    log_grid(store, sweep="digits-20250101-120000", grid=grid)
    log_run(store, "resnet18", "float", metrics_of(0, "float", 0), sweep="digits-20250102-120000", grid=grid,
            force=True)
    log_run(store, "resnet18", "float", metrics_of(0, "float", 0), sweep="adhoc-20250103-120000", grid=grid)

    assert main([*base, "--sweep", "digits-20250101-12000"]) == 2
    err = _err_line(capsys)
    assert err.startswith("quantbench report: --sweep digits-20250101-12000: unknown sweep")
    assert "did you mean digits-20250101-120000 or digits-20250102-120000?" in err
    assert "known sweeps, newest first: digits-20250102-120000, digits-20250101-120000" in err
    assert main([*base, "--sweep", "adhoc-20250103-120000"]) == 2
    assert "is an ad-hoc run (quantbench run), not a sweep" in _err_line(capsys)
    assert main([*base, "--sweep", "digits-20250102-120000"]) == 2
    assert "is incomplete: 1 of 2 model x scheme cells FINISHED (resnet18 x ptq_pow2 missing)" in _err_line(capsys)
    assert main([*base, "--sweep", "digits-20250102-120000", "--partial"]) == 0


def test_no_complete_sweep_says_what_to_run(tmp_path, tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    log_run(store, "resnet18", "float", metrics_of(0, "float", 0), sweep="s1", grid=grid, force=True)
    assert main(["report", "digits", "--out", str(tmp_path), *tracking_overrides, *TWO]) == 2
    err = _err_line(capsys)
    assert "no complete sweep of task 'digits'" in err and "'s1', has 1 of 2 model x scheme cells" in err
    assert "run `make sweep TASK=digits`" in err and "--partial" in err

    adhoc = store_of([*tracking_overrides, "tracking.experiment=adhoc_only"])
    adhoc.start_run("adhoc_only", "x", {"model": "resnet18", "scheme": "float", "sweep": "adhoc-1",
                                        "config_hash": grid.hashes[grid.cell("resnet18", "float")]}).finish()
    with pytest.raises(ReportError, match="only ad-hoc runs .* never reported"):
        select("digits", [*tracking_overrides, *TWO, "tracking.experiment=adhoc_only"])


def test_a_sweep_run_again_after_a_kill_is_complete_with_the_runs_it_skipped(tmp_path, tracking_overrides):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    log_run(store, "resnet18", "float", metrics_of(0, "float", 0), sweep="first", grid=grid)
    log_run(store, "resnet18", "ptq_pow2", {}, sweep="first", grid=grid, fail="killed: its process is gone")
    log_run(store, "resnet18", "ptq_pow2", metrics_of(0, "ptq_pow2", 0.2), sweep="again", grid=grid)
    report = write_report("digits", [*tracking_overrides, *TWO], out_dir=tmp_path)
    text = report.markdown.read_text()
    assert report.sweep_id == "again" and not report.partial and len(table_rows(text)) == 2
    assert "resnet18 x float from sweep `first` (the same config: the sweep skipped them" in text


@pytest.mark.slow  # ~9 s: a sweep, its report and gate as .ci/run calls them (which CI then runs for real)
def test_the_ci_flow_reads_its_shrunk_sweep_given_the_sweeps_overrides(tmp_path, tracking_overrides, capsys):
    """.ci/run: a sweep with a reduced grid and its own cache dir, then the report and digits_ci.yaml's gate."""
    store, grid = store_of(tracking_overrides), grid_of(*CI)
    for scheme in grid.schemes:
        log_run(store, "resnet18", scheme, metrics_of(0, scheme, 0.2) | {"onnx/parity_top1": 100.0}, sweep="ci",
                grid=grid)
    out = str(tmp_path / "reports")
    assert main(["report", "digits", "--sweep", "ci", "--out", out, *tracking_overrides, *CI]) == 0
    assert main(["report", "digits", "--out", out, *tracking_overrides, *CI]) == 0  # the newest complete sweep too
    assert main(["gate", "digits", "--file", "conf/gates/digits_ci.yaml", *tracking_overrides, *CI]) == 0
    assert "gate digits: PASS on sweep ci (7 passed, 0 failed)" in capsys.readouterr().out

    assert main(["report", "digits", "--out", out, *tracking_overrides]) == 2  # without the sweep's overrides
    err = _err_line(capsys)
    assert "no sweep of the config of conf/sweep/digits.yaml with these overrides" in err
    assert "ci: it ran task.cache_dir=/tmp/qb-ci-cache (here .cache/quantbench)" in err
    assert main(["report", "digits", "--sweep", "ci", "--out", out, *tracking_overrides, *CI[:2]]) == 2
    assert "sweep 'ci' of task 'digits'" in _err_line(capsys)


def test_readme_only_on_request_and_a_bad_one_is_one_line(tmp_path, tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    log_grid(store, grid=grid)
    base = ["report", "digits", "--out", str(tmp_path / "reports"), *tracking_overrides, *TWO]
    missing = tmp_path / "missing.md"
    assert main([*base, "--readme", str(missing)]) == 2
    assert f"--readme {missing}: no such file" in _err_line(capsys) and not (tmp_path / "reports").exists()
    plain = tmp_path / "plain.md"
    plain.write_text("# no markers\n<!-- quantbench:table:digits:start -->\n")
    assert main([*base, "--readme", str(plain)]) == 2
    assert "no <!-- quantbench:table:digits:end --> marker after" in _err_line(capsys)
    plain.write_text("# no markers\n")
    assert main([*base, "--readme", str(plain)]) == 2
    assert "no <!-- quantbench:table:digits:start --> and no <!-- quantbench:table:digits:end --> marker" \
        in _err_line(capsys)

    readme = tmp_path / "README.md"
    readme.write_text("<!-- quantbench:table:digits:start -->\nold\n<!-- quantbench:table:digits:end -->\n")
    assert main([*base, "--readme", str(readme)]) == 0
    assert f"refreshed {readme}" in capsys.readouterr().out
    assert "old" not in readme.read_text() and "Sweep of record: `test`" in readme.read_text()


def test_gate_reads_the_report_s_sweep(tracking_overrides, capsys):
    store, grid = store_of(tracking_overrides), grid_of(*TWO)
    log_grid(store, drop=0.3, sweep="good", grid=grid)
    log_run(store, "resnet18", "ptq_pow2", metrics_of(0, "ptq_pow2", 5.0), sweep="worse", grid=grid, force=True)
    gate = ["gate", "digits", *tracking_overrides, *TWO]
    assert main(gate) == 0
    out = capsys.readouterr().out
    assert "gate digits: PASS on sweep good" in out and "note: newer sweep worse not read: 1 of 2" in out
    assert main([*gate, "--sweep", "worse"]) == 1  # by name: its regression and its missing cell fail
    out = capsys.readouterr().out
    assert "gate digits: FAIL on sweep worse (0 passed, 2 failed)" in out and "PARTIAL" in out
    assert main([*gate, "--sweep", "nope"]) == 2
    assert "known sweeps, newest first: worse, good" in _err_line(capsys)


def test_a_gate_file_that_does_not_parse_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "gate.yaml"
    bad.write_text("checks:\n  - metric: quant/top1\n    max_drop: [1.0\n")
    proc = subprocess.run([QB, "gate", "digits", "--file", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"quantbench gate: {bad}:4: not valid YAML (while parsing a flow sequence from line 3: expected ',' or "
        "']', but got '<stream end>'); fix that line of the gate file"]


def test_gate_file_mistakes_are_one_line_naming_file_line_and_key(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("checks:\n  - metric: quant/top1\n    schemes: [ptq_*]\n    max_dorp: 1.0\n")
    assert main(["gate", "digits", "--file", str(typo)]) == 2
    assert _err_line(capsys) == (f"quantbench gate: {typo}:4: checks[0].max_dorp: unknown gate check key "
                                 "'max_dorp'; did you mean max_drop?\n")
    for text, expected in [("chekcs: []\n", ":1: chekcs: unknown gate file key 'chekcs'; did you mean checks"),
                           ("checks:\n  - metric: quant/top1\n    min: high\n", ":3: checks[0].min: 'high' is not a number"),
                           ("checks:\n  - metric: quant/top1\n", ":2: checks[0]: checks nothing; give it min:"),
                           ("models: resnet18\nchecks: []\n", ":2: checks: needs a list of checks")]:
        typo.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_gates(typo)
        assert str(info.value).startswith(str(typo)) and expected in str(info.value), info.value
    gone = tmp_path / "gone.yaml"
    assert main(["gate", "digits", "--file", str(gone)]) == 2
    assert f"{gone}: no such gate file; pass an existing --file PATH (conf/gates/ holds digits, " in _err_line(capsys)
