"""OpenVINO as a second runtime for the exported ONNX: predict and latency beside onnxruntime's, the machine a
run measured on, ``run.runtime`` in the harness, and OpenVINO's speedup in the reports.

OpenVINO reads the same QDQ file and fuses it into its own integer kernels; where its arithmetic differs
from onnxruntime's (requantization rounding, an AVX2 CPU's saturating int16 pair sums in onnxruntime's
U8S8 kernels), the two differ by a few quantization steps. That difference is reported
(``runtime/ov_vs_ort_*``), not gated, so the tests bound it on a model small enough to stay near exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pandas as pd
import pytest
import torch
from engine_models import batches, reestimate_bn
from omegaconf import OmegaConf
from torch import nn

from quantbench.cli import main
from quantbench.engine import ModelQuantizer, capture, check, export_onnx, machine, presets, runtimes
from quantbench.engine.storage import default_unsigned_weights
from quantbench.errors import ConfigError
from quantbench.harness.config import compose_config, resolve_tree
from quantbench.harness.schema import check_runtime
from quantbench.harness.tracking import Store, machine_tags, run_hash
from quantbench.report.table import engines_table, results_table


class TwoHeads(nn.Module):
    """conv-bn-relu, pool, two linear heads: two graph outputs, so their order is checked too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.cls = nn.Linear(8, 6)
        self.box = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.cls(y), self.box(y)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny two-output model: its fp32 export, int8_float QDQ export and frozen graph."""
    torch.manual_seed(0)
    model = reestimate_bn(TwoHeads(), (8, 3, 12, 12))
    tmp = tmp_path_factory.mktemp("runtimes")
    x = torch.randn(2, 3, 12, 12)
    gm = capture(model, (x,))
    quantizer = ModelQuantizer(presets.get("int8_float"))
    frozen = quantizer.freeze(quantizer.quantize_model(gm, batches(2, (8, 3, 12, 12), seed=1)))
    return {"fp32": export_onnx(gm, (x,), tmp / "fp32.onnx"), "int8": export_onnx(frozen, (x,), tmp / "int8.onnx"),
            "frozen": frozen, "tmp": tmp}


def test_openvino_predicts_what_onnxruntime_does_in_graph_output_order(exported):
    x = batches(1, (5, 3, 12, 12), seed=2)[0]
    ov = runtimes.session("openvino", exported["fp32"], threads=1).predict_fn()(x)
    ort = runtimes.session("ort", exported["fp32"], threads=1).predict_fn()(x)
    assert isinstance(ov, tuple) and [o.shape for o in ov] == [(5, 6), (5, 3)]
    for a, b in zip(ov, ort):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # f32 precision: never bf16

    scales = check.output_scales(exported["frozen"])
    assert runtimes.onnx_output_scales(exported["int8"]) == pytest.approx(scales)
    agreement = runtimes.Agreement(runtimes.session("openvino", exported["int8"], threads=1).predict_fn(),
                                   runtimes.session("ort", exported["int8"], threads=1).predict_fn(), scales)
    ov_int8 = runtimes.session("openvino", exported["int8"], threads=1).predict_fn()
    ort_int8 = runtimes.session("ort", exported["int8"], threads=1).predict_fn()
    worst, agree, total = 0.0, 0, 0
    for batch in batches(3, (8, 3, 12, 12), seed=3):
        out = agreement(batch)
        a, b = ov_int8(batch), ort_int8(batch)
        worst = max(worst, *(float((x - y).abs().max()) / s for x, y, s in zip(a, b, scales)))
        agree += int((a[0].argmax(1) == b[0].argmax(1)).sum())
        total += batch.shape[0]
    assert isinstance(out, tuple) and out[0].shape == (8, 6)
    metrics = agreement.metrics("ov_vs_ort")
    # The agreement is what it is (a report, not a gate): on an AVX2 CPU without VNNI OpenVINO's int8
    # kernels saturate int16 pair sums (tens of steps apart on this random net), with VNNI they do not.
    assert metrics["ov_vs_ort_max_lsb"] == pytest.approx(worst, abs=1e-3), metrics
    assert metrics["ov_vs_ort_agree_top1"] == pytest.approx(100.0 * agree / total), metrics


def test_a_fixed_batch_runs_in_chunks(exported):
    """A static-graph export (a peer toolkit's): batch 2 fixed; 5 images run as 2 + 2 + (1 padded)."""
    model = onnx.load(str(exported["fp32"]))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[0].dim_value = 2
    path = exported["tmp"] / "fixed.onnx"
    onnx.save(model, str(path))
    fixed = runtimes.session("openvino", path, threads=1)
    assert fixed.fixed_batch == 2
    x = batches(1, (5, 3, 12, 12), seed=4)[0]
    ours = fixed.predict_fn()(x)
    ref = runtimes.session("ort", exported["fp32"], threads=1).predict_fn()(x)
    assert [o.shape[0] for o in ours] == [5, 5]
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-4)


