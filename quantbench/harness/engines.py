"""The stages of a run whose engine is a peer toolkit (``engine=ort|torchao|nncf|quark``).

The same run as quantbench's own engine, stage for stage, with the quantization done by the peer:

map the scheme (:mod:`quantbench.peers.mapping`: options, approximation, or the reason it cannot run)
-> float eval -> capture -> the peer quantizes (the same calibration batches as every engine, through
its public API, in this process or its own virtualenv) -> its torch-side model on the task metric and
its fidelity to float -> its QDQ ONNX in onnxruntime on the task metric -> parity (onnxruntime vs its
torch side, SQNR vs float) -> latency (onnxruntime int8 vs the same fp32 export, interleaved).

A scheme the engine cannot express ends the run after the mapping stage: it is FINISHED with the tag
``engine_status=unsupported`` and the reason in ``engine_reason``, so a sweep's table shows why the
cell is empty instead of an approximation nobody asked for.
"""

from __future__ import annotations

import hashlib
import time
from itertools import islice
from typing import Any

import onnx
import torch

from quantbench.engine import check
from quantbench.engine.quantizer import batch_inputs
from quantbench.errors import ConfigError
from quantbench.harness.pipeline import (
    Context,
    _export_fp32,
    _Fidelity,
    _parity_inputs,
    _prefixed,
    _torch_predict,
    capture_graph,
    evaluate_float,
    evaluate_onnx,
    log_model,
    measure_latency,
)
from quantbench.harness.schemes import engine_config
from quantbench.peers.base import engine_module
from quantbench.peers.mapping import PEERS, Features, config_features, resolve
from quantbench.peers.protocol import load_tensors, save_tensors
from quantbench.peers.runner import run_job, write_job

__all__ = ["ENGINE_NAMES", "PEER_STAGES", "engine_options", "resolve_mapping"]

#: Every engine's name: quantbench's own and the peers'.
ENGINE_NAMES = ("quantbench", *PEERS)


def engine_options(engine: dict[str, Any]) -> dict[str, Any]:
    """``engine.options`` for this engine: the mapping itself, or, when every key names an engine
    (``{ort: {calibrate_method: Entropy}, torchao: {inductor_latency: false}}``, for a sweep over
    engines), this engine's entry."""
    options = dict(engine.get("options") or {})
    if options and all(k in ENGINE_NAMES for k in options):
        return dict(options.get(engine["name"]) or {})
    return options


def resolve_mapping(scheme: dict[str, Any], engine: dict[str, Any]):
    """The mapping of ``scheme`` on ``engine`` (a resolved ``engine`` node), the engine's options laid over it."""
    feats = config_features(engine_config(scheme)) if scheme.get("preset") else Features(quantized=False)
    mapping = resolve(engine["name"], feats)
    if mapping.supported:
        mapping.options.update(engine_options(engine))
    return mapping


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class _Replay:
    """A predict function from outputs an isolated engine computed on the validation inputs, found by content."""

    def __init__(self, inputs: list[torch.Tensor], outputs: list) -> None:
        self.table = {_key(x): y for x, y in zip(inputs, outputs)}

    def __call__(self, x: torch.Tensor):
        try:
            return self.table[_key(x)]
        except KeyError:
            raise RuntimeError("the validation loader gave a batch the isolated engine was not given "
                               "(is the loader deterministic?)") from None


def map_scheme(ctx: Context) -> None:
    """Resolve the scheme on the engine; record the options and notes, or stop with the reason."""
    mapping = resolve_mapping(ctx.scheme, ctx.engine)
    ctx.mapping = mapping
    ctx.recorder.set_tags({"engine": ctx.engine["name"], "engine_status": mapping.status,
                           "engine_reason": mapping.reason[:4000], "engine_notes": "; ".join(mapping.notes)[:4000]})
    if mapping.options:
        ctx.recorder.log_params({f"engine_options.{k}": v for k, v in mapping.options.items()})
    if not mapping.supported:
        print(f"{ctx.engine['name']} x {ctx.scheme['name']}: unsupported: {mapping.reason}", flush=True)
        ctx.stopped = True
        return
    check_options(ctx.engine["name"], mapping.options)


