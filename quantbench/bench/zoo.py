"""Model-zoo benchmark: how much of each model family runs on integers once deployed, and how exactly.

Run with ``python -m quantbench.bench.zoo --out reports/bench/zoo.md`` (a line of
``make bench``); ``--families resnet,vit`` runs a subset. For each family at its
smallest size and a small input, with random weights (``pretrained=False``, no
downloads) whose BatchNorm statistics are re-estimated on random data, and for
each preset: capture -> quantize (calibrated on random batches) -> coverage as
the engine reports it (:meth:`ModelQuantizer.coverage`: a node counts when the
frozen graph computes it with an integer kernel) and as exported (the nodes of
onnxruntime's optimised graph that compute in float,
:func:`quantbench.engine.onnx_coverage.onnx_float_nodes`) -> freeze -> QDQ
ONNX -> parity (:func:`quantbench.engine.check.compare`). The engine's count is
of the captured graph's ops, the export's of onnxruntime's nodes after fusion, so
the totals differ; the float counts must agree (both zero when all is integer).
A stage that fails ends its row with the error's first line; the benchmark
goes on. The rows are also written as JSON next to the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import quantbench  # noqa: E402, F401  (torchvision import shim, before timm)
from quantbench.engine import ModelQuantizer, capture, check, export_onnx, presets  # noqa: E402
from quantbench.engine.onnx_coverage import onnx_float_nodes  # noqa: E402
from quantbench.errors import one_line  # noqa: E402
from quantbench.registry import Registry, UnknownNameError  # noqa: E402

__all__ = ["FAMILIES", "Family", "bench_family", "build_model", "main"]

NUM_CLASSES = 10
BATCH = 8
PARITY_BATCHES = 4  # 32 images


@dataclass(frozen=True)
class Family:
    """One model family at its smallest size: a timm name with keyword arguments, or a builder."""

    name: str
    model: str
    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    build: Callable[[], nn.Module] | None = None
    reparameterize: bool = False  # timm's deploy form (branches fused into one conv)
    note: str = ""


def _densenet_tiny() -> nn.Module:
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=16, block_config=(2, 2, 2, 2), num_classes=NUM_CLASSES)


def _yolov8_tiny() -> nn.Module:
    from quantbench.bench.zoo_models import YoloV8Tiny

    return YoloV8Tiny()


def _yolo11_attn_tiny() -> nn.Module:
    from quantbench.bench.zoo_models import Yolo11AttnTiny

    return Yolo11AttnTiny()


ZOO_FAMILIES = (
    Family("resnet", "resnet10t", 32),
    Family("resnext", "resnext26ts", 32),
    Family("regnetx", "regnetx_002", 32),
    Family("regnety", "regnety_002", 32),
    Family("mobilenetv2", "mobilenetv2_035", 32),
    Family("mobilenetv3", "mobilenetv3_small_050", 32),
    Family("efficientnet", "efficientnet_b0", 32),
    Family("efficientnet_lite", "efficientnet_lite0", 32, note="ReLU6 instead of SiLU, no squeeze-excite"),
    Family("ghostnet", "ghostnet_050", 32),
    Family("densenet", "densenet_tiny", 32, build=_densenet_tiny,
           note="timm DenseNet with growth 16 and blocks 2-2-2-2 (densenet121, the smallest registered, "
                "has the same ops)"),
    Family("convnext", "convnext_atto", 32),
    Family("vit", "vit_tiny_patch16_224", 32, {"img_size": 32, "patch_size": 8},
           note="ViT-Ti (12 blocks, dim 192) on 8x8 patches: 16 tokens + class token"),
    Family("swin", "swin_tiny_patch4_window7_224", 64, {"img_size": 64, "window_size": 4},
           note="Swin-T with window 4 (16x16 tokens; the last stage's window shrinks to its 2x2 map)"),
    Family("mobilevit", "mobilevit_xxs", 64),
    Family("levit", "levit_128s", 64, {"img_size": 64},
           note="attention biases sized for 64x64 (4x4, 2x2, 1x1 tokens); LeViT's BatchNorm1d re-estimated too"),
    Family("fastvit", "fastvit_t8", 64, reparameterize=True),
    Family("efficientformer", "efficientformerv2_s0", 64, {"img_size": 64},
           note="efficientformer_l1 needs 224x224 (its attention bias is fixed at 7x7); v2-S0 takes img_size"),
    Family("repvgg", "repvgg_a0", 32, reparameterize=True),
    Family("yolov8", "yolov8_tiny", 64, build=_yolov8_tiny,
           note="quantbench.bench.zoo_models.YoloV8Tiny (detector; output (B, 4 + classes, anchors): "
                "top-1 is the argmax over box and class channels per anchor)"),
    Family("yolo11", "yolo11_attn_tiny", 64, build=_yolo11_attn_tiny,
           note="quantbench.bench.zoo_models.Yolo11AttnTiny: YoloV8Tiny plus a C2PSA-style attention block"),
)

FAMILIES: Registry[Family] = Registry("zoo family", hint="(python -m quantbench.bench.zoo --help lists them)")
for _f in ZOO_FAMILIES:
    FAMILIES.add(_f.name, _f)


def _reestimate_bn(model: nn.Module, size: int, batches: int = 4) -> None:
    """BatchNorm statistics (every BatchNorm kind) from random data, as a trained network's would look."""
    g = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, 3, size, size, generator=g))


