"""The entry point of an engine in its own virtualenv: ``python -m quantbench.peers.worker JOB_DIR``.

It reads ``job.json``, runs the engine module on the job, writes the torch-side outputs on the
job's validation inputs (``outputs.pt``) when the engine has a torch-side model, and writes
``record.json``. An engine that cannot express the job writes a record with ``status:
unsupported``; any other failure prints its traceback and exits 1 (the run records it).
Only the standard library, torch, this package's protocol and the engine's toolkit are imported.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from quantbench.peers.base import PeerOutput, Unsupported, engine_module, installed_version
from quantbench.peers.protocol import PeerJob, PeerRecord, load_tensors, save_tensors


def _outputs(model, batches: list) -> list:
    import torch

    out = []
    with torch.no_grad():
        for x in batches:
            y = model(x)
            out.append(tuple(y) if isinstance(y, (list, tuple)) else y)
    return out


def run_job(root: str | Path, model=None) -> tuple[PeerRecord, PeerOutput | None]:
    """Run the job in ``root`` in this interpreter; returns its record (also written) and the engine's output."""
    import torch

    job = PeerJob.load(root)
    torch.manual_seed(job.seed)
    torch.set_num_threads(max(1, int(job.threads)))
    module = engine_module(job.engine)
    record = PeerRecord(job.engine, version=installed_version(module.DISTRIBUTION))
    start = time.perf_counter()
    try:
        output = module.quantize(job, model)
    except Unsupported as exc:
        record.status, record.reason = "unsupported", str(exc)
        record.save(root)
        return record, None
    record.quantize_s = output.quantize_s or (time.perf_counter() - start)
    record.options, record.notes, record.metrics = dict(output.options), list(output.notes), dict(output.metrics)
    if output.onnx is not None:
        record.onnx = Path(output.onnx).name if Path(output.onnx).parent == Path(root) else str(output.onnx)
    if model is None and output.torch_model is not None and job.eval_inputs:
        save_tensors(_outputs(output.torch_model, load_tensors(job.path(job.eval_inputs))), Path(root) / "outputs.pt")
        record.outputs = "outputs.pt"
    record.save(root)
    return record, output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m quantbench.peers.worker JOB_DIR", file=sys.stderr)
        return 2
    run_job(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
