"""The stages of one run, in order, each logging its metrics as soon as it has them.

scheme check -> float eval -> capture -> quantize (PTQ calibration) -> QAT -> fake-quant eval
-> freeze -> ONNX export -> ONNX eval (onnxruntime, OpenVINO: ``run.runtime``) -> parity -> per-node SQNR ->
latency (int8 vs fp32 in each runtime, interleaved).

Every stage reads and extends one :class:`Context`; a stage that does not
apply to the scheme (the float reference has no quantizer) returns at once.
Metrics go to MLflow the moment a stage ends, so a run that fails in a late
stage keeps everything measured before it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import onnx
import torch
from matplotlib.figure import Figure

from quantbench.engine import ModelQuantizer, capture, check, export_onnx, machine, runtimes
from quantbench.engine.storage import default_unsigned_weights
from quantbench.harness.deploy import latency_batch, measure_deploy_latency, runtimes_of
from quantbench.harness.schemes import engine_config
from quantbench.harness.tracking import RunRecorder
from quantbench.training import PredictFn, TaskAdapter

__all__ = ["STAGES", "Context", "execute"]

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What the stages share: inputs from the config, and what earlier stages built."""

    task: TaskAdapter
    scheme: dict[str, Any]
    qat_recipe: dict[str, Any]
    settings: dict[str, Any]
    workdir: Path
    recorder: RunRecorder
    metrics: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = None
    example: tuple[torch.Tensor, ...] = ()
    gm: torch.fx.GraphModule | None = None
    quantizer: ModelQuantizer | None = None
    qmodel: torch.fx.GraphModule | None = None
    frozen: torch.fx.GraphModule | None = None
    onnx_path: Path | None = None
    fp32_path: Path | None = None
    # A peer engine's run (harness/engines.py): the resolved engine node, its scheme mapping, its
    # record, its torch-side model, the validation inputs an isolated engine is given; ``stopped``
    # ends the run after the current stage (a scheme the engine cannot express).
    engine: dict[str, Any] = field(default_factory=lambda: {"name": "quantbench"})
    mapping: Any = None
    peer: Any = None
    peer_model: Any = None
    eval_inputs: list | None = None
    stopped: bool = False

    @property
    def quantized(self) -> bool:
        return bool(self.scheme.get("preset"))

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if step == 0:
            self.metrics.update(clean)
        self.recorder.log_metrics(clean, step=step)