def build_model(family: Family) -> nn.Module:
    """The family's model in eval mode: random weights, re-estimated BatchNorm, deploy form if it has one."""
    torch.manual_seed(0)
    if family.build is not None:
        model = family.build()
    else:
        import timm

        model = timm.create_model(family.model, pretrained=False, num_classes=NUM_CLASSES, **family.kwargs)
    _reestimate_bn(model, family.size)
    if family.reparameterize:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model)
    return model.eval()


def _batches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, size, size, generator=g) for _ in range(n)]


def _preset_row(family: Family, preset: str, model: nn.Module, gm, capture_s: float, workdir: Path,
                batches: int, threads: int) -> dict:
    """One (family, preset) row; a failing stage ends it with ``error``."""
    row: dict[str, Any] = {"family": family.name, "model": family.model, "input": family.size, "preset": preset,
                           "capture_s": capture_s}
    stage = "quantize"
    try:
        t0 = time.perf_counter()
        quantizer = ModelQuantizer(presets.get(preset))
        qmodel = quantizer.quantize_model(gm, _batches(batches, family.size, seed=1))
        row["quantize_s"] = time.perf_counter() - t0
        stage = "coverage"
        ann = quantizer.coverage(qmodel)
        row.update(annotated_int=ann.quantized_ops, annotated_total=ann.total_ops)
        stage = "freeze"
        t0 = time.perf_counter()
        frozen = quantizer.freeze(qmodel)
        row["freeze_s"] = time.perf_counter() - t0
        stage = "export"
        t0 = time.perf_counter()
        path = export_onnx(frozen, (torch.randn(2, 3, family.size, family.size),),
                           workdir / f"{family.name}_{preset}.onnx")
        row["export_s"] = time.perf_counter() - t0
        row["pipeline_s"] = capture_s + row["quantize_s"] + row["freeze_s"] + row["export_s"]
        stage = "export coverage"
        cov = onnx_float_nodes(path, threads=threads)
        row.update(export_int=cov.integer_ops, export_total=cov.total_ops, float_compute=len(cov.float_nodes),
                   float_ops=cov.float_op_counts(), float_movement=len(cov.float_movement),
                   float_nodes=[list(n) for n in cov.float_nodes])
        stage = "parity"
        rep = check.compare(path, frozen, _batches(PARITY_BATCHES, family.size, seed=2), float_model=model,
                            session=check.ort_session(path, threads))
        row.update(max_lsb=rep.max_lsb_err, top1_agree=rep.top1_agreement, sqnr_db=rep.onnx_sqnr_db,
                   torch_sqnr_db=rep.sqnr_db, samples=rep.samples)
    except Exception as exc:  # noqa: BLE001  (a failing model is a row of the report, not the end of it)
        row["error"] = f"{stage}: {type(exc).__name__}: {one_line(exc)}"
    return row


def bench_family(name: str, presets_: list[str], workdir: Path, *, batches: int = 8, threads: int = 1) -> list[dict]:
    """Rows of one family, one per preset (the model is built and captured once)."""
    family = FAMILIES.get(name)
    torch.set_num_threads(threads)
    stage = "build"
    try:
        model = build_model(family)
        stage = "capture"
        t0 = time.perf_counter()
        gm = capture(model, (torch.randn(2, 3, family.size, family.size),))
        capture_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        error = (f"skipped: {one_line(exc)}" if isinstance(exc, ImportError)
                 else f"{stage}: {type(exc).__name__}: {one_line(exc)}")
        return [{"family": name, "model": family.model, "input": family.size, "preset": p, "error": error}
                for p in presets_]
    return [_preset_row(family, p, model, gm, capture_s, workdir, batches, threads) for p in presets_]


def _fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def _float_cell(row: dict) -> str:
    cells = []
    if "float_ops" in row:
        cells.append(", ".join(f"{op}×{n}" for op, n in row["float_ops"].items()) or "none")
        if row.get("float_movement"):
            cells.append(f"(+{row['float_movement']} float data movement)")
    if "error" in row:
        cells.append(f"**{row['error'].replace('|', '/')[:200]}**")
    return " ".join(cells)


