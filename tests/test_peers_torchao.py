"""The torchao peer engine (PT2E + X86InductorQuantizer) through the job protocol and the worker.

A random-init torchvision resnet18 (BN statistics re-estimated) at 32x32: the same float model and
calibration batches go in, a torch-side int8 model and a QDQ ONNX model come out. Inductor's
compile takes a minute on two cores, so the deploy-latency path runs in the slow tier.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from engine_models import batches, torchvision_model  # noqa: E402

from quantbench.engine import export_onnx  # noqa: E402
from quantbench.engine.storage import default_unsigned_weights  # noqa: E402
from quantbench.peers.protocol import PeerJob, PeerRecord, save_tensors  # noqa: E402
from quantbench.peers.worker import run_job  # noqa: E402

SIZE = 32


def _sqnr_db(ref: torch.Tensor, other: torch.Tensor) -> float:
    noise = (ref - other).double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / noise)


@pytest.fixture(scope="module")
def model():
    return torchvision_model("resnet18", SIZE, 10)


@pytest.fixture(scope="module")
def calib():
    # an uneven last batch, as a data loader gives
    return [*batches(2, (8, 3, SIZE, SIZE), seed=1), batches(1, (3, 3, SIZE, SIZE), seed=2)[0]]


@pytest.fixture(scope="module")
def job_files(tmp_path_factory, model, calib):
    """calib.pt, float.pt2 (dynamic batch), state_dict.pt and fp32.onnx, written once; each test copies them."""
    root = tmp_path_factory.mktemp("torchao_job")
    save_tensors(calib, root / "calib.pt")
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (calib[0],), dynamic_shapes=({0: batch},)), root / "float.pt2")
    torch.save(model.state_dict(), root / "state_dict.pt")
    export_onnx(model, (calib[0],), root / "fp32.onnx")
    return root


def _job(job_files, tmp_path, **options) -> PeerJob:
    import shutil

    root = tmp_path / "job"
    shutil.copytree(job_files, root)
    job = PeerJob(engine="torchao", scheme="int8", options=options, threads=2, seed=0)
    job.save(root)
    return job


def _ort(path, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_ptq_torch_model_and_onnx(model, job_files, tmp_path):
    import onnx

    before = {k: v.clone() for k, v in model.state_dict().items()}
    job = _job(job_files, tmp_path, inductor_latency=False)
    record, output = run_job(job.root, model)

    assert record.status == "ok", record.reason
    assert record.version.startswith("0.") or record.version[0].isdigit()
    assert record.options["per_channel"] is True and record.options["reduce_range"] is False
    assert record.options["capture"].startswith("torch.export.export(strict=True, dynamic")
    assert 0 < record.quantize_s < 120
    assert any("X86InductorQuantizer" in n and "per-channel" in n for n in record.notes), record.notes
    assert record.metrics == {}
    assert PeerRecord.load(job.root) == record
    for key, value in model.state_dict().items():  # the caller's float model is left as it was
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    held_out = batches(2, (8, 3, SIZE, SIZE), seed=5) + [torch.randn(1, 3, SIZE, SIZE)]  # any batch size
    with torch.no_grad():
        float_out = torch.cat([model(x) for x in held_out])
        int8_out = torch.cat([output.torch_model(x) for x in held_out])
    assert int8_out.shape == float_out.shape
    assert torch.isfinite(int8_out).all()
    assert _sqnr_db(float_out, int8_out) > 10

    # The ONNX: written into the job directory, QDQ, dynamic batch, and it computes what the torch-side model does.
    assert record.onnx == "model.onnx", record.notes
    path = tmp_path / "job" / record.onnx
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    plain, fast = _ort(path, optimize=False), _ort(path, optimize=True)
    name = plain.get_inputs()[0].name
    assert name == "x"  # fp32.onnx's input name
    plain_out = torch.cat([torch.from_numpy(plain.run(None, {name: x.numpy()})[0]) for x in held_out])
    fast_out = torch.cat([torch.from_numpy(fast.run(None, {name: x.numpy()})[0]) for x in held_out])
    # Without graph optimisation onnxruntime runs the QDQ graph in float, as torch does; float kernels round
    # differently, so a rare value lands one quantization step apart (and a random-init net amplifies it).
    assert _sqnr_db(int8_out, plain_out) > 20
    # With it, onnxruntime's integer kernels: close to torchao's model, and far closer than int8 is to float;
    # on an x86 CPU without VNNI its U8S8 kernels saturate int16 pair sums on torchao's int8 weights
    # (quantbench.engine.storage.default_unsigned_weights), so there only the float-path check above holds.
    if not default_unsigned_weights():
        assert _sqnr_db(int8_out, fast_out) > _sqnr_db(float_out, int8_out)
        assert (fast_out.argmax(1) == int8_out.argmax(1)).float().mean() >= 0.8


@pytest.mark.parametrize("options, match", [
    ({"bogus": 1}, "bogus"),
    ({"per_channel": "yes"}, "per_channel"),
    ({"latency_iters": 0}, "latency_iters"),
    ({"latency_batch": True}, "latency_batch"),
])
def test_bad_option_raises(job_files, tmp_path, options, match):
    job = _job(job_files, tmp_path, **options)
    with pytest.raises(ValueError, match=match):
        run_job(job.root, None)


def test_qat_job_is_unsupported(job_files, tmp_path):
    job = _job(job_files, tmp_path)
    job.qat = {"method": "lsq"}
    job.save(job.root)
    record, output = run_job(job.root, None)
    assert record.status == "unsupported" and "post-training" in record.reason and output is None


@pytest.mark.slow
def test_isolated_program_and_inductor_latency(model, job_files, tmp_path):
    """model=None (an isolated worker): the job's float.pt2 is quantized as it is; inductor deploy timing."""
    job = _job(job_files, tmp_path, onnx_export=False, latency_iters=5, latency_batch=2)
    job.eval_inputs = "eval.pt"
    held_out = batches(2, (4, 3, SIZE, SIZE), seed=5)
    save_tensors(held_out, tmp_path / "job" / "eval.pt")
    job.save(job.root)
    record, _ = run_job(job.root, None)
    assert record.status == "ok", record.reason
    assert record.onnx is None and any("onnx_export is false" in n for n in record.notes)
    assert record.options["capture"].startswith("float.pt2")
    assert not any(n.startswith("left in float") for n in record.notes), record.notes  # all resnet18 ops annotated
    outputs = torch.load(tmp_path / "job" / record.outputs, weights_only=True)
    with torch.no_grad():
        assert _sqnr_db(torch.cat([model(x) for x in held_out]), torch.cat(outputs)) > 10
    if any("inductor latency skipped" in n for n in record.notes):  # no C++ compiler here: skipped, with the reason
        assert "latency/inductor_int8_ms" not in record.metrics
        return
    m = record.metrics
    assert m["latency/inductor_fp32_ms"] > 0 and m["latency/inductor_int8_ms"] > 0
    assert m["latency/inductor_speedup"] == pytest.approx(m["latency/inductor_fp32_ms"] / m["latency/inductor_int8_ms"])
    assert m["latency/inductor_batch"] == 2 and m["time/inductor_compile_s"] > 0
    assert any("21 conv/linear lowered to oneDNN int8" in n for n in record.notes), record.notes


@pytest.mark.slow
def test_static_batch_program_is_refused(model, calib, job_files, tmp_path):
    job = _job(job_files, tmp_path, inductor_latency=False)
    torch.export.save(torch.export.export(model, (calib[0],)), tmp_path / "job" / "float.pt2")
    with pytest.raises(ValueError, match="static batch of 8"):
        run_job(job.root, None)