def _torch_predict(model: torch.nn.Module) -> PredictFn:
    """The model's outputs under no_grad: a tensor, or a tuple for multi-output models (detectors)."""
    def predict(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = model(x)
        return tuple(out) if isinstance(out, (list, tuple)) and len(out) > 1 else (
            out[0] if isinstance(out, (list, tuple)) else out)

    return predict


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def evaluate_float(ctx: Context) -> None:
    ctx.model = ctx.task.build_model().eval()
    ctx.log(_prefixed("float", ctx.task.evaluate(_torch_predict(ctx.model), desc="float")))


def capture_graph(ctx: Context) -> None:
    ctx.example = tuple(ctx.task.example_inputs())
    ctx.gm = capture(ctx.model, ctx.example)


def build_engine_config(ctx: Context) -> None:
    """Build the engine config first, so a bad scheme (an unknown preset, an impossible override) fails in seconds."""
    if not ctx.quantized:
        return
    ctx.quantizer = ModelQuantizer(engine_config(ctx.scheme))


def quantize(ctx: Context) -> None:
    """PTQ: insert quantizers and calibrate (QAT schemes start from the same point)."""
    if not ctx.quantized:
        return
    n = int(ctx.scheme.get("calib_batches") or 0)
    start = time.perf_counter()
    ctx.qmodel = ctx.quantizer.quantize_model(ctx.gm, ctx.task.calib_loader() if n else [], max_batches=n or None)
    _log_algorithms(ctx)
    cov = ctx.quantizer.coverage(ctx.qmodel)
    _write_csv(ctx, "float_nodes.csv", [dict(zip(("node", "op", "reason"), row)) for row in cov.float_nodes],
               ("node", "op", "reason"))
    ctx.log({"time/quantize_s": time.perf_counter() - start, "coverage/quantized_ops": cov.quantized_ops,
             "coverage/total_ops": cov.total_ops, "coverage/fraction": cov.fraction})


def _log_algorithms(ctx: Context) -> None:
    """Each advanced PTQ step's time (``time/<name>_s``) and summary (``algorithms.txt``); a mixed-precision
    allocation as ``bit_allocation.csv``."""
    records = ctx.qmodel.meta.get("qb_algorithms") or []
    if not records:
        return
    ctx.log({f"time/{r.name}_s": r.seconds for r in records})
    path = ctx.workdir / "algorithms.txt"
    path.write_text("\n\n".join(f"{r.name} {r.options or ''} ({r.seconds:.1f} s)\n{r.summary}" for r in records) + "\n")
    ctx.recorder.log_artifact(path)
    for r in records:
        rows = getattr(r.details, "rows", None)
        if r.name == "mixed_precision" and rows:
            columns = tuple(rows[0])
            _write_csv(ctx, "bit_allocation.csv", rows, columns)
            ctx.log({"mixed/cost_fraction": r.details.cost / r.details.reference_cost
                     if r.details.reference_cost else None,
                     "mixed/high_bit_layers": sum(1 for b in r.details.bits.values() if b > min(r.details.bits.values()))})


def train_qat(ctx: Context) -> None:
    """QAT with the task's training loop and the ``train.qat`` recipe."""
    if not (ctx.quantized and ctx.scheme.get("qat")):
        return
    start = time.perf_counter()
    result = ctx.task.train(ctx.qmodel, ctx.qat_recipe, qat=True)
    ctx.qmodel = result.model
    for epoch, row in enumerate(result.history, start=1):
        ctx.log(_prefixed("qat", row), step=epoch)
    ctx.log({"time/qat_s": result.seconds or time.perf_counter() - start})


class _Fidelity:
    """The quantized model's outputs against the float model's on the same inputs: output SQNR (all
    outputs pooled) and argmax agreement over dim 1 of the first output (per image for logits, per
    image and anchor for a detector's class scores)."""

    def __init__(self, predict: PredictFn, reference: PredictFn) -> None:
        self.predict, self.reference = predict, reference
        self.signal = self.noise = 0.0
        self.agree = self.count = 0

    def __call__(self, x: torch.Tensor):
        out, ref = self.predict(x), self.reference(x)
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        for o, r in zip(outs, refs):
            r64 = r.detach().double()
            self.signal += r64.pow(2).sum().item()
            self.noise += (r64 - o.detach().double()).pow(2).sum().item()
        if refs[0].dim() >= 2:
            self.agree += (outs[0].argmax(1) == refs[0].argmax(1)).sum().item()
            self.count += refs[0].argmax(1).numel()
        return out

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.noise:  # none at all: identical outputs, no finite SQNR to log
            out["fidelity/sqnr_db"] = 10 * math.log10(max(self.signal, 1e-30) / self.noise)
        if self.count:
            out["fidelity/agree_top1"] = 100.0 * self.agree / self.count
        return out


def evaluate_quant(ctx: Context) -> None:
    """The fake-quant model on the task's metric, and its fidelity to the float model on the same data."""
    if ctx.quantized:
        fidelity = _Fidelity(_torch_predict(ctx.qmodel), _torch_predict(ctx.gm))
        ctx.log(_prefixed("quant", ctx.task.evaluate(fidelity, desc="fake-quant")))
        ctx.log(fidelity.metrics())


def analyze_sensitivity(ctx: Context) -> None:
    """Per-layer sensitivity (``run.sensitivity``; ``quantbench analyze``): the output SQNR with only
    each layer quantized and with all but it, and with ``run.sensitivity_metric`` the task metric of
    both; ``sensitivity.csv`` / ``.md`` / ``.png`` as artifacts, the table on stdout."""
    if not (ctx.quantized and ctx.settings.get("sensitivity")):
        return
    from quantbench.engine.ptq.sensitivity import layer_sensitivity, sensitivity_table

    start = time.perf_counter()
    batches = list(islice(ctx.task.calib_loader(), int(ctx.settings.get("sensitivity_batches") or 4)))
    metric = None
    if ctx.settings.get("sensitivity_metric"):
        primary = ctx.task.primary_metric

        def metric(predict: PredictFn) -> float:
            return float(ctx.task.evaluate(predict, desc="sensitivity")[primary])

    rows = layer_sensitivity(ctx.qmodel, batches, metric=metric)
    columns = ("node", "op", "params", "only_sqnr_db", "all_but_sqnr_db", "only_metric", "all_but_metric")
    _write_csv(ctx, "sensitivity.csv", [{c: getattr(r, c) for c in columns} for r in rows], columns)
    table = sensitivity_table(rows)
    (ctx.workdir / "sensitivity.md").write_text(f"# {ctx.scheme['name']}: layer sensitivity\n\n{table}\n")
    ctx.recorder.log_artifact(ctx.workdir / "sensitivity.md")
    plot_sensitivity(rows[: int(ctx.settings["sqnr_plot_layers"])], ctx.workdir / "sensitivity.png",
                     f"{ctx.scheme['name']}: most sensitive layers")
    ctx.recorder.log_artifact(ctx.workdir / "sensitivity.png")
    if rows:
        ctx.log({"sensitivity/worst_only_sqnr_db": rows[0].only_sqnr_db, "sensitivity/layers": len(rows),
                 "time/sensitivity_s": time.perf_counter() - start})
    print(f"layer sensitivity of {ctx.scheme['name']} ({len(rows)} layers, most sensitive first):\n{table}",
          flush=True)


def _graph_key(gm: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]) -> str:
    """A hash of what an fp32 export depends on: the graph's code, its tensors, the input shape, torch."""
    digest = hashlib.sha256(f"{torch.__version__}|{gm.code}|{[tuple(t.shape[1:]) for t in example]}".encode())
    for name, tensor in sorted(gm.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _export_fp32(ctx: Context) -> Path:
    """The fp32 ONNX of the captured float graph, reused from ``run.fp32_onnx_cache``.

    Every scheme of one model exports the same float graph; the export costs
    several seconds, so it is done once per float model and copied into place
    atomically (a parallel job never reads half a file). A cached file that
    the ONNX checker rejects (truncated, overwritten) is exported again.
    """
    target = ctx.workdir / "fp32" / "model.onnx"
    if not ctx.settings.get("fp32_onnx_cache"):
        return export_onnx(ctx.gm, ctx.example, target)
    cached = Path(ctx.settings["fp32_onnx_cache"]) / f"{_graph_key(ctx.gm, ctx.example)}.onnx"
    if cached.is_file():
        try:
            onnx.checker.check_model(str(cached))
        except Exception as exc:  # truncated or foreign: rebuild it
            log.warning("cached fp32 ONNX %s is unreadable (%s); exporting it again",
                        cached, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            cached.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, target)
            return target
    export_onnx(ctx.gm, ctx.example, target)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}")
    shutil.copyfile(target, partial)
    os.replace(partial, cached)
    return target


