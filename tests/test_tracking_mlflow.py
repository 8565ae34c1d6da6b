"""What the MLflow UI shows beyond params and metrics: the ONNX model as an MLflow model of its run (the
Models column, the registry), the data sets as run inputs (the Dataset column), and a sweep's parent run
that groups its runs (``mlflow.parentRunId``) and is never read as a result.

Each test writes into a fresh sqlite store (a copy of the session's empty one) with its own artifact
folder; the ONNX models are tiny graphs built with ``onnx.helper``, so no test needs torch to export."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper

from quantbench.errors import ArtifactWriteError
from quantbench.harness.config import compose_config
from quantbench.harness.tracking import KIND_TAG, PARENT_TAG, Store, data_inputs, run_hash
from quantbench.report.runs import load_runs


@pytest.fixture
def store(tmp_path, empty_store_db) -> Store:
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_store_db, tmp_path / "mlruns" / "mlflow.db")
    return Store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", (tmp_path / "mlruns" / "artifacts").as_uri())


def _onnx(path: Path, features: int = 8, classes: int = 3) -> Path:
    """A float MLP (Gemm, Relu, Gemm) with a symbolic batch: input ``x`` [batch, features] -> ``logits``."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((features, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, classes)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["logits"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(store: Store, experiment: str = "digits", **kwargs):
    return store.start_run(experiment, "test_resnet-ptq", {"task": "digits", "model": "test_resnet",
                                                           "scheme": "ptq", "sweep": "s1", "config_hash": "abc"},
                           **kwargs)


def test_onnx_model_is_a_logged_model_of_its_run_with_a_signature(store, tmp_path, monkeypatch):
    uri_before = mlflow.get_tracking_uri()
    recorder = _run(store)
    model_id = recorder.log_onnx_model(_onnx(tmp_path / "model.onnx"), np.ones((4, 8), np.float32))
    recorder.finish()

    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == uri_before  # no global state left
    run = store.client.get_run(recorder.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]  # the UI's Models column
    logged = store.client.get_logged_model(model_id)
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == recorder.run_id
    assert logged.experiment_id == run.info.experiment_id and logged.name == "model"
    assert logged.tags["scheme"] == "ptq" and logged.tags["config_hash"] == "abc"
    assert logged.artifact_location.startswith(store.artifact_root)  # the run's store, not ./mlruns

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)  # models:/ URIs resolve through the tracking URI
    signature = Model.load(f"models:/{model_id}").signature.to_dict()  # as the MLmodel file has it
    assert json.loads(signature["inputs"]) == [{"type": "tensor", "name": "x",
                                                "tensor-spec": {"dtype": "float32", "shape": [-1, 8]}}]
    assert json.loads(signature["outputs"]) == [{"type": "tensor", "name": "logits",
                                                 "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}]
    proto = mlflow.onnx.load_model(f"models:/{model_id}")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((5, 8), np.float32)})[0].shape == (5, 3)

    onnx.checker.check_model(str(store.download_model(recorder.run_id, tmp_path / "down")))  # one line for tests
    with pytest.raises(FileNotFoundError):
        store.download_model(recorder.run_id, tmp_path / "down", name="other")

    store.client.create_registered_model("digits-test_resnet")  # the registry takes it
    version = store.client.create_model_version("digits-test_resnet", f"models:/{model_id}", recorder.run_id,
                                                model_id=model_id)
    assert str(version.version) == "1" and version.run_id == recorder.run_id