def test_latencies_mix_runtimes_interleaved(exported):
    x = torch.randn(2, 3, 12, 12)
    sessions = [runtimes.session("ort", exported["fp32"], 1), runtimes.session("openvino", exported["fp32"], 1),
                runtimes.session("openvino", exported["int8"], 1), runtimes.session("ort", exported["int8"], 1)]
    ms = runtimes.latencies(sessions, x, warmup=1, iters=3)
    assert len(ms) == 4 and all(t > 0 for t in ms)
    cfg = sessions[1].config
    assert cfg["INFERENCE_PRECISION_HINT"] == "f32" and cfg["INFERENCE_NUM_THREADS"] == 1
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        runtimes.session("tensorrt", exported["fp32"])


def test_openvino_is_imported_with_its_telemetry_declined(exported, tmp_path):
    """A plain ``import openvino`` writes a client id and usage counter under ``~/intel`` (its ovc tools
    build a telemetry object at import); the runtime's import does not, and the environment is restored."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI", "TF_BUILD", "JENKINS_URL")}
    root = Path(__file__).resolve().parents[1]

    def home_after(code: str, name: str) -> Path:
        home = tmp_path / name
        home.mkdir()
        out = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return home

    assert (home_after("import openvino", "plain") / "intel").exists(), "the control: openvino's own default"
    code = ("import os; from quantbench.engine import runtimes; "
            f"s = runtimes.session('openvino', {str(exported['fp32'])!r}, 1); "
            "assert 'CI' not in os.environ and 'NNCF_CI' not in os.environ")
    assert not (home_after(code, "ours") / "intel").exists()


def test_the_machine_is_described_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni "
                    "amx_int8\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    m = machine.describe(info)
    assert m.cpu == "Test CPU 9000" and m.isa == ("avx2", "avx512f", "avx512_vnni", "amx_int8")
    assert m.cores >= 1 and 1 <= m.cpus_allowed <= m.cores
    assert machine.describe(tmp_path / "none").cpu  # no /proc/cpuinfo: platform's name
    tags = machine_tags()
    assert set(tags) == {"machine.cpu", "machine.cores", "machine.cpus_allowed", "machine.isa"}
    assert tags["machine.isa"] == (",".join(machine.describe().isa) or "none")


def test_run_runtime_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match=r"^run.runtime=openvno: not a runtime; did you mean openvino\? one of ort, "
                                          r"openvino, both$"):
        check_runtime("openvno")
    check_runtime("both")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(machine.RuntimeUnavailableError, match=r"^run.runtime=both: the openvino package is not "
                                                              r"installed in .*; install it with `pip install openvino`"):
        check_runtime("both")
    check_runtime("ort")  # onnxruntime alone needs no OpenVINO


def test_the_default_runtime_keeps_the_config_hash():
    base = ["sweep=digits", "model=resnet18", "scheme=ptq_float"]
    tree = resolve_tree(compose_config(base))
    assert run_hash(tree) == "945c4d86d9745318"  # as tests/test_engines.py pins it
    both = resolve_tree(compose_config([*base, "run.runtime=both"]))
    assert run_hash(both) != run_hash(tree), "a run that measures OpenVINO too is not the same run"


def test_a_bad_or_missing_runtime_is_one_line_and_exit_2(digits_overrides, tracking_overrides, capsys, monkeypatch):
    args = ["run", *digits_overrides, *tracking_overrides, "scheme=float"]
    assert main([*args, "run.runtime=openvion"]) == 2
    err = capsys.readouterr().err
    assert "run.runtime=openvion: not a runtime; did you mean openvino?" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main([*args, "run.runtime=openvino"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quantbench")]
    assert len(lines) == 1 and "pip install openvino" in lines[0] and "make install" in lines[0]
    assert "Traceback" not in err


@pytest.mark.slow  # a whole run on both runtimes with a deploy twin (~15 s)
def test_a_run_on_both_runtimes_logs_openvinos_metrics_and_the_deploy_twins(digits_overrides, run_overrides):
    """One run on both runtimes: OpenVINO's metrics beside onnxruntime's, and the deploy stage
    (quantbench/harness/deploy.py) times a twin of the model x scheme at run.deploy_size=32 (the task's
    images are 16x16) at 1 and 2 images, 1 thread, in each runtime; the run's own latency stays at 16x16."""
    from quantbench.harness.run import run

    overrides = [*digits_overrides, *run_overrides, "data.val_fraction=0.15", "data.calib_size=32",
                 "data.calib_batch_size=16", "scheme.calib_batches=1", "scheme=ptq_float", "run.runtime=both",
                 "run.deploy_size=32", "run.deploy_batches=[1,2]", "run.deploy_threads=[1]", "run.deploy_iters=2"]
    result = run(compose_config(overrides))
    assert result.status == "FINISHED", result.error
    m = result.metrics
    for key in ("onnx/top1", "onnx/parity_top1", "latency/ort_fp32_ms", "latency/ort_int8_ms", "latency/speedup",
                "onnx_ov/top1", "onnx_ov/top5", "latency/ov_fp32_ms", "latency/ov_int8_ms", "latency/ov_speedup",
                "runtime/ov_vs_ort_max_lsb", "runtime/ov_vs_ort_max_abs", "runtime/ov_vs_ort_agree_top1"):
        assert key in m, key
    assert m["latency/ov_speedup"] == pytest.approx(m["latency/ov_fp32_ms"] / m["latency/ov_int8_ms"])
    assert 0 <= m["runtime/ov_vs_ort_agree_top1"] <= 100
    store = Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))
    tags = store.client.get_run(result.run_id).data.tags
    assert tags["machine.cpu"] and tags["machine.cores"].isdigit() and "machine.isa" in tags
    assert tags["openvino_version"] == machine.openvino_version()
    assert tags["export.unsigned_weights"] == str(default_unsigned_weights()).lower()
    assert m["deploy/size"] == 32 and m["latency/batch"] == 4
    for prefix, ms in (("", "ort_"), ("ov_", "ov_")):
        for batch in (1, 2):
            fp32, int8 = m[f"deploy/{ms}fp32_ms_t1_b{batch}"], m[f"deploy/{ms}int8_ms_t1_b{batch}"]
            assert m[f"deploy/{prefix}speedup_t1_b{batch}"] == pytest.approx(fp32 / int8)
    assert not [k for k in m if k.startswith("deploy/") and "_t2_" in k]  # only the threads asked for