def freeze_and_export(ctx: Context) -> None:
    """Freeze to integer weights + Q/DQ and export it; the fp32 baseline is the captured float graph."""
    ctx.fp32_path = _export_fp32(ctx)
    if ctx.quantized:
        ctx.frozen = ctx.quantizer.freeze(ctx.qmodel)
        unsigned = ctx.settings.get("unsigned_weights")
        unsigned = default_unsigned_weights() if unsigned is None else bool(unsigned)
        ctx.settings["unsigned_weights_resolved"] = unsigned  # the deploy twin exports alike
        ctx.recorder.set_tags({"export.unsigned_weights": str(unsigned).lower()})
        ctx.onnx_path = export_onnx(ctx.frozen, ctx.example, ctx.workdir / "int8" / "model.onnx",
                                    unsigned_weights=unsigned)
    else:
        ctx.frozen, ctx.onnx_path = ctx.gm, ctx.fp32_path
    log_model(ctx)


def log_model(ctx: Context) -> None:
    """The run's ONNX model as an MLflow model (the UI's Models column, the registry), with its signature."""
    ctx.recorder.log_onnx_model(ctx.onnx_path, [t.detach().cpu().numpy() for t in ctx.example])


def evaluate_onnx(ctx: Context) -> None:
    """The ONNX model in each runtime of ``run.runtime`` on the task's metric: onnxruntime's as ``onnx/*``, with
    a quantized model's fidelity to the float model over the same data (``fidelity/onnx_sqnr_db``,
    ``fidelity/onnx_agree_top1``: what every engine deploys, measured alike); OpenVINO's as ``onnx_ov/*``."""
    chosen = runtimes_of(ctx)
    if "ort" in chosen:
        _evaluate_ort(ctx)
    if "openvino" in chosen:
        _evaluate_openvino(ctx)