def test_a_full_disk_while_logging_the_model_is_an_artifact_write_error(store, tmp_path, monkeypatch):
    recorder = _run(store)
    path = _onnx(tmp_path / "model.onnx")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(ArtifactWriteError, match="no space left on the device writing artifact model"):
        recorder.log_onnx_model(path, np.ones((2, 8), np.float32))
    (failed,) = store.client.search_logged_models([store.experiment_id("digits")])
    assert failed.status == LoggedModelStatus.FAILED
    assert not [p for p in (tmp_path / "mlruns" / "artifacts").rglob("*") if p.is_file()]  # space left to error.txt
    assert not store.client.get_run(recorder.run_id).outputs.model_outputs  # a failed model is not the run's

    monkeypatch.setattr(onnx, "save_model", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # anything but a full disk is not a bad input: it propagates as is
        recorder.log_onnx_model(path, np.ones((2, 8), np.float32))


def _inputs(store: Store, run_id: str) -> dict[str, tuple]:
    return {d.dataset.name: (d.tags[0].value, d.dataset) for d in store.client.get_run(run_id).inputs.dataset_inputs}


def test_the_data_sets_are_inputs_of_the_run(store, compose_tree, digits16_root):
    tree = compose_tree("task=digits", f"data.root={digits16_root}", "scheme=ptq_pow2")
    recorder = _run(store)
    recorder.log_data_inputs(tree)
    inputs = _inputs(store, recorder.run_id)
    assert {name: context for name, (context, _) in inputs.items()} == {"digits-val": "eval",
                                                                         "digits-train": "calibration"}
    _, val = inputs["digits-val"]
    assert val.source_type == "local" and f'"{Path(digits16_root).resolve()}"' in val.source
    assert len(val.digest) == 8 and '"split": "val"' in val.profile

    # the digest follows what is read (not how fast), and costs no image read
    again = {d["name"]: d["digest"] for d in data_inputs(tree)}
    fewer = compose_tree("task=digits", f"data.root={digits16_root}", "scheme=ptq_pow2", "data.val_fraction=0.5",
                         "data.num_workers=3")
    assert again["digits-val"] == val.digest
    assert {d["name"]: d["digest"] for d in data_inputs(fewer)}["digits-val"] != val.digest
    workers = compose_tree("task=digits", f"data.root={digits16_root}", "scheme=ptq_pow2", "data.num_workers=3")
    assert {d["name"]: d["digest"] for d in data_inputs(workers)} == again

    # a float run calibrates nothing; a generator without a root is named as the source; detection's split
    assert [d["context"] for d in data_inputs(compose_tree("task=digits", "scheme=float"))] == ["eval"]
    (generated,) = data_inputs(compose_tree("task=digits", "scheme=float", "data.root=null"))
    assert (generated["source"], generated["source_type"]) == ("digits", "generator")
    shapes = data_inputs(compose_tree("task=shapes", "model=yolo_nas_test", "scheme=ptq_float"))
    assert [d["name"] for d in shapes] == ["shapes-val", "shapes-train"]
    other = _run(store)
    other.log_data_inputs(compose_tree("task=digits", "scheme=float", "data.root=null"))
    assert _inputs(store, other.run_id)["digits-val"][1].source_type == "generator"


def test_the_parent_run_groups_a_sweep_and_is_never_a_result(store, compose_tree):
    parent = store.start_sweep("digits", "s1", tags={"task": "digits"}, params={"task": "digits", "grid": "digits"})
    child = _run(store, parent_run=parent.run_id)
    child.finish()
    adhoc = _run(store)  # no parent: no tag
    adhoc.finish()

    run = store.client.get_run(child.run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id
    assert PARENT_TAG not in store.client.get_run(adhoc.run_id).data.tags
    assert store.client.get_run(parent.run_id).data.tags[KIND_TAG] == "sweep"
    # every listing that reports, gates or resumes read leaves the parent out
    assert {r.info.run_id for r in store.search("")} == {child.run_id, adhoc.run_id}
    assert {r.info.run_id for r in store.sweep_runs("s1")} == {child.run_id, adhoc.run_id}
    assert set(load_runs(store, "digits")["run_id"]) == {child.run_id, adhoc.run_id}
    assert store.reap_stale("digits", stale_after_s=0) == []  # a RUNNING parent is not a stale job record
    assert store.sweep_parent("digits", "s1").info.run_id == parent.run_id

    parent.end("FAILED", {"error": "1 of 2 runs FAILED"})
    again = store.start_sweep("digits", "s1", tags={"task": "digits"}, params={"task": "digits", "jobs": "4"})
    assert again.run_id == parent.run_id  # the same --id again: the same parent, RUNNING again
    reused = store.client.get_run(parent.run_id)
    assert reused.info.status == "RUNNING" and reused.data.tags["status"] == "RUNNING"
    assert "error" not in reused.data.tags and reused.data.params == {"task": "digits", "grid": "digits",
                                                                      "jobs": "4"}

    # a parent whose sweep was SIGKILLed on this host is marked KILLED by the next sweep
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.client.set_tag(parent.run_id, "pid", dead.stdout.strip())
    store.client.set_tag(parent.run_id, "pid_start", "")
    assert store.reap_stale_parents("digits") == [parent.run_id]
    assert store.client.get_run(parent.run_id).info.status == "KILLED"

    # the parent id is tracking's: it changes no run's hash
    tree = compose_tree("task=digits", "scheme=ptq_pow2")
    assert run_hash(tree) == run_hash(compose_tree("task=digits", "scheme=ptq_pow2",
                                                   f"tracking.parent_run='{parent.run_id}'"))


def test_a_sweep_has_one_parent_run_over_its_runs_and_the_dataset_inputs(digits_overrides, run_overrides):
    from quantbench.harness.sweep import sweep

    small = [*digits_overrides, *run_overrides, "data.val_fraction=0.15", "data.calib_size=32",
             "data.calib_batch_size=16", "scheme.calib_batches=1"]
    store = Store.from_config(OmegaConf.to_container(compose_config(small).tracking, resolve=True))
    outcome = sweep("digits", [*small, "scheme=float,ptq_pow2"], sweep_id="p-1")
    assert outcome.ok and len(outcome.finished) == 2, outcome
    parent = store.sweep_parent("digits", "p-1")
    assert parent.info.status == "FINISHED" and parent.data.tags[KIND_TAG] == "sweep"
    assert parent.data.metrics == {"jobs": 2.0, "runs_finished": 2.0, "runs_failed": 0.0, "runs_skipped": 0.0}
    assert parent.data.params["task"] == "digits" and "scheme=float,ptq_pow2" in parent.data.params["overrides"]
    runs = store.sweep_runs("p-1")
    assert len(runs) == 2 and all(r.data.tags[PARENT_TAG] == parent.info.run_id for r in runs)
    contexts = {r.data.tags["scheme"]: sorted(d.tags[0].value for d in r.inputs.dataset_inputs) for r in runs}
    assert contexts == {"float": ["eval"], "ptq_pow2": ["calibration", "eval"]}

    # the same id again: every job skipped, the same parent, FINISHED again with the new counts
    again = sweep("digits", [*small, "scheme=float,ptq_pow2"], sweep_id="p-1")
    assert again.ok and again.skipped == 2
    reused = store.sweep_parent("digits", "p-1")
    assert reused.info.run_id == parent.info.run_id and reused.info.status == "FINISHED"
    assert reused.data.metrics["runs_skipped"] == 2.0 and reused.data.metrics["runs_finished"] == 0.0
    assert len(store.search("", ["digits"], parents=True)) == 3
