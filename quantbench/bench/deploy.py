"""Deploy benchmark: int8 vs fp32 of the exported QDQ model in onnxruntime and OpenVINO, and its exactness.

Run with ``make bench`` (or ``python -m quantbench.bench.deploy --out reports/bench/deploy.md``).

For each model (torchvision ResNet-18 and MobileNet-V2 at 224x224, the YOLO-NAS-style detector at its
128x128 input; random weights with re-estimated BatchNorm statistics: nothing is downloaded) and preset:

* **speedup**: fp32 latency / int8 latency of the same model in the same runtime, at batches 1 and 8,
  1 and 2 threads, each pair measured interleaved (fp32, int8, fp32, int8 ...; medians);
* the two weight storages of the export (:func:`~quantbench.engine.storage.default_unsigned_weights`):
  uint8 where onnxruntime's int8 kernels would saturate (exact) and int8 (its fastest U8S8 kernels;
  exact only on a CPU with VNNI), and which one the harness uses on this machine;
* **parity**: each runtime's output vs the frozen torch graph, in output quantization steps, and top-1
  agreement (the first output's argmax);
* **the int8 limit** of this CPU for a compute-bound convolution (a 3x3 conv, 128 -> 128 channels,
  56x56): the best int8 / fp32 ratio an export can hope for, per runtime and weight storage.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import quantbench  # noqa: E402, F401  (torchvision import shim)
from quantbench.bench.common import random_bn_model  # noqa: E402
from quantbench.engine import ModelQuantizer, capture, check, export_onnx, machine, presets, runtimes  # noqa: E402
from quantbench.engine.storage import default_unsigned_weights  # noqa: E402

__all__ = ["bench_model", "conv_limit", "main"]

#: model -> its input size (the detector's is the shapes task's)
MODELS = {
    "resnet18": 224,
    "mobilenet_v2": 224,
    "yolo_nas_nano": 128,
}
SETTINGS = [(1, 1), (1, 8), (2, 1), (2, 8)]  # (threads, batch)


def _detector(size: int) -> nn.Module:
    from tasks.detection.model import build_detector

    torch.manual_seed(0)
    model = build_detector("yolo_nas_nano", 5).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, size, size))
    return model.eval().reparameterize()


def _build(name: str, size: int) -> nn.Module:
    return _detector(size) if name.startswith("yolo_nas") else random_bn_model(name, size)


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _parity(predict, frozen: nn.Module, inputs: list[torch.Tensor], scale: float | None) -> tuple[float, float]:
    """Max error in output steps (of the first output) and top-1 agreement % vs the frozen graph."""
    worst, agree, total = 0.0, 0, 0
    for x in inputs:
        with torch.no_grad():
            ref = _first(frozen(x)).float()
        got = _first(predict(x)).float()
        worst = max(worst, float((got - ref).abs().max()) / (scale or 1.0))
        agree += int((got.flatten(1).argmax(1) == ref.flatten(1).argmax(1)).sum())
        total += x.shape[0]
    return worst, 100.0 * agree / total


def _speedups(fp32: Path, int8: dict[str, Path], runtime: str, size: int) -> dict:
    out = {}
    for threads, batch in SETTINGS:
        x = torch.randn(batch, 3, size, size)
        sessions = [runtimes.session(runtime, fp32, threads)] + [runtimes.session(runtime, p, threads)
                                                                  for p in int8.values()]
        iters = 20 if batch == 1 else 8
        times = runtimes.latencies(sessions, x, iters=iters)
        for form, ms in zip(int8, times[1:]):
            out[(form, threads, batch)] = (times[0], ms)
    return out


def op_profile(path: Path, x: torch.Tensor, runs: int = 20) -> dict[str, tuple[float, int]]:
    """onnxruntime's profiler, 1 thread: op type -> (ms per inference, nodes), over ``runs`` inferences."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    totals: dict[str, list[float]] = {}
    nodes: dict[str, set[str]] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals.setdefault(op, []).append(event["dur"])
            nodes.setdefault(op, set()).add(event["name"])
    trace.unlink()
    return {op: (sum(d) / (runs + 1) / 1000, len(nodes[op])) for op, d in totals.items()}