def _evaluate_ort(ctx: Context) -> None:
    session = check.ort_session(ctx.onnx_path, threads=ctx.settings["threads"])
    predict = check.ort_predict_fn(session)
    if not ctx.quantized:
        ctx.log(_prefixed("onnx", ctx.task.evaluate(predict, desc="onnxruntime")))
        return
    fidelity = _Fidelity(predict, _torch_predict(ctx.gm))
    ctx.log(_prefixed("onnx", ctx.task.evaluate(fidelity, desc="onnxruntime")))
    ctx.log({k.replace("fidelity/", "fidelity/onnx_"): v for k, v in fidelity.metrics().items()})


def _evaluate_openvino(ctx: Context) -> None:
    """OpenVINO on the task's metric (``onnx_ov/*``) and, batch by batch, against onnxruntime on the same
    inputs: ``runtime/ov_vs_ort_max_lsb`` (in the output's quantization steps), ``_max_abs`` and
    ``_agree_top1`` (%). Their integer arithmetic may differ: reported, not a gate."""
    threads = ctx.settings["threads"]
    ctx.recorder.set_tags({"openvino_version": machine.openvino_version() or "unknown"})
    scales = (check.output_scales(ctx.frozen) if isinstance(ctx.frozen, torch.fx.GraphModule)
              else runtimes.onnx_output_scales(ctx.onnx_path))
    agreement = runtimes.Agreement(runtimes.session("openvino", ctx.onnx_path, threads).predict_fn(),
                                   runtimes.session("ort", ctx.onnx_path, threads).predict_fn(), scales)
    ctx.log(_prefixed("onnx_ov", ctx.task.evaluate(agreement, desc="openvino")))
    ctx.log(agreement.metrics("runtime/ov_vs_ort"))


def _parity_inputs(ctx: Context) -> list[Any]:
    batches = list(islice(ctx.task.calib_loader(), int(ctx.settings["parity_batches"])))
    return batches or [ctx.example[0]]


def check_parity(ctx: Context) -> None:
    """onnxruntime vs the frozen graph (LSB error, top-1 agreement) and SQNR vs float."""
    float_model = ctx.gm if ctx.quantized else None
    report = check.compare(ctx.onnx_path, ctx.frozen, _parity_inputs(ctx), float_model=float_model)
    ctx.log({"onnx/parity_top1": report.top1_agreement, "onnx/max_lsb_err": report.max_lsb_err,
             "onnx/max_abs_err": report.max_abs_err})
    if ctx.quantized:
        ctx.log({"quant/sqnr_db": report.sqnr_db, "onnx/sqnr_db": report.onnx_sqnr_db})


def node_sqnr(ctx: Context) -> None:
    """Per-node SQNR table (csv) and a bar plot of the worst layers."""
    if not ctx.quantized:
        return
    rows = check.per_node_sqnr(ctx.qmodel, _parity_inputs(ctx))
    _write_csv(ctx, "node_sqnr.csv", rows, ("node", "op", "sqnr_db"))
    finite = [r for r in rows if r["sqnr_db"] != float("inf")]
    if finite:
        ctx.log({"quant/min_node_sqnr_db": finite[0]["sqnr_db"]})
        path = ctx.workdir / "node_sqnr.png"
        plot_node_sqnr(finite[: int(ctx.settings["sqnr_plot_layers"])], path,
                       f"{ctx.scheme['name']}: worst layers by SQNR")
        ctx.recorder.log_artifact(path)