def _table_row(r: dict) -> str:
    ann = f"{r['annotated_int']}/{r['annotated_total']}" if "annotated_int" in r else "-"
    exp = f"{r['export_int']}/{r['export_total']}" if "export_int" in r else "-"
    return (f"| {r['family']} | {r['model']} | {r['input']} | {r['preset']} | {ann} | {exp} "
            f"| {r.get('float_compute', '-')} | {_fmt(r, 'max_lsb', '.0f')} | {_fmt(r, 'top1_agree', '.1f')} "
            f"| {_fmt(r, 'sqnr_db', '.1f')} | {_fmt(r, 'pipeline_s', '.1f')} | {_float_cell(r)} |")


def _environment(threads: int, batches: int, source: str) -> dict:
    import onnx
    import onnxruntime
    import timm

    return {"source": source, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "calibration": f"{batches} random batches of {BATCH}", "parity": f"{PARITY_BATCHES * BATCH} random images",
            "num_classes": NUM_CLASSES}


def _git_source() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"git {sha}" + (" with uncommitted changes" if dirty else "")


def render(rows: list[dict], env: dict, families: list[str], minutes: float) -> str:
    """The markdown report."""
    lines = [
        "<!-- Generated by `make bench` (python -m quantbench.bench.zoo); do not edit by hand. -->",
        "# Model-zoo benchmark",
        "",
        f"Code: {env['source']}. CPU: {env['cpu']}, {env['cores']} cores, {env['threads']} thread(s) for torch "
        f"and onnxruntime; torch {env['torch']}, timm {env['timm']}, onnx {env['onnx']}, onnxruntime "
        f"{env['onnxruntime']}, OMP_WAIT_POLICY={env['omp_wait_policy']}. This run: {minutes:.1f} min.",
        "",
        f"Each family at its smallest size with random weights (`pretrained=False`, {env['num_classes']} classes, "
        "no downloads), BatchNorm statistics re-estimated on random data (4 batches of 16 in train mode, "
        "momentum None); RepVGG and FastViT in their reparameterized (deploy) form. Calibration: "
        f"{env['calibration']}; parity on {env['parity']}. Regenerate with `python -m quantbench.bench.zoo "
        "--out reports/bench/zoo.md` (`--families resnet,vit --presets int8_float` for a subset, "
        "`--threads`, `--batches`).",
        "",
        "* **engine**: compute ops of the captured graph that the frozen graph computes with integer kernels "
        "(`quantizer.coverage`).",
        "* **export**: compute nodes that run on integers in onnxruntime's optimised graph (CPU provider, "
        "ORT_ENABLE_EXTENDED: every QDQ fusion) / all its compute nodes; **float**: how many compute in "
        "float (`quantbench.engine.onnx_coverage.onnx_float_nodes`; data movement and Q/DQ are not compute).",
        "* **max LSB**, **top-1 agree**: onnxruntime vs the frozen torch graph, in output quantization steps; "
        "**SQNR**: onnxruntime output vs the float model (low: random weights amplify quantization noise).",
        "* **pipeline**: capture + quantize + freeze + QDQ export, seconds (the capture is shared by the presets).",
        "",
        "| family | model | input | preset | engine | export | float | max LSB | top-1 agree % | SQNR dB "
        "| pipeline s | float compute nodes / error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_table_row(r) for r in rows),
        "",
    ]
    notes = [f"* **{name}**: {FAMILIES.get(name).note}" for name in families if FAMILIES.get(name).note]
    return "\n".join([*lines, *(["Notes:", "", *notes, ""] if notes else [])])


def _names(text: str, check_name: Callable[[str], Any]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        check_name(n)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench/zoo.md", help="markdown report; the JSON rows go beside it")
    parser.add_argument("--families", default=",".join(f.name for f in ZOO_FAMILIES),
                        help="comma list of: " + ", ".join(f.name for f in ZOO_FAMILIES))
    parser.add_argument("--presets", default="int8_float,int8_pow2", help="comma list of engine presets")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--batches", type=int, default=8, help=f"calibration batches of {BATCH} random images")
    parser.add_argument("--source", default=None, help="label of the code measured (default: its git revision)")
    args = parser.parse_args(argv)
    try:
        families = _names(args.families, FAMILIES.get)
        presets_ = _names(args.presets, presets.get)
    except UnknownNameError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in families:
            for row in bench_family(name, presets_, Path(tmp), batches=args.batches, threads=args.threads):
                summary = row.get("error") or (f"export {row['export_int']}/{row['export_total']}, "
                                               f"LSB {row['max_lsb']:.0f}, {row['pipeline_s']:.1f} s")
                print(f"{row['family']} {row['preset']}: {summary}", flush=True)
                rows.append(row)
    env = _environment(args.threads, args.batches, args.source or _git_source())
    minutes = (time.perf_counter() - start) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, env, families, minutes))
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "minutes": minutes, "rows": rows},
                                                   indent=1, default=str) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