def bench_model(name: str, preset: str, workdir: Path) -> list[dict]:
    """Rows (one per runtime x weight storage) for one model x preset."""
    torch.set_num_threads(2)
    size = MODELS[name]
    model = _build(name, size)
    example = (torch.randn(2, 3, size, size),)
    gm = capture(model, example)
    quantizer = ModelQuantizer(presets.get(preset))
    frozen = quantizer.freeze(quantizer.quantize_model(gm, [torch.randn(8, 3, size, size) for _ in range(4)]))
    fp32 = export_onnx(gm, example, workdir / f"{name}_fp32.onnx")
    forms = {"uint8": export_onnx(frozen, example, workdir / f"{name}_{preset}_u8w.onnx", unsigned_weights=True),
             "int8": export_onnx(frozen, example, workdir / f"{name}_{preset}_s8w.onnx", unsigned_weights=False)}
    scale = check.output_scales(frozen)[0]
    inputs = [torch.randn(8, 3, size, size) for _ in range(2)]
    harness_form = "uint8" if default_unsigned_weights() else "int8"
    x1 = torch.randn(1, 3, size, size)
    profiles = {"fp32": op_profile(fp32, x1), **{f"int8 ({w} weights)": op_profile(p, x1) for w, p in forms.items()}}
    rows = [{"model": name, "size": size, "preset": preset, "profile": profiles}]
    for runtime in ("ort", "openvino"):
        if runtime == "openvino" and machine.openvino_version() is None:
            continue
        # OpenVINO reads uint8 weights as int8 (runtimes.signed_weights): one form is enough there
        use = forms if runtime == "ort" else {"int8": forms["int8"]}
        times = _speedups(fp32, use, runtime, size)
        for form, path in use.items():
            lsb, agree = _parity(runtimes.session(runtime, path, 2).predict_fn(), frozen, inputs, scale)
            row = {"model": name, "size": size, "preset": preset, "runtime": runtime, "weights": form,
                   "harness": runtime == "ort" and form == harness_form, "max_lsb": lsb, "top1_agree": agree}
            for threads, batch in SETTINGS:
                f, i = times[(form, threads, batch)]
                row[f"t{threads}b{batch}"] = f / i
                row[f"ms_t{threads}b{batch}"] = (f, i)
            rows.append(row)
            print(f"{name} {preset} {runtime} {form}: t1b1 {row['t1b1']:.2f}x, max LSB {lsb:.0f}, "
                  f"agree {agree:.0f}%", flush=True)
    return rows


