"""The deploy-latency stage: a quantized run's int8 / fp32 speedup at the size it deploys at.

A run's own latency stage (``latency/*``) times its ONNX models at the task's input size and
``run.latency_batch``. On a small task (digits: 32x32) that size is overhead-bound: a 32x32 ResNet-18
runs in a few hundred microseconds, and the int8 / fp32 ratio says more about per-op dispatch than about
the integer kernels. This stage times the same model x scheme at the **deploy size**
(``run.deploy_size``, else ``task.deploy_size``, else the task's input size), at ``run.deploy_batches``
x ``run.deploy_threads`` (1 and 8 images, 1 and 2 threads by default), in each runtime of
``run.runtime``, fp32 and int8 interleaved:

* at the task's own input size it times the run's own exports;
* at another size it builds a **deploy twin**: the float model captured at that size, quantized by the
  run's config (PTQ calibration on the run's first calibration batches resized to it; a QAT scheme's
  grids, post-training algorithms left out: they change values, not the graph that is timed), frozen
  and exported like the run's model. The twin is timed, never scored.

Metrics: ``deploy/size``, ``deploy/speedup_t{T}_b{B}`` (onnxruntime), ``deploy/ov_speedup_t{T}_b{B}``
(OpenVINO), and each side's milliseconds (``deploy/ort_fp32_ms_t1_b1`` ...). A peer engine's run is
not timed here (its toolkit exports at the task's size only).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantbench.engine import ModelQuantizer, capture, export_onnx, runtimes
from quantbench.engine.errors import CaptureError, ExportError

if TYPE_CHECKING:
    from quantbench.harness.pipeline import Context

__all__ = ["deploy_size", "latency_batch", "measure_deploy_latency", "runtimes_of"]

log = logging.getLogger(__name__)

#: runtime -> the prefix of its deploy metrics (onnxruntime's have none, as ``latency/speedup``)
_PREFIX = {"ort": "", "openvino": "ov_"}
_MS_PREFIX = {"ort": "ort_", "openvino": "ov_"}


def latency_batch(ctx: Context, size: int) -> torch.Tensor:
    """``size`` real images (calibration batches, topped up by repeating them)."""
    parts, n = [], 0
    for batch in ctx.task.calib_loader():
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        parts.append(x)
        n += x.shape[0]
        if n >= size:
            break
    x = torch.cat(parts) if parts else ctx.example[0]
    return x.repeat((-(-size // x.shape[0]),) + (1,) * (x.dim() - 1))[:size]


def runtimes_of(ctx: Context) -> tuple[str, ...]:
    """The runtimes ``run.runtime`` asks for, onnxruntime first: ``ort``, ``openvino`` or both."""
    choice = ctx.settings.get("runtime") or "ort"
    return ("ort", "openvino") if choice == "both" else (choice,)


def deploy_size(ctx: Context) -> int | None:
    """The deploy input size of a run: ``run.deploy_size``, else ``task.deploy_size`` (None: the task's own)."""
    size = ctx.settings.get("deploy_size") or ctx.settings.get("task_deploy_size")
    return int(size) if size else None


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == (size, size) else F.interpolate(
        x.float(), size=(size, size), mode="bilinear", align_corners=False)


def _twin(ctx: Context, size: int, unsigned_weights: bool | None) -> tuple[Path, Path]:
    """The float model and its quantization by the run's config, captured and exported at ``size``."""
    example = (_resize(ctx.example[0], size),)
    gm = capture(ctx.model, example)
    config = ctx.quantizer.config.replace(algorithms=())
    quantizer = ModelQuantizer(config)
    calib = [_resize(latency_batch(ctx, 8), size)]
    frozen = quantizer.freeze(quantizer.quantize_model(gm, calib, qat=False))
    folder = ctx.workdir / "deploy"
    return (export_onnx(gm, example, folder / "fp32.onnx"),
            export_onnx(frozen, example, folder / "int8.onnx", unsigned_weights=unsigned_weights))


def measure_deploy_latency(ctx: Context) -> None:
    """int8 / fp32 at the deploy size, ``run.deploy_batches`` x ``run.deploy_threads``, per runtime (see the module)."""
    if not ctx.quantized or ctx.engine.get("name", "quantbench") != "quantbench" or ctx.onnx_path is None:
        return
    batches = [int(b) for b in ctx.settings.get("deploy_batches") or ()]
    threads = [int(t) for t in ctx.settings.get("deploy_threads") or ()]
    if not batches or not threads:
        return
    own = int(ctx.example[0].shape[-1])
    size = deploy_size(ctx) or own
    start = time.perf_counter()
    if size == own:
        fp32, int8 = ctx.fp32_path, ctx.onnx_path
    elif len(ctx.example) != 1 or ctx.example[0].dim() != 4:
        log.warning("deploy latency: run.deploy_size=%d needs one image input; timed at the task's size %d",
                    size, own)
        fp32, int8, size = ctx.fp32_path, ctx.onnx_path, own
    else:
        try:
            fp32, int8 = _twin(ctx, size, ctx.settings.get("unsigned_weights_resolved"))
        except (CaptureError, ExportError) as exc:  # a model that only runs at its own size: say so, keep the run
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            ctx.recorder.set_tags({"deploy_error": first[:500]})
            log.warning("deploy latency at %dx%d skipped: %s", size, size, first)
            return
    iters = int(ctx.settings.get("deploy_iters") or 10)
    out: dict[str, float] = {"deploy/size": size}
    inputs = {b: _resize(latency_batch(ctx, b), size) for b in batches}
    for t in threads:
        for runtime in runtimes_of(ctx):
            pair = [runtimes.session(runtime, fp32, t), runtimes.session(runtime, int8, t)]  # every batch runs on it
            for b, x in inputs.items():
                f_ms, i_ms = runtimes.latencies(pair, x, iters=iters if b == 1 else max(3, iters // 2))
                key = f"t{t}_b{b}"
                out[f"deploy/{_PREFIX[runtime]}speedup_{key}"] = f_ms / i_ms
                out[f"deploy/{_MS_PREFIX[runtime]}fp32_ms_{key}"] = f_ms
                out[f"deploy/{_MS_PREFIX[runtime]}int8_ms_{key}"] = i_ms
    out["time/deploy_latency_s"] = time.perf_counter() - start
    ctx.log(out)