def check_options(engine: str, options: dict[str, Any]) -> None:
    """The engine module's own check of its options (an isolated engine's module imports only torch here).

    Raises:
        ConfigError: an unknown option or a bad value (``engine.options``), named, with the known ones.
    """
    try:
        engine_module(engine).resolve_options(options)
    except ValueError as exc:
        raise ConfigError(f"engine.options: {exc}") from None


def _float_with_inputs(ctx: Context) -> None:
    """The float evaluation; an isolated engine also keeps its validation inputs (for its torch-side outputs)."""
    if not ctx.engine.get("isolated") or not ctx.quantized:
        evaluate_float(ctx)
        return
    ctx.model = ctx.task.build_model().eval()
    predict, seen = _torch_predict(ctx.model), []
    budget = float(ctx.engine.get("eval_inputs_max_mb") or 0) * 2**20
    size = 0.0

    def recording(x: torch.Tensor):
        nonlocal seen, size
        if seen is not None:
            size += x.numel() * x.element_size()
            if size <= budget:
                seen.append(x.detach().cpu().clone())
            else:  # too large to hand over: the engine's ONNX model is scored, its torch side is not
                seen = None
        return predict(x)

    ctx.log(_prefixed("float", ctx.task.evaluate(recording, desc="float")))
    ctx.eval_inputs = seen
    if seen is None:
        print(f"{ctx.engine['name']}: the validation inputs exceed engine.eval_inputs_max_mb="
              f"{ctx.engine.get('eval_inputs_max_mb')}: its torch-side model is not scored, its ONNX model is",
              flush=True)


def _one(inputs: tuple[torch.Tensor, ...]):
    return inputs[0] if len(inputs) == 1 else inputs


