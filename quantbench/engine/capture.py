"""nn.Module -> ATen GraphModule with ``torch.export``.

The graph is the ``.module()`` of an :class:`torch.export.ExportedProgram`:
high-level ATen ops (``conv2d``, ``linear``, ``batch_norm``), parameters read
by ``get_attr`` nodes, and each call site of a module a node of its own (a
ReLU module called twice is two nodes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Iterator

import torch
from torch import fx

from quantbench.engine.errors import CaptureError, example_tuple
from quantbench.quiet import verbose

__all__ = ["capture", "CaptureError"]

_FIXES = (
    "usual fixes: remove data-dependent Python control flow (if/for on tensor values) or express it "
    "with torch.cond/torch.where; avoid .item()/.tolist()/numpy calls in forward; keep the batch size "
    ">= 2 in the example; move dynamic-shape logic out of forward"
)


def capture(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *,
            dynamic_batch: bool = True) -> fx.GraphModule:
    """Capture ``model`` (in eval mode) as an ATen GraphModule.

    Args:
        model: the float model; it is put in eval mode.
        example_inputs: a tuple of example tensors with batch size >= 2 (a
            batch of 1 is specialised to a constant by torch.export); a single
            tensor or a list of tensors is taken as that tuple.
        dynamic_batch: export the batch dimension as dynamic.

    Raises:
        CaptureError: (a BadInputError) one line: ``model`` is not an nn.Module, ``example_inputs``
            are not tensors, or torch.export failed (the model class, torch's first line, the
            usual fixes; torch's exception is the ``__cause__``, what it printed is ``graph_dump``).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    example_inputs = example_tuple(example_inputs, "capture")  # a single tensor or a list is fine too
    if dynamic_batch and any(t.dim() > 0 and t.shape[0] < 2 for t in example_inputs):
        raise CaptureError("capture needs an example batch of size >= 2 (torch.export specialises a batch "
                           "of 1 to a constant); repeat the sample along dim 0")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in example_inputs)
    model = model.eval()
    with _quiet_failure() as dump:
        try:
            exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # torch.export raises many types; we name the construct once
            error = CaptureError(_describe(exc, type(model).__name__))
            error.graph_dump = dump.getvalue()  # what torch printed: the partial graph (shown by --debug / -v)
            raise error from exc
    gm = exported.module()
    gm.meta["qb_example_shapes"] = [tuple(t.shape) for t in example_inputs]
    return gm


@contextlib.contextmanager
def _quiet_failure() -> Iterator[io.StringIO]:
    """Hold back what torch.export writes to stderr while it runs.

    On a failure torch prints the partial FX graph (tens of lines) straight to
    stderr and logs "Unable to find user code" warnings; the CaptureError already
    names the construct in one line. Whatever was held back is written out after
    a successful capture, and always under ``QUANTBENCH_VERBOSE=1``.
    """
    held = io.StringIO()
    if verbose():
        yield held
        return
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    failed = False
    try:
        with contextlib.redirect_stderr(held):
            yield held
    except BaseException:
        failed = True
        raise
    finally:
        shapes_log.setLevel(level)
        if not failed and held.getvalue():
            sys.stderr.write(held.getvalue())


def _describe(exc: Exception, model_class: str) -> str:
    """One line: torch's first line, where in ``forward`` it failed, the usual fixes, where the rest is."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    where = next((ln for ln in lines if ln.startswith("File ") or " line " in ln), "")
    where = f" at {where}" if where else ""
    return (f"torch.export could not capture the model {model_class} ({type(exc).__name__}: {head}){where}; "
            f"{_FIXES}; --debug or QUANTBENCH_VERBOSE=1 shows torch's full report")