def _row(engine: str, ov: bool) -> dict:
    row = {"model": "resnet18", "scheme": "ptq_float", "engine": engine, "model_name": "ResNet-18",
           "method": "PTQ", "primary_metric": "top1", "status": "FINISHED", "engine_status": "supported",
           "onnx/top1": 70.0, "quant/top1": 70.1, "latency/ort_fp32_ms": 10.0, "latency/ort_int8_ms": 5.0}
    if ov:
        row.update({"latency/ov_fp32_ms": 9.0, "latency/ov_int8_ms": 3.0})
    return row


def test_reports_show_openvinos_speedup_only_where_it_was_measured():
    plain = pd.DataFrame([_row("quantbench", False)])
    assert "OpenVINO" not in results_table(plain) and "OV" not in engines_table(plain)
    mixed = pd.DataFrame([_row("quantbench", True), _row("ort", False)])
    table = results_table(mixed)
    header, _, first, second = table.splitlines()
    assert "| Int8 speedup (ORT) | Int8 speedup (OpenVINO) | Quantize time |" in header
    assert "| 2.00x | 3.00x |" in first and "| 2.00x | — |" in second
    engines = engines_table(mixed)
    assert "2.00x (OV 3.00x)" in engines and "Int8 speedup (OpenVINO)" in engines
