"""Checks of an exported model: onnxruntime parity, SQNR, per-node SQNR, latency.

Parity compares the onnxruntime session (fully optimised: the integer kernels
that deploy) with the frozen torch graph on the same inputs; the error is
given in units of the output's quantization step (LSB), and top-1 agreement
is reported. SQNR compares against the float model.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import fx

from quantbench.engine.fake_quant import DerivedBiasFakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import get_attr_tensor, op_name
from quantbench.engine.qdq import dequantize
from quantbench.engine.quantizer import batch_inputs

__all__ = ["ParityReport", "ort_session", "ort_predict_fn", "chunked_predict", "compare", "per_node_sqnr", "ort_latency", "ort_latencies", "interleaved_medians", "output_tuple",
           "sqnr_db", "output_scales"]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def ort_session(path: str | Path, threads: int | None = None, *, optimize: bool = True,
                optimized_model_path: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; no busy-waiting threads (``allow_spinning=0``)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_predict_fn(session: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]:
    """Torch tensor in, torch tensor out through onnxruntime (a tuple, in graph order, for several outputs).

    A model whose batch dimension is fixed (a peer toolkit's static-graph export) is run in chunks of
    that size, the last one padded by repeating its first image, and its outputs cut back to the batch.
    """
    name = session.get_inputs()[0].name
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    fixed = dim if isinstance(dim, int) and dim > 0 else None

    return chunked_predict(lambda x: session.run(None, {name: x}), fixed)


def chunked_predict(run: Callable[[np.ndarray], list[np.ndarray]],
                    fixed: int | None) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]:
    """``run`` (an array in, arrays out in graph order) as a torch predict function; a model whose batch is
    ``fixed`` runs in chunks of that size, the last padded by repeating its first image, cut back after."""

    def call(x: torch.Tensor) -> list[np.ndarray]:
        return run(np.ascontiguousarray(x.detach().cpu().numpy()))

    def predict(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if fixed is None or x.shape[0] == fixed:
            out = call(x)
        else:
            parts = []
            for chunk in x.split(fixed):
                pad = fixed - chunk.shape[0]
                if pad:
                    chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])])
                parts.append(call(chunk))
            out = [np.concatenate([p[i] for p in parts])[: x.shape[0]] for i in range(len(parts[0]))]
        return torch.from_numpy(out[0]) if len(out) == 1 else tuple(torch.from_numpy(o) for o in out)

    return predict


def output_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def output_scales(frozen: fx.GraphModule) -> list[float | None]:
    """The quantization step of each graph output (None where it is float)."""
    out_node = next(n for n in frozen.graph.nodes if n.op == "output")
    scales = []
    for v in out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]:
        if isinstance(v, fx.Node) and v.op == "call_function" and v.target is dequantize:
            s = v.args[1]
            scales.append(float(get_attr_tensor(frozen, s.target).max()) if isinstance(s, fx.Node) else float(s))
        else:
            scales.append(None)
    return scales


@dataclass
class ParityReport:
    """onnxruntime vs frozen torch (and vs float) on the same inputs."""

    samples: int
    top1_agreement: float  # percent
    max_lsb_err: float  # in output quantization steps (abs error where the output is float)
    max_abs_err: float
    sqnr_db: float  # frozen torch output vs float model output (nan without a float model)
    onnx_sqnr_db: float  # onnxruntime output vs float model output

    def as_metrics(self) -> dict[str, float]:
        return {"parity_top1": self.top1_agreement, "max_lsb_err": self.max_lsb_err,
                "max_abs_err": self.max_abs_err, "sqnr_db": self.sqnr_db}

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(inputs) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return (batch_inputs(b)[0] for b in inputs)


@torch.no_grad()
def compare(onnx_path: str | Path, frozen: fx.GraphModule, inputs, *, float_model: torch.nn.Module | None = None,
            session: ort.InferenceSession | None = None) -> ParityReport:
    """Run the ONNX model and the frozen graph on ``inputs`` (a tensor or batches) and compare.

    ``frozen`` may also be any callable on a batch (a peer toolkit's torch-side model): its outputs
    then have no known quantization step, and ``max_lsb_err`` is the absolute error.

    Every graph output is compared, each in units of its own quantization
    step; ``max_lsb_err`` is the worst over all of them. Top-1 agreement is
    the argmax over dim 1 of the first output, per row: per image for
    classifier logits ``[B, C]``, per image and anchor point for a
    detector's class logits ``[B, C, N]``. SQNR pools all outputs.
    """
    session = session or ort_session(onnx_path)
    predict = ort_predict_fn(session)
    scales = output_scales(frozen) if isinstance(frozen, fx.GraphModule) else None  # None: compare in abs error
    n = agree = samples = 0
    max_lsb = max_abs = 0.0
    refs, outs, onnx_outs = [], [], []
    for x in _batches(inputs):
        ts, os_ = output_tuple(frozen(x)), output_tuple(predict(x))
        if len(ts) != len(os_):
            raise ValueError(f"the ONNX model has {len(os_)} outputs but the frozen graph {len(ts)}")
        for t, o, scale in zip(ts, os_, scales or [None] * len(ts)):
            err = (o.float() - t.float()).abs().max().item() if t.numel() else 0.0
            max_abs = max(max_abs, err)
            max_lsb = max(max_lsb, err / scale if scale else err)
        t, o = ts[0], os_[0]
        if t.dim() >= 2:
            agree += (o.argmax(1) == t.argmax(1)).sum().item()
            n += t.argmax(1).numel()
        samples += x.shape[0]
        if float_model is not None:
            refs.append(torch.cat([f.flatten(1) for f in output_tuple(float_model(x))], 1))
            outs.append(torch.cat([v.flatten(1) for v in ts], 1))
            onnx_outs.append(torch.cat([v.float().flatten(1) for v in os_], 1))
    sq = sqnr_db(torch.cat(refs), torch.cat(outs)) if refs else float("nan")
    osq = sqnr_db(torch.cat(refs), torch.cat(onnx_outs)) if refs else float("nan")
    return ParityReport(samples, 100.0 * agree / max(n, 1), max_lsb, max_abs, sq, osq)


def _run_node(node: fx.Node, env: dict, gm: fx.GraphModule):
    def load(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    args, kwargs = load(node.args), load(node.kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise NotImplementedError(node.op)


@torch.no_grad()
def per_node_sqnr(qmodel: fx.GraphModule, inputs, *, max_batches: int = 4) -> list[dict]:
    """SQNR of every quantized tensor: the fake-quant graph vs the same graph in float.

    Both graphs are run in lockstep (the float one skips every quantizer), so
    each row shows the error accumulated up to that tensor: the first rows
    (worst first) are the layers that hurt.
    """
    stats: dict[str, list] = {}
    for k, x in enumerate(_batches(inputs)):
        if k >= max_batches:
            break
        fenv: dict = {}
        qenv: dict = {}
        placeholders = iter((x,))
        for node in qmodel.graph.nodes:
            if node.op == "placeholder":
                fenv[node] = qenv[node] = next(placeholders)
            elif node.op == "get_attr":
                fenv[node] = qenv[node] = get_attr_tensor(qmodel, node.target)
            elif node.op == "output":
                break
            elif node.op == "call_module" and node.target == "_guards_fn":
                continue
            elif node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), FakeQuantizeBase):
                mod = qmodel.get_submodule(node.target)
                fenv[node] = fenv[node.args[0]]
                qenv[node] = mod(qenv[node.args[0]])
                if mod.role == "activation" and not isinstance(mod, DerivedBiasFakeQuantize):
                    src = node.args[0]
                    row = stats.setdefault(src.name, [op_name(src), 0.0, 0.0])
                    row[1] += fenv[node].double().pow(2).sum().item()
                    row[2] += (fenv[node].double() - qenv[node].double()).pow(2).sum().item()
            else:
                fenv[node] = _run_node(node, fenv, qmodel)
                qenv[node] = _run_node(node, qenv, qmodel)
    rows = []
    for name, (op, sig, noise) in stats.items():
        db = math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
        rows.append({"node": name, "op": op, "sqnr_db": db})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def ort_latency(path: str | Path, example: torch.Tensor, *, threads: int | None = None, warmup: int = 3,
                iters: int = 20, session: ort.InferenceSession | None = None) -> float:
    """Median wall time (ms) of one onnxruntime run on ``example``."""
    return ort_latencies([session or ort_session(path, threads)], example, warmup=warmup, iters=iters)[0]


def ort_latencies(models: Sequence[str | Path | ort.InferenceSession], example: torch.Tensor, *,
                  threads: int | None = None, warmup: int = 3, iters: int = 20) -> list[float]:
    """Median wall time (ms) of one onnxruntime run on ``example``, for each model, measured interleaved.

    Each round runs every model once, in turn, so a slow spell of a shared
    machine (another process, frequency scaling) lands on all of them alike
    and their ratio (int8 vs fp32) stays meaningful.
    """
    sessions = [m if isinstance(m, ort.InferenceSession) else ort_session(m, threads) for m in models]
    feed = np.ascontiguousarray(example.detach().cpu().numpy())
    return interleaved_medians([functools.partial(s.run, None, {s.get_inputs()[0].name: feed}) for s in sessions],
                               warmup=warmup, iters=iters)


def interleaved_medians(calls: Sequence[Callable[[], Any]], *, warmup: int = 3, iters: int = 20) -> list[float]:
    """Median wall time (ms) of each call, measured interleaved: ``warmup`` rounds, then ``iters`` rounds
    that each run every call once, in turn, so a slow spell of a shared machine (another process,
    frequency scaling) lands on all of them alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(iters):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]
