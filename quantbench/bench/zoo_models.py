"""Tiny detectors of our own that reproduce the graph patterns of YOLOv8 and YOLO11.

Written from the published architecture descriptions, not from ultralytics
(AGPL): nothing here imports or downloads it. Each model is small enough for a
fast test (64x64 input, under 100k parameters) and keeps the constructs that
matter to a graph quantizer: Conv-BN-SiLU blocks, a C2f split / bottleneck /
concat block, SPPF max pools, an upsample + concat neck, a decoupled head
whose decode builds its anchor grid from feature-map shapes at run time, a
DFL expectation over ``reg_max`` bins, and (YOLO11) a PSA attention block::

    model = ZOO.get("yolov8_tiny")()
    out = model(torch.randn(2, 3, 64, 64))   # (2, 4 + num_classes, anchors)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.registry import Registry

__all__ = ["ZOO", "Yolo11AttnTiny", "YoloV8Tiny", "dist2bbox", "make_anchors"]

ZOO: Registry[Callable[..., nn.Module]] = Registry("zoo model", hint="(ZOO.list() names them)")
"""Zoo model constructors by name: ``ZOO.get("yolov8_tiny")(num_classes=4)``."""


class ConvBnAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU: the basic block of every YOLO since v5."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvBnAct with an optional residual add."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(c, c, 3)
        self.cv2 = ConvBnAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, ``chunk(2)``, bottlenecks chained on the second half, concat of every stage, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBnAct(c_in, 2 * self.c, 1)
        self.cv2 = ConvBnAct((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools, concat with the input, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBnAct(c_in, hidden, 1)
        self.cv2 = ConvBnAct(hidden * 4, c_out, 1)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(F.max_pool2d(y[-1], self.k, 1, self.k // 2))
        return self.cv2(torch.cat(y, 1))


class PSAAttention(nn.Module):
    """YOLO11's attention: one 1x1 conv for q, k, v; ``softmax(q^T k * scale)``; ``v @ attn^T``;
    a depthwise 3x3 conv on v as positional encoding; a 1x1 projection."""

    def __init__(self, dim: int, num_heads: int = 2, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = ConvBnAct(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = ConvBnAct(dim, dim, 1, act=False)
        self.pe = ConvBnAct(dim, dim, 3, groups=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class C2PSA(nn.Module):
    """YOLO11's C2PSA: split, a PSA block (attention + 1x1 FFN, both residual) on one half, concat."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c // 2
        self.cv1 = ConvBnAct(c, 2 * self.c, 1)
        self.cv2 = ConvBnAct(2 * self.c, c, 1)
        self.attn = PSAAttention(self.c, num_heads=max(1, self.c // 8))
        self.ffn = nn.Sequential(ConvBnAct(self.c, 2 * self.c, 1), ConvBnAct(2 * self.c, self.c, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


def make_anchors(feats: Sequence[torch.Tensor], strides: Sequence[float],
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres ``(A, 2)`` and their strides ``(A, 1)``, built from the feature-map shapes.

    The run-time grid of the YOLOv8 family: ``arange`` over W and H, ``meshgrid``,
    ``stack``, ``type_as`` the features, ``new_full`` for the stride of each level.
    """
    points, stride_list = [], []
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[2:]
        sx = torch.arange(w).type_as(feat) + offset
        sy = torch.arange(h).type_as(feat) + offset
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_list.append(feat.new_full((h * w, 1), float(stride)))
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(distance: torch.Tensor, anchors: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(left, top, right, bottom) distances from each anchor -> (cx, cy, w, h) boxes."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchors - lt
    x2y2 = anchors + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class DFL(nn.Module):
    """Distribution focal loss decode: softmax over ``reg_max`` bins, expectation by a fixed 1x1 conv."""

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectHead(nn.Module):
    """Decoupled head (box and class branches per level) with the YOLOv8 decode."""

    def __init__(self, channels: Sequence[int], strides: Sequence[float], num_classes: int, reg_max: int,
                 hidden: int) -> None:
        super().__init__()
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, tuple(strides)
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, hidden, 3), ConvBnAct(hidden, hidden, 3), nn.Conv2d(hidden, 4 * reg_max, 1))
            for c in channels)
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, hidden, 3), ConvBnAct(hidden, hidden, 3), nn.Conv2d(hidden, num_classes, 1))
            for c in channels)
        self.dfl = DFL(reg_max)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        b = feats[0].shape[0]
        outs = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.box, self.cls)]
        flat = torch.cat([o.view(b, 4 * self.reg_max + self.num_classes, -1) for o in outs], 2)
        box, cls = flat.split((4 * self.reg_max, self.num_classes), 1)
        anchors, strides = (t.transpose(0, 1) for t in make_anchors(outs, self.strides))
        boxes = dist2bbox(self.dfl(box), anchors.unsqueeze(0), dim=1) * strides
        return torch.cat((boxes, cls.sigmoid()), 1)


@ZOO.register(name="yolov8_tiny")
class YoloV8Tiny(nn.Module):
    """YOLOv8 at toy size: backbone, SPPF, a two-scale PAN neck and the anchor-free DFL head.

    Reproduces the patterns of ultralytics' YOLOv8 / YOLO11 detectors that a
    whole-graph quantizer meets: Conv-BN-SiLU, C2f (``chunk``, residual
    bottlenecks, ``cat``), SPPF (chained max pools, ``cat``), nearest upsample
    + ``cat`` in the neck, a decoupled head, DFL (``softmax`` over bins and a
    1x1 conv with ``arange`` weights) and ``dist2bbox`` against an anchor grid
    that ``forward`` builds from the feature-map shapes. Strides 8 and 16: a
    64x64 input gives 64 + 16 anchors. Output ``(B, 4 + num_classes, A)``:
    boxes (cx, cy, w, h in pixels) then class probabilities.

    Args:
        num_classes: class count.
        width: channels of the first stage (later stages double it, up to 4x).
        reg_max: DFL bins per box side.
        psa: add a C2PSA attention block after SPPF (YOLO11).
    """

    def __init__(self, num_classes: int = 4, width: int = 8, reg_max: int = 8, psa: bool = False) -> None:
        super().__init__()
        w1, w2, w4 = width, 2 * width, 4 * width
        self.stem = nn.Sequential(ConvBnAct(3, w1, 3, 2), ConvBnAct(w1, w2, 3, 2), C2f(w2, w2))
        self.p3 = nn.Sequential(ConvBnAct(w2, w4, 3, 2), C2f(w4, w4))
        stage4 = [ConvBnAct(w4, w4, 3, 2), C2f(w4, w4), SPPF(w4, w4)]
        self.p4 = nn.Sequential(*stage4, *([C2PSA(w4)] if psa else []))
        self.up_fuse = C2f(2 * w4, w4, shortcut=False)
        self.down = ConvBnAct(w4, w4, 3, 2)
        self.down_fuse = C2f(2 * w4, w4, shortcut=False)
        self.head = DetectHead((w4, w4), (8.0, 16.0), num_classes, reg_max, hidden=w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        n3 = self.up_fuse(torch.cat((F.interpolate(p4, scale_factor=2.0, mode="nearest"), p3), 1))
        n4 = self.down_fuse(torch.cat((self.down(n3), p4), 1))
        return self.head([n3, n4])


@ZOO.register(name="yolo11_attn_tiny")
class Yolo11AttnTiny(YoloV8Tiny):
    """YOLO11 at toy size: :class:`YoloV8Tiny` with a C2PSA block after SPPF.

    Reproduces YOLO11's position-sensitive attention: a 1x1 conv producing
    q, k, v, ``q^T k`` matmul, softmax, ``v attn^T`` matmul and a depthwise
    conv positional encoding, inside a split / concat block with a 1x1 FFN.
    """

    def __init__(self, num_classes: int = 4, width: int = 8, reg_max: int = 8) -> None:
        super().__init__(num_classes, width, reg_max, psa=True)