#: runtime -> the latency metrics' prefix and its speedup's name (onnxruntime's keep their first names).
_LATENCY_NAMES = {"ort": ("latency/ort_", "latency/speedup"), "openvino": ("latency/ov_", "latency/ov_speedup")}


def measure_latency(ctx: Context) -> None:
    """Median latency at ``run.latency_batch`` in each runtime of ``run.runtime``, fp32 vs the quantized model,
    every model measured interleaved with every other (``latency/ort_*``, ``latency/ov_*``)."""
    threads, iters = ctx.settings["threads"], int(ctx.settings["latency_iters"])
    x = latency_batch(ctx, int(ctx.settings["latency_batch"]))
    kinds = {"fp32": ctx.fp32_path, **({"int8": ctx.onnx_path} if ctx.quantized else {})}
    cells = [(runtime, kind) for runtime in runtimes_of(ctx) for kind in kinds]
    times = runtimes.latencies([runtimes.session(r, kinds[k], threads) for r, k in cells], x, iters=iters)
    measured = dict(zip(cells, times))
    out: dict[str, float] = {"latency/batch": x.shape[0]}
    for (runtime, kind), ms in measured.items():
        out[f"{_LATENCY_NAMES[runtime][0]}{kind}_ms"] = ms
    for runtime in runtimes_of(ctx) if ctx.quantized else ():
        out[_LATENCY_NAMES[runtime][1]] = measured[runtime, "fp32"] / measured[runtime, "int8"]
    ctx.log(out)


STAGES: tuple[Callable[[Context], None], ...] = (
    build_engine_config, evaluate_float, capture_graph, quantize, train_qat, evaluate_quant, analyze_sensitivity,
    freeze_and_export,
    evaluate_onnx, check_parity, node_sqnr, measure_latency, measure_deploy_latency,
)


def execute(ctx: Context) -> dict[str, float]:
    """Run every stage in order (a peer engine's: ``harness/engines.py``); returns all metrics logged
    (also in MLflow already)."""
    stages = STAGES
    if ctx.engine.get("name", "quantbench") != "quantbench":
        from quantbench.harness.engines import PEER_STAGES

        stages = PEER_STAGES
    total = time.perf_counter()
    for stage in stages:
        start = time.perf_counter()
        stage(ctx)
        log.info("stage %s done in %.1f s", stage.__name__, time.perf_counter() - start)
        if ctx.stopped:
            break
    ctx.log({"time/total_s": time.perf_counter() - total})
    return dict(ctx.metrics)


def _write_csv(ctx: Context, name: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    path = ctx.workdir / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    ctx.recorder.log_artifact(path)


def plot_node_sqnr(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars, worst layer on top (``rows`` come worst first)."""
    fig = Figure(figsize=(7, 0.3 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r['node']} ({r['op']})" for r in rows][::-1]
    ax.barh(labels, [r["sqnr_db"] for r in rows][::-1], color="tab:red")
    ax.set_xlabel("SQNR vs float (dB)")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.savefig(path, dpi=100)


def plot_sensitivity(rows: list, path: Path, title: str) -> None:
    """Two bars per layer: output SQNR with only it quantized, and with all but it (most sensitive on top)."""
    fig = Figure(figsize=(7, 0.35 * len(rows) + 1.4), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r.node} ({r.op})" for r in rows][::-1]
    y = list(range(len(rows)))
    ax.barh([v + 0.2 for v in y], [r.only_sqnr_db for r in rows][::-1], height=0.4, color="tab:red",
            label="only this layer quantized")
    ax.barh([v - 0.2 for v in y], [r.all_but_sqnr_db for r in rows][::-1], height=0.4, color="tab:blue",
            label="all but this layer")
    ax.set_yticks(y, labels)
    ax.set_xlabel("output SQNR vs float (dB)")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)