def _input_names(path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _qat_data(ctx: Context) -> tuple[dict[str, Any], list | None]:
    """A QAT scheme's recipe (``train.qat`` with the scheme's ``qat_recipe``) and one epoch of the task's QAT
    training batches, for an engine that trains in its own process; ``({}, None)`` for PTQ."""
    if not ctx.scheme.get("qat"):
        return {}, None
    recipe = {**ctx.qat_recipe, "method": ctx.mapping.options.get("qat")}
    recipe.pop("resume_dir", None)
    batches = getattr(ctx.task, "train_batches", None)
    if batches is None:
        return recipe, None
    return recipe, [(batch[0], batch[1]) for batch in batches(ctx.qat_recipe, qat=True)]


def peer_quantize(ctx: Context) -> None:
    """Write the job (the run's calibration batches, the fp32 export) and run the engine on it."""
    if not ctx.quantized:
        return
    ctx.fp32_path = _export_fp32(ctx)
    n = int(ctx.scheme.get("calib_batches") or 0)
    # the inputs quantbench's own engine calibrates on (quantizer.batch_inputs), batch for batch
    calib = [_one(batch_inputs(b)) for b in islice(ctx.task.calib_loader(), n)] if n else [ctx.example[0]]
    root = ctx.workdir / "engine"
    isolated = bool(ctx.engine.get("isolated"))
    qat, train = _qat_data(ctx)
    job = write_job(root, engine=ctx.engine["name"], scheme=ctx.scheme["name"], options=ctx.mapping.options,
                    calib=calib, fp32_onnx=ctx.fp32_path, model=ctx.model, example=ctx.example,
                    input_names=_input_names(ctx.fp32_path), isolated=isolated,
                    eval_inputs=ctx.eval_inputs if isolated else None, qat=qat,
                    threads=ctx.settings["threads"], seed=int(ctx.settings.get("seed") or 0))
    if train is not None:  # one epoch of the task's own QAT batches, in its order
        save_tensors(train, root / "train.pt")
        job.train_data = "train.pt"
        job.save(root)
    start = time.perf_counter()
    record, output = run_job(root, isolated=isolated, venv=ctx.engine.get("venv"),
                             timeout_s=float(ctx.engine.get("timeout_s") or 1800), model=None if isolated else ctx.model)
    wall = time.perf_counter() - start
    ctx.peer = record
    ctx.recorder.set_tags({"engine_version": f"{record.engine} {record.version}".strip()})
    notes = list(dict.fromkeys([*ctx.mapping.notes, *record.notes]))
    text = [f"engine: {record.engine} {record.version}", f"status: {record.status}",
            f"options: {record.options or ctx.mapping.options}", *(f"note: {n}" for n in notes)]
    if record.reason:
        text.append(f"reason: {record.reason}")
    path = ctx.workdir / "engine.txt"
    path.write_text("\n".join(text) + "\n")
    ctx.recorder.log_artifact(path)
    if record.status != "ok":
        ctx.recorder.set_tags({"engine_status": "unsupported", "engine_reason": record.reason[:4000]})
        print(f"{record.engine} x {ctx.scheme['name']}: unsupported: {record.reason}", flush=True)
        ctx.stopped = True
        return
    ctx.log({"time/quantize_s": record.quantize_s, "time/engine_wall_s": wall, **record.metrics})
    if record.onnx:
        ctx.onnx_path = root / record.onnx
    if output is not None and output.torch_model is not None:
        ctx.peer_model = output.torch_model
    elif record.outputs:
        ctx.peer_model = _Replay(ctx.eval_inputs or [], load_tensors(root / record.outputs))


def peer_evaluate_quant(ctx: Context) -> None:
    """The engine's torch-side model on the task metric, and its fidelity to float (where it has one)."""
    if ctx.peer_model is None:
        return
    model = ctx.peer_model
    predict = model if isinstance(model, _Replay) else _torch_predict(model)
    fidelity = _Fidelity(predict, _torch_predict(ctx.gm))
    ctx.log(_prefixed("quant", ctx.task.evaluate(fidelity, desc=f"{ctx.engine['name']} torch")))
    ctx.log(fidelity.metrics())


def peer_export(ctx: Context) -> None:
    """Its QDQ ONNX model as the run's artifact (the fp32 export is the same as every engine's)."""
    if ctx.fp32_path is None:
        ctx.fp32_path = _export_fp32(ctx)
    if not ctx.quantized:
        ctx.onnx_path = ctx.fp32_path
    if ctx.onnx_path is not None:
        log_model(ctx)


def peer_parity(ctx: Context) -> None:
    """onnxruntime vs the engine's torch side (top-1 agreement, abs error), both against float (SQNR)."""
    if ctx.onnx_path is None:
        return
    if isinstance(ctx.peer_model, _Replay):
        inputs = (ctx.eval_inputs or [])[: int(ctx.settings["parity_batches"])]
    else:
        inputs = _parity_inputs(ctx)
    reference = ctx.peer_model
    if reference is None:  # no torch side: the ONNX model against itself gives no parity, only its SQNR
        session = check.ort_session(ctx.onnx_path, threads=ctx.settings["threads"])
        reference = check.ort_predict_fn(session)
    report = check.compare(ctx.onnx_path, _torch_predict(reference) if isinstance(reference, torch.nn.Module)
                           else reference, inputs, float_model=ctx.gm)
    if ctx.peer_model is not None:
        ctx.log({"onnx/parity_top1": report.top1_agreement, "onnx/max_abs_err": report.max_abs_err})
        ctx.log({"quant/sqnr_db": report.sqnr_db})
    ctx.log({"onnx/sqnr_db": report.onnx_sqnr_db})


def _guarded(stage):
    def run(ctx: Context) -> None:
        if ctx.onnx_path is not None:
            stage(ctx)

    run.__name__ = stage.__name__
    return run


PEER_STAGES = (
    map_scheme, _float_with_inputs, capture_graph, peer_quantize, peer_evaluate_quant, peer_export,
    _guarded(evaluate_onnx), peer_parity, _guarded(measure_latency),
)
