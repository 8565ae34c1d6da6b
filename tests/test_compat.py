"""The torchvision compat shim: a fallback here, a no-op where the real extension loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from quantbench.compat import torchvision_ops
from quantbench.compat.torchvision_ops import nms_reference


def _brute_nms(boxes, scores, thr):
    order = scores.argsort(descending=True).tolist()
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i], boxes[j]
            ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = ix * iy
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_reference_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert nms_reference(boxes, scores, thr).tolist() == _brute_nms(boxes.tolist(), scores, thr)


_NMS = ("b = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]]); s = torch.tensor([.9, .8, .7])\n"
        "from quantbench.compat import torchvision_ops_status\n"
        "assert torchvision_ops_status() in ('native', 'fallback'), torchvision_ops_status()\n"
        "assert torchvision.ops.batched_nms(b, s, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]\n"
        "print(torchvision.ops.nms(b, s, 0.5).tolist(), type(timm.create_model('resnet18')).__name__)\n")


def _fresh(code: str, *flags: str) -> str:
    out = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_order_does_not_matter_in_this_environment():
    """torchvision first, without quantbench: the site-packages .pth installed the hook at startup."""
    from quantbench.compat.hook import PTH_LINE, pth_path

    assert pth_path().read_text() == PTH_LINE, "make install writes it: python -m quantbench.compat --install-hook"
    assert _fresh("import torch, torchvision, timm\n" + _NMS) == "[0, 2] ResNet"


def test_import_quantbench_first_is_enough_without_the_pth_and_is_cheap():
    """-S skips site-packages' .pth files: `import quantbench` alone installs the hook, imports no torch."""
    import quantbench

    root = str(Path(quantbench.__file__).parents[1])
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (f"import sys; sys.path[:0] = [{root!r}, {site!r}]\n"
            "import quantbench; assert 'torch' not in sys.modules, 'import quantbench must stay cheap'\n"
            "import importlib.util; assert importlib.util.find_spec('torchvision')  # a check does not spend it\n"
            "import torch, torchvision, timm\n" + _NMS)
    assert _fresh(code, "-S") == "[0, 2] ResNet"


def test_noop_when_the_real_extension_loads():
    """Where torchvision's _C loads, the shim defines nothing."""
    # Load the module file alone: importing the quantbench package would apply the shim first.
    code = (
        "import sys, importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('tvops', {torchvision_ops.__file__!r})\n"
        "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
        "t._extension_loads = lambda: True\n"
        "print(t.ensure_torchvision_ops(), t._LIBRARY is None, 'torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "native True False"


def test_status_is_reported():
    import torchvision  # noqa: F401 - the status is set when torchvision is first imported

    assert torchvision_ops.torchvision_ops_status() in ("native", "fallback")
