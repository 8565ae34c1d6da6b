"""Peer engines as an axis of the sweep: the scheme-mapping table, the file protocol, a peer engine through
the real harness (Hydra multirun, MLflow store, onnxruntime), the engines report and gate, and a missing
engine (one line, exit 2, the sweep goes on)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from harness_overrides import DEPLOY_FAST
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.harness.config import CONF_DIR, compose_config, resolve_tree
from quantbench.harness.engines import resolve_mapping
from quantbench.harness.tracking import Store, run_hash
from quantbench.peers.mapping import PEERS, TABLE, Features, mapping_table, resolve
from quantbench.peers.protocol import PeerJob, PeerRecord, load_tensors, save_tensors
from quantbench.peers.runner import EngineUnavailableError, check_available
from quantbench.report import write_report
from quantbench.report.gate import GateCheck, GateFile, evaluate_gates
from quantbench.report.record import select

SCHEMES = sorted(p.stem for p in (CONF_DIR / "scheme").glob("*.yaml"))
SMALL = ("data.val_fraction=0.15", "data.calib_size=32", "data.calib_batch_size=16", "scheme.calib_batches=1",
         "run.latency_iters=2", *DEPLOY_FAST, "run.latency_batch=4")


@functools.cache
def _scheme_tree(name: str) -> str:
    return json.dumps(resolve_tree(compose_config([f"scheme={name}"]))["scheme"])


def _scheme(name: str) -> dict:
    return json.loads(_scheme_tree(name))


@pytest.mark.parametrize("engine", PEERS)
def test_the_mapping_table_says_something_for_every_scheme(engine):
    """Every engine x every scheme of conf/scheme/ resolves: options, an approximation that names the difference,
    or a reason it cannot run; none is silently approximated."""
    for name in SCHEMES:
        m = resolve_mapping(_scheme(name), {"name": engine})
        assert m.status in ("supported", "approximate", "unsupported"), (engine, name)
        if m.status == "unsupported":
            assert m.reason and "{" not in m.reason, (engine, name)
        if m.status == "approximate":
            assert m.notes and all(n for n in m.notes), (engine, name)


def test_the_mapping_of_the_shared_schemes():
    ort_float = resolve_mapping(_scheme("ptq_float"), {"name": "ort"})
    assert ort_float.status == "supported"
    assert ort_float.options == {"weight_type": "QInt8", "activation_type": "QUInt8", "per_channel": False,
                                 "calibrate_method": "MinMax", "symmetric_activation": True}
    assert resolve_mapping(_scheme("ptq_float_perchannel"), {"name": "ort"}).options["per_channel"] is True
    pow2 = resolve_mapping(_scheme("ptq_pow2"), {"name": "ort"})
    assert pow2.status == "unsupported" and "power-of-two" in pow2.reason
    assert resolve_mapping(_scheme("ptq_pow2_mse"), {"name": "quark"}).options["pow2_method"] == "mse"
    assert resolve_mapping(_scheme("ptq_pow2"), {"name": "quark"}).options["scale_type"] == "power_of_2"
    torchao = resolve_mapping(_scheme("ptq_float"), {"name": "torchao"})
    assert torchao.status == "approximate" and any("uint8 asymmetric" in n for n in torchao.notes)
    for engine in PEERS:  # LSQ QAT, AdaRound and the float reference are quantbench's alone here
        for name in ("qat_lsq", "ptq_w4a8_adaround", "float"):
            assert not resolve_mapping(_scheme(name), {"name": engine}).supported, (engine, name)
        tqt = resolve_mapping(_scheme("qat_tqt"), {"name": engine})
        assert tqt.supported == (engine == "quark"), engine  # Quark's TQT, trained in its own virtualenv
    assert resolve_mapping(_scheme("qat_tqt"), {"name": "quark"}).options["qat"] == "tqt"
    assert "CPU" in resolve_mapping(_scheme("qat_lsq"), {"name": "quark"}).reason
    # the engine's own options are laid over the table's
    entropy = resolve_mapping(_scheme("ptq_float"), {"name": "ort", "options": {"calibrate_method": "Entropy"}})
    assert entropy.options["calibrate_method"] == "Entropy"


def test_an_unlisted_feature_value_is_unsupported_not_approximated(monkeypatch):
    monkeypatch.setitem(TABLE["ort"], "scale", {"float": {}})
    m = resolve("ort", Features(scale="log2"))
    assert m.status == "unsupported" and m.reason == "ort has no mapping for scale=log2"
    assert "| ptq_float |" in mapping_table({"ptq_float": Features()})


def test_the_file_protocol_round_trips(tmp_path):
    job = PeerJob(engine="ort", scheme="ptq_float", options={"per_channel": False, "calibrate_method": "MinMax"},
                  threads=2, seed=3, input_names=["x"], eval_inputs="eval.pt")
    job.save(tmp_path)
    back = PeerJob.load(tmp_path)
    assert back == job and back.root == str(tmp_path) and back.path("calib.pt") == tmp_path / "calib.pt"
    assert json.loads((tmp_path / "job.json").read_text())["options"]["calibrate_method"] == "MinMax"
    record = PeerRecord("nncf", version="3.4.0", options={"preset": "performance"}, onnx="model.onnx",
                        quantize_s=1.5, notes=["fast bias correction"], metrics={"latency/x_ms": 2.0})
    record.save(tmp_path)
    assert PeerRecord.load(tmp_path) == record
    batches = [torch.randn(2, 3, 4, 4), (torch.randn(1, 5), torch.arange(3))]
    save_tensors(batches, tmp_path / "t.pt")
    loaded = load_tensors(tmp_path / "t.pt")
    assert torch.equal(loaded[0], batches[0]) and torch.equal(loaded[1][1], batches[1][1])


def test_quantbench_as_the_engine_keeps_every_earlier_config_hash():
    """engine=quantbench (the default) leaves the hash as before engines were an axis: the runs of record stay."""
    tree = resolve_tree(compose_config(["sweep=digits", "model=resnet18", "scheme=ptq_float"]))
    assert run_hash(tree) == "945c4d86d9745318"
    peer = resolve_tree(compose_config(["sweep=digits", "model=resnet18", "scheme=ptq_float", "engine=ort"]))
    assert run_hash(peer) != run_hash(tree)
    moved = resolve_tree(compose_config(["sweep=digits", "model=resnet18", "scheme=ptq_float", "engine=quark",
                                         "engine.venv=/elsewhere", "engine.timeout_s=5"]))
    default = resolve_tree(compose_config(["sweep=digits", "model=resnet18", "scheme=ptq_float", "engine=quark"]))
    assert run_hash(moved) == run_hash(default), "where the virtualenv is does not change a result"


def test_a_missing_engine_is_one_line(tmp_path):
    with pytest.raises(EngineUnavailableError, match=r"^engine=quark: its virtualenv .* is not there; create it "
                                                     r"with `make engines`"):
        check_available("quark", isolated=True, venv=str(tmp_path / "nope"))
    with pytest.raises(EngineUnavailableError, match="no such peer engine"):
        check_available("tensorrt")


@pytest.fixture
def small(digits_overrides, tracking_overrides) -> list[str]:
    return [*digits_overrides, *tracking_overrides, *SMALL]


def _store(overrides: list[str]) -> Store:
    return Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))


@pytest.mark.slow  # ~20 s: a two-engine sweep; the peers run in test_peers_*.py, CI runs an engines sweep
def test_a_peer_engine_runs_in_the_sweep_on_the_same_metric_code(small, tmp_path, capsys, monkeypatch):
    """quantbench and onnxruntime's quantizer in one real sweep: the same float model and calibration batches,
    each ONNX model scored in onnxruntime by the task; a scheme onnxruntime cannot express is recorded as
    unsupported with the reason; the engines report puts them side by side and a gate compares them."""
    monkeypatch.setenv("CI", "true")
    grid = ["scheme=ptq_float,ptq_pow2", "engine=quantbench,ort"]
    assert main(["sweep", "digits", "--id", "eng-1", *small, *grid]) == 0
    runs = {(r.data.tags["scheme"], r.data.tags["engine"]): r for r in _store(small).sweep_runs("eng-1")}
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
    ort_run = runs[("ptq_float", "ort")]
    m = ort_run.data.metrics
    assert ort_run.data.tags["engine_version"].startswith("ort 1.")
    assert ort_run.data.params["engine_options.calibrate_method"] == "MinMax"
    for key in ("onnx/top1", "onnx/sqnr_db", "latency/ort_int8_ms", "time/quantize_s", "float/top1"):
        assert math.isfinite(m[key]), key
    assert m["float/top1"] == runs[("ptq_float", "quantbench")].data.metrics["float/top1"], "the same float model"
    unsupported = runs[("ptq_pow2", "ort")]
    assert unsupported.data.tags["engine_status"] == "unsupported"
    assert "power-of-two" in unsupported.data.tags["engine_reason"] and "onnx/top1" not in unsupported.data.metrics
    report = write_report("digits", [*small, *grid], out_dir=tmp_path)
    assert "| quantbench | ort |" in report.table and "n/a [1]" in report.table
    assert "power-of-two" in report.table and (tmp_path / "digits_speed.png").is_file()
    selection = select("digits", [*small, *grid])
    gates = GateFile(checks=[GateCheck(metric="fidelity/onnx_sqnr_db", schemes=["ptq_float"], engines=["quantbench"],
                                       min_vs_peers=-100.0)])
    results = evaluate_gates(gates, selection.record.frame(finished_only=False), ["test_resnet"],
                             ["ptq_float", "ptq_pow2"], ["quantbench", "ort"])
    (compared,) = [r for r in results if "best peer" in r.check]
    assert compared.passed and "(ort)" in compared.check


def test_a_missing_engine_fails_its_runs_in_one_line_and_the_sweep_goes_on(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    gone = f"engine.venv={tmp_path}/no-venv"
    assert main(["run", *small, "scheme=ptq_float", "engine=quark", gone]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quantbench")]
    assert len(lines) == 1 and "make engines" in lines[0] and "Traceback" not in err
    assert _store(small).client.search_runs([e.experiment_id for e in _store(small).client.search_experiments()]) == []
    code = main(["sweep", "digits", "--id", "eng-2", *small, "scheme=float", "engine=quantbench,quark", gone])
    out = capsys.readouterr().out
    assert code == 2 and "1 FINISHED, 1 FAILED" in out and "make engines" in out
    runs = {r.data.tags["engine"]: r for r in _store(small).sweep_runs("eng-2")}
    assert runs["quantbench"].info.status == "FINISHED"
    assert runs["quark"].data.tags["error_kind"] == "input"


def test_make_sweep_engines_all_names_every_engine():
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "ALL_ENGINES := quantbench$(comma)ort$(comma)torchao$(comma)nncf$(comma)quark" in text
    assert {p.stem for p in (CONF_DIR / "engine").glob("*.yaml")} == {"quantbench", *PEERS}


def test_a_bad_engine_option_is_one_line_naming_it(small, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert main(["run", *small, "scheme=ptq_float", "engine=ort", "engine.options={calibrate_methd: Entropy}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quantbench")]
    assert len(lines) == 1 and "engine.options" in lines[0] and "calibrate_methd" in lines[0]
    assert "calibrate_method" in lines[0] and "Traceback" not in err


@pytest.mark.slow
def test_every_installed_engine_runs_a_tiny_model_through_the_harness(small, monkeypatch):
    """torchao, NNCF and (where `make engines` made its virtualenv) AMD Quark through the real sweep: a record,
    an ONNX model onnxruntime runs, finite metrics; an engine that is not installed is a FAILED input run."""
    monkeypatch.setenv("CI", "true")
    engines = ["torchao", "nncf", "quark"]
    code = main(["sweep", "digits", "--id", "eng-all", *small, "scheme=ptq_float,ptq_pow2", f"engine={','.join(engines)}",
                 "engine.options={torchao: {inductor_latency: false}}"])
    runs = {(r.data.tags["scheme"], r.data.tags["engine"]): r for r in _store(small).sweep_runs("eng-all")}
    assert len(runs) == 6
    quark_here = (Path(__file__).resolve().parents[1] / ".engines" / "quark" / "bin" / "python").exists()
    for (scheme, engine), run in runs.items():
        if engine == "quark" and not quark_here:
            assert run.data.tags["error_kind"] == "input" and "make engines" in run.data.tags["error"]
            continue
        assert run.info.status == "FINISHED", (scheme, engine, run.data.tags.get("error"))
        status = run.data.tags["engine_status"]
        if scheme == "ptq_pow2" and engine != "quark":
            assert status == "unsupported" and "power-of-two" in run.data.tags["engine_reason"]
            continue
        assert status in ("supported", "approximate") and run.data.tags["engine_version"].startswith(engine)
        m = run.data.metrics
        for key in ("onnx/top1", "fidelity/onnx_sqnr_db", "latency/ort_int8_ms", "time/quantize_s"):
            assert math.isfinite(m[key]), (scheme, engine, key)
        if engine in ("torchao", "quark"):  # a torch-side model: scored by the same task code
            assert math.isfinite(m["quant/top1"]) and m["onnx/parity_top1"] >= 0
    assert code == (0 if quark_here else 2)


def test_a_fixed_batch_onnx_model_is_scored_and_logged_at_any_batch(tmp_path):
    """A peer's static-graph export (Quark's) has a fixed batch: onnxruntime runs it in chunks (the last one
    padded), and its MLflow signature is found at that batch."""
    from quantbench.engine import check, export_onnx
    from quantbench.harness.tracking import onnx_signature

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    path = export_onnx(model, (torch.randn(4, 3, 6, 6),), tmp_path / "m.onnx", dynamic_batch=False)
    predict = check.ort_predict_fn(check.ort_session(path))
    x = torch.randn(7, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(predict(x), model(x), atol=1e-5) and predict(x[:4]).shape[0] == 4
    signature = onnx_signature(path, x[:3].numpy())
    assert signature.inputs.inputs[0].shape == (-1, 3, 6, 6)
