"""Make ``import torchvision`` work when its compiled extension cannot load.

Why: the torchvision 0.28 wheel on PyPI is a CUDA build. On a CPU-only torch
its ``_C.so`` fails to load (it needs ``libc10_cuda.so``), and then
``torchvision/_meta_registrations.py`` dies at import with
``RuntimeError: operator torchvision::nms does not exist``; ``timm`` fails the
same way because it imports torchvision.

What: before torchvision is first imported (:func:`prepare`, called by the
import hook of :mod:`quantbench.compat.hook`, or :func:`ensure_torchvision_ops`) we try to load its extension the
way torchvision does. If that works we do nothing. Otherwise we define the two
op schemas that torchvision registers fake kernels for at import time
(``nms`` and ``qnms``) and give ``nms`` a CPU kernel written in PyTorch; once
torchvision has been imported (:func:`finish`) we let ``torchvision.extension`` report that ops are
present, so ``torchvision.ops.nms`` / ``batched_nms`` dispatch to our kernel.
Ops without a kernel here (``deform_conv2d``, the image codecs) still fail
with torch's "no kernel" error; ``roi_align`` keeps its pure-Python fallback
because that module captured the original ``_has_ops`` at import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["ensure_torchvision_ops", "finish", "nms_reference", "prepare", "torchvision_ops_status"]

_STATUS: str | None = None
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, same contract as ``torchvision::nms``.

    Returns the indices of the kept boxes (int64), sorted by decreasing score.
    Boxes are ``(x1, y1, x2, y2)``.
    """
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = dets[order].to(torch.float64)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    ix1 = torch.maximum(x1[:, None], x1[None, :])
    iy1 = torch.maximum(y1[:, None], y1[None, :])
    ix2 = torch.minimum(x2[:, None], x2[None, :])
    iy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=torch.finfo(torch.float64).tiny)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    over = (iou > iou_threshold).cpu()
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=dets.device)]


def _extension_loads() -> bool | None:
    """True if torchvision's own ``_C`` loads, False if not, None if not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError, ImportError):
        return False
    return True


def _define_fallback_ops() -> None:
    global _LIBRARY
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TID251 - public torch API
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_reference, "CPU")
    _LIBRARY = lib


def torchvision_ops_status() -> str:
    """``"native"``, ``"fallback"`` or ``"absent"``: how torchvision ops are served."""
    return _STATUS or "not-initialised"


def prepare() -> bool:
    """The part before ``import torchvision``: find out whether its extension loads, else define the ops.

    Returns True when :func:`finish` must run once torchvision has been
    imported (the fallback), False when there is nothing more to do.
    Idempotent. :mod:`quantbench.compat.hook` calls it from its import hook.
    """
    global _STATUS
    if _STATUS is not None:
        return _STATUS == "fallback" and "torchvision" not in sys.modules
    if "torchvision" in sys.modules:
        # Imported before us: it either worked (native) or already failed.
        ext = sys.modules.get("torchvision.extension")
        _STATUS = "native" if ext is not None and ext._has_ops() else "fallback"
        return False
    loads = _extension_loads()
    if loads is None:
        _STATUS = "absent"
    elif loads:
        _STATUS = "native"
    else:
        _define_fallback_ops()
        _STATUS = "fallback"
    return _STATUS == "fallback"


def finish(_torchvision: object = None) -> None:
    """The part after ``import torchvision``: ``torchvision.ops.nms`` dispatches to our kernel."""
    import torchvision.extension as tv_ext

    tv_ext._has_ops = lambda: True  # the nms kernel above now backs torchvision.ops.nms


def ensure_torchvision_ops() -> str:
    """Make torchvision importable now; idempotent. Returns :func:`torchvision_ops_status`."""
    if prepare():
        finish()  # importing torchvision.extension imports torchvision, after the ops exist
    return torchvision_ops_status()