def conv_limit(workdir: Path) -> list[dict]:
    """int8 / fp32 of one compute-bound 3x3 conv (128 -> 128 channels, 56x56, batch 1, 1 thread)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 128, 56, 56)
    gm = capture(conv, (x,))
    quantizer = ModelQuantizer(presets.get("int8_float"))
    qm = quantizer.quantize_model(gm, [x])
    frozen = quantizer.freeze(qm)
    fp32 = export_onnx(gm, (x,), workdir / "conv_fp32.onnx")
    forms = {w: export_onnx(frozen, (x,), workdir / f"conv_{w}.onnx", unsigned_weights=(w == "uint8"))
             for w in ("uint8", "int8")}
    rows = []
    x1 = torch.randn(1, 128, 56, 56)
    for runtime in ("ort", "openvino"):
        if runtime == "openvino" and machine.openvino_version() is None:
            continue
        paths = forms if runtime == "ort" else {"int8": forms["int8"]}
        sessions = [runtimes.session(runtime, fp32, 1)] + [runtimes.session(runtime, p, 1) for p in paths.values()]
        times = runtimes.latencies(sessions, x1, iters=30)
        for form, ms in zip(paths, times[1:]):
            rows.append({"runtime": runtime, "weights": form, "fp32_ms": times[0], "int8_ms": ms,
                         "ratio": times[0] / ms})
    return rows


def _render(rows: list[dict], limit: list[dict], elapsed_min: float) -> str:
    m = machine.describe()
    harness_form = "uint8" if default_unsigned_weights() else "int8"
    ov = machine.openvino_version() or "not installed"
    lines = [
        "<!-- Generated by `make bench` (python -m quantbench.bench.deploy); do not edit by hand. -->",
        "# Deploy benchmark: int8 vs fp32 in onnxruntime and OpenVINO",
        "",
        f"CPU: {m.cpu}, {m.cores} logical cores, int8 ISA: {', '.join(m.isa) or 'none'}; torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, OpenVINO {ov}; OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}. This run: {elapsed_min:.1f} min.",
        "",
        "Random weights with re-estimated BatchNorm statistics (nothing is downloaded); ResNet-18 and "
        "MobileNet-V2 at 224x224, the YOLO-NAS-style detector (nano) at its 128x128 input. Each speedup is "
        "fp32 latency / int8 latency of the same model in the same runtime, the two measured interleaved "
        "(t = threads, b = batch). **weights**: how the export stores GEMM weights: `uint8` (+128, exact "
        "everywhere: onnxruntime's U8U8 kernels cannot saturate) or `int8` (its U8S8 kernels: on an x86 CPU "
        f"without VNNI their int16 pair sums saturate). On this machine the harness exports **{harness_form}** "
        "(`run.unsigned_weights=null`, :func:`default_unsigned_weights`); a conv whose input is a ReLU's "
        "output keeps int8 weights either way (exact: its integers are 0..127). OpenVINO reads either file with "
        "int8 weights (uint8 ones it would run in float). **parity**: the runtime's first output vs the frozen "
        "torch graph on 16 random images: max error in output quantization steps, top-1 agreement.",
        "",
        "| model | preset | runtime | weights | t1 b1 | t1 b8 | t2 b1 | t2 b8 | fp32 / int8 ms (t1 b1) "
        "| max LSB | top-1 agree % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    profiles = [r for r in rows if "profile" in r]
    rows = [r for r in rows if "profile" not in r]
    for r in rows:
        mark = " (harness)" if r["harness"] else ""
        f, i = r["ms_t1b1"]
        lines.append(
            f"| {r['model']} {r['size']} | {r['preset']} | {r['runtime']} | {r['weights']}{mark} "
            f"| {r['t1b1']:.2f}x | {r['t1b8']:.2f}x | {r['t2b1']:.2f}x | {r['t2b8']:.2f}x "
            f"| {f:.2f} / {i:.2f} | {r['max_lsb']:.0f} | {r['top1_agree']:.1f} |")
    lines += ["", "## Where the time goes: onnxruntime's profiler, op by op",
              "",
              "Batch 1, 1 thread, the optimized graph's kernels (ms per inference, summed over nodes of a type; "
              "the node count in parentheses); the ops that take under 1 % of every column are left out."]
    for p in profiles:
        prof = p["profile"]
        heads = list(prof)
        ops = sorted({op for d in prof.values() for op in d}, key=lambda op: -max(d.get(op, (0, 0))[0] for d in prof.values()))
        total = {h: sum(v[0] for v in prof[h].values()) for h in heads}
        lines += ["", f"**{p['model']} {p['size']}x{p['size']}, {p['preset']}**", "",
                  "| op | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for op in ops:
            if all(prof[h].get(op, (0, 0))[0] < 0.01 * total[h] for h in heads):
                continue
            cells = [f"{prof[h][op][0]:.3f} ({prof[h][op][1]})" if op in prof[h] else "" for h in heads]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        lines.append("| **total** | " + " | ".join(f"**{total[h]:.3f}**" for h in heads) + " |")
    lines += ["", "## The int8 limit of this CPU",
              "",
              "One compute-bound 3x3 conv + ReLU (128 -> 128 channels, 56x56, batch 1, 1 thread), fp32 vs its "
              "int8 QDQ export: the ratio a whole network approaches when its convolutions dominate.",
              "", "| runtime | weights | fp32 ms | int8 ms | int8 speedup |", "|---|---|---|---|---|"]
    for r in limit:
        lines.append(f"| {r['runtime']} | {r['weights']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['ratio']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench/deploy.md")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--presets", nargs="+", default=["int8_float"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        limit = conv_limit(Path(tmp))
        for name in args.models:
            for preset in args.presets:
                rows += bench_model(name, preset, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_render(rows, limit, (time.perf_counter() - start) / 60))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
