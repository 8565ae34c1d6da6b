"""The command line's surface: one line and exit status 2 for every bad input, a traceback for a bug,
nothing recorded for an input no run can get past, and no torch import before a config is known good.

In-process through :func:`quantbench.cli.main` (what the console script calls), with real stores,
real sockets and real Hydra composition; subprocesses where the import state matters.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness_overrides import DEPLOY_FAST
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.harness.config import compose_config
from quantbench.harness.tracking import Store

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _runs(overrides: list[str]) -> list:
    tracking = OmegaConf.to_container(compose_config(overrides).tracking, resolve=True)
    return Store.from_config(tracking).search("")


@pytest.mark.parametrize("argv, expected", [
    (["run", "model=nosuch"], ["model=nosuch", "Choices: mobilenet_v2", "model.name="]),
    (["run", "model=efficientnet_b0"], ["model.name=efficientnet_b0", "timm:"]),
    (["run", "model=base_model"], ["model=base_model", "Choices: mobilenet_v2"]),
    (["run", "model=test_resnt"], ["Did you mean 'test_resnet'"]),
    (["sweep", "digits", "model=test_resnet,nosuch"], ["model=nosuch"]),
    (["sweep", "digits", "scheme=ptq_pow2,ptq_pow3"], ["scheme=ptq_pow3", "Did you mean 'ptq_pow2'"]),
    (["sweep", "digitz"], ["no sweep for task 'digitz'", "did you mean digits"]),
    (["run", "train.baseline.epoch=3"], ["train.baseline.epoch=3", "did you mean train.baseline.epochs"]),
    (["run", "train.baseline.epochs=abc"], ["train.baseline.epochs=abc", "Integer"]),
    (["run", "schem=ptq_pow2"], ["schem=ptq_pow2", "did you mean scheme"]),
    (["run", "model=["], ["model=[", "not a valid override"]),
    (["run", "+experiment=nosuch"], ["experiment=nosuch", "Choices: smoke"]),
    (["run", "tracking.uri=foo://bar"], ["tracking.uri='foo://bar'", "sqlite:///"]),
    (["sweep", "digits", "tracking.uri=foo://bar"], ["tracking.uri='foo://bar'"]),
    (["run", "tracking.uri=sqlite://x.db"], ["three slashes"]),
    (["run", "tracking.uri=file:///tmp/store"], ["tracking.uri='file:///tmp/store'", "sqlite:///"]),
    (["analyze", "model=resnet18"], ["needs a quantized scheme", "scheme=ptq_w4a8"]),
])
def test_config_errors_are_one_line_naming_the_override_and_the_fix(argv, expected, capsys):
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"quantbench {argv[0]}: ")
    for text in expected:
        assert text in line, line
    assert "base_model," not in line and "Config search path" not in line


def test_help_and_typos_are_answered_before_torch_is_imported():
    code = ("import sys; from quantbench.cli import main\n"
            "codes = [main(a) for a in (['run', 'model=nosuch'], ['sweep', 'digits', 'model=a,b'],\n"
            "                           ['run', 'train.baseline.epoch=3'], ['run', 'tracking.uri=foo://x'])]\n"
            "print(codes, sorted(m for m in ('torch', 'mlflow', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2] []", out.stdout + out.stderr
    helped = subprocess.run([sys.executable, "-m", "quantbench.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and "--debug" in helped.stdout and "-v" in helped.stdout


@pytest.fixture
def small(digits_overrides, run_overrides) -> list[str]:
    return [*digits_overrides, *run_overrides, "scheme=float", "data.val_fraction=0.1", "data.calib_size=16",
            "data.calib_batch_size=16", "run.latency_iters=1", *DEPLOY_FAST, "run.latency_batch=2"]


@pytest.mark.parametrize("extra, expected, commands", [
    (["data.root=/nonexistent/digits", "data.generate=null"], ["data.root", "/nonexistent/digits"], ("run", "sweep")),
    (["task=imagenet", "data.root=/nonexistent/imagenet"], ["IMAGENET_ROOT", "/nonexistent/imagenet"], ("run",)),
    (["data.on_corrupt=skipp"], ["data.on_corrupt", "skip"], ("run", "sweep")),
])
def test_missing_data_or_a_refused_value_is_one_line_and_nothing_recorded(small, extra, expected, commands, capsys):
    """Like a device that is not there: checked before the run is recorded, in a run and in a sweep."""
    for argv in (["run", *small, *extra], ["sweep", "digits", *small, *extra]):
        if argv[0] not in commands:
            continue
        assert main(argv) == 2
        line = _one_line("\n".join(ln for ln in capsys.readouterr().err.splitlines()
                                   if ln.startswith("quantbench")))
        for text in expected:
            assert text in line, line
    assert _runs([*small, *extra]) == []


@pytest.mark.parametrize("extra, expected", [
    (["scheme=ptq_w4a8", "scheme.algorithms=[{name:adarond}]"], ["adarond", "did you mean 'adaround'"]),
    (["scheme=ptq_w4a8_adaround", "scheme.algorithm_options={adaround:{iter:5}}"], ["'iter'", "did you mean 'iters'"]),
    (["scheme=ptq_w4a8", "scheme.algorithm_options={adarond:{iters:5}}"], ["algorithm_options.adarond"]),
    (["scheme=ptq_w4a8", "scheme.algorithms=[adaround,cle]"], ["'cle' cannot come after 'adaround'"]),
    (["scheme=qat_lsq", "scheme.algorithms=[adaround]"], ["post-training steps"]),
])
def test_a_bad_algorithm_in_a_scheme_is_one_line_exit_2(small, extra, expected, capsys):
    assert main(["run", *small, *extra]) == 2
    line = _one_line("\n".join(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quantbench")))
    for text in expected:
        assert text in line, line


def test_debug_adds_the_traceback_to_the_line(capsys, monkeypatch):
    assert main(["--debug", "run", "model=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("quantbench run: model=nosuch")
    assert main(["run", "--debug", "model=nosuch"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("QUANTBENCH_DEBUG", "1")
    assert main(["run", "model=nosuch"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("QUANTBENCH_DEBUG")
    assert main(["sweep", "digits", "model=nosuch"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_is_a_traceback_not_a_line(monkeypatch):
    import quantbench.cli as cli

    def broken(_args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "data", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "digits", "--out", "/tmp/x"])


def test_ui_on_a_busy_port_is_one_line_before_anything_starts(tracking_overrides, free_port, capsys):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        for command in ("ui", "server"):
            argv = [command, "--port", str(port), *(tracking_overrides if command == "ui" else [])]
            assert main(argv) == 2
            line = _one_line(capsys.readouterr().err)
            assert f"--port {port}" in line and "in use" in line and f"--port {port + 1}" in line


def test_readme_bad_input_rows_name_tests_that_exist():
    """Every row of the README's bad-input tables points at a test that is there."""
    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"`(test_\w+\.py)::(\w+)`", readme))
    assert len(cited) >= 20
    for path, name in cited:
        source = (ROOT / "tests" / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"README cites missing test {path}::{name}"


def test_a_checkpoint_that_is_not_one_is_one_line_and_nothing_recorded(small, tmp_path, capsys):
    bogus = tmp_path / "weights.pt"
    bogus.write_text("not a checkpoint")
    for extra in ([f"model.checkpoint={bogus}"], [f"model.checkpoint={tmp_path / 'missing.pt'}"]):
        assert main(["run", *small, *extra]) == 2
        line = _one_line("\n".join(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quantbench")))
        assert "model.checkpoint=" in line and "weights_only" not in line, line
    assert _runs(small) == []


def test_detection_data_errors_exit_2_like_classification(shapes_overrides, run_overrides, tmp_path, capsys):
    """A COCO json that does not parse: one line naming the file and the line, exit 2, nothing recorded."""
    root = tmp_path / "coco"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text('{\n "images": [,\n')
    overrides = [*shapes_overrides, *run_overrides, "scheme=float", f"data.root={root}", "data.generate=null"]
    assert main(["run", *overrides]) == 2
    line = _one_line("\n".join(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quantbench")))
    assert "instances_" in line and "line 2" in line, line
    assert _runs(overrides) == []


@pytest.mark.slow  # 20 s; the fast tier checks the engine's part (test_engine_errors.py)
def test_a_sweep_and_its_report_print_no_warning_a_user_cannot_act_on(digits_overrides, run_overrides, tmp_path):
    """What a user sees of `make sweep` and `make report`: progress, results, no library noise."""
    args = [*digits_overrides, *run_overrides, "scheme=float,ptq_pow2", "data.val_fraction=0.1",
            "data.calib_size=16", "data.calib_batch_size=16", "run.latency_iters=1", *DEPLOY_FAST, "run.latency_batch=2"]
    qb = str(Path(sys.executable).with_name("quantbench"))
    env = {**__import__("os").environ, "CI": "true"}
    env.pop("QUANTBENCH_VERBOSE", None)
    out = ""
    for argv in (["sweep", "digits", "--id", "quiet", *args], ["report", "digits", "--out", str(tmp_path), *args]):
        done = subprocess.run([qb, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        out += done.stdout + done.stderr
    noise = [line for line in out.splitlines() if re.search(r"warn|deprecat|Failed to load|^W\d{4} ", line, re.I)]
    assert noise == [], "\n".join(noise)
    assert "2 FINISHED" in out and "2 rows of sweep quiet" in out
