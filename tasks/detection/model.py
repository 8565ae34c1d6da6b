"""A YOLO-NAS-style detector, built to be quantized whole (head included).

The family follows the shape of YOLO-NAS (Deci, 2023):

* a backbone of QARepVGG blocks (Chu et al., "Make RepVGG Greater Again",
  arXiv 2212.01593) in CSP-style stages, ending in an SPPF block;
* a PAN neck (top-down with nearest upsample + concat, then bottom-up with
  strided convs + concat);
* decoupled anchor-free heads per level (strides 8, 16, 32) whose box branch
  predicts a distribution over ``reg_max + 1`` bins per side (distribution
  focal loss, Li et al., arXiv 2006.04388).

Every activation is ReLU and every op is conv, add, concat, max pool, nearest
upsample or a reshape, so the whole graph maps onto integer kernels. The
network outputs raw tensors only: class logits ``[B, C, N]`` and box
distributions ``[B, 4 * (reg_max + 1), N]`` over the ``N`` anchor points of
all levels. Decoding, sigmoid and NMS run outside the graph
(:mod:`tasks.detection.postprocess`).

Train in the multi-branch form, then call :meth:`YoloNASLike.reparameterize`
before capture: each QARepVGG block becomes one 3x3 conv + ReLU (the reference
YOLO-NAS recipe does the same before quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.registry import Registry, UnknownNameError, close_matches
from quantbench.training.checkpoint import load_weights

__all__ = [
    "DETECTORS",
    "SIZES",
    "check_name",
    "ConvBNReLU",
    "CSPStage",
    "DEFAULT_REG_MAX",
    "DetectorSize",
    "QARepVGGBlock",
    "YoloNASLike",
    "build_detector",
]


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU; the engine fuses it into one integer conv."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv(x))`` as one conv: per-output-channel weight scale and a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


class QARepVGGBlock(nn.Module):
    """Quantization-aware RepVGG block: ``ReLU(BN(BN3(conv3x3 x) + conv1x1 x + alpha * x))``.

    Unlike RepVGG, the 1x1 and identity branches carry no BatchNorm and one
    BatchNorm follows the sum; that keeps the merged kernel's weight
    distribution narrow, which is what makes the re-parameterised conv
    quantize well (arXiv 2212.01593). The identity branch exists when the
    block keeps shape (same channels, stride 1); ``alpha`` is its learnable
    weight.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, *, use_alpha: bool = True) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.has_identity = cin == cout and stride == 1
        self.conv3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.alpha = nn.Parameter(torch.ones(())) if self.has_identity and use_alpha else None
        self.post_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        y = self.bn3(self.conv3(x)) + self.conv1(x)
        if self.has_identity:
            y = y + (x if self.alpha is None else self.alpha * x)
        return self.act(self.post_bn(y))

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to the three branches and the post-BN (eval statistics)."""
        kernel, bias = _fold_bn(self.conv3.weight, None, self.bn3)
        kernel = kernel + F.pad(self.conv1.weight, [1, 1, 1, 1])
        if self.has_identity:
            eye = torch.zeros_like(kernel)
            idx = torch.arange(self.cout)
            eye[idx, idx, 1, 1] = 1.0 if self.alpha is None else float(self.alpha)
            kernel = kernel + eye
        return _fold_bn(kernel, bias, self.post_bn)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one conv with bias (irreversible; eval statistics are used)."""
        if self.fused is not None:
            return
        kernel, bias = self.fused_kernel()
        fused = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, bias=True).to(kernel.device)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.fused = fused
        for name in ("conv3", "bn3", "conv1", "post_bn"):
            delattr(self, name)
        self.alpha = None


class RepBottleneck(nn.Module):
    """Two QARepVGG blocks with a residual add (the unit inside a CSP stage)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = QARepVGGBlock(channels, channels)
        self.block2 = QARepVGGBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.block1(x))


class CSPStage(nn.Module):
    """Cross-stage-partial stage: half the channels go through the bottlenecks, half bypass, then concat + 1x1."""

    def __init__(self, cin: int, cout: int, depth: int, expansion: float = 0.5) -> None:
        super().__init__()
        hidden = max(8, int(cout * expansion))
        self.main = ConvBNReLU(cin, hidden)
        self.bypass = ConvBNReLU(cin, hidden)
        self.blocks = nn.Sequential(*(RepBottleneck(hidden) for _ in range(depth)))
        self.merge = ConvBNReLU(2 * hidden, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.blocks(self.main(x)), self.bypass(x)], dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained 5x5 max pools, concatenated."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        hidden = cin // 2
        self.reduce = ConvBNReLU(cin, hidden)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.merge = ConvBNReLU(4 * hidden, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.reduce(x)
        b = self.pool(a)
        c = self.pool(b)
        return self.merge(torch.cat([a, b, c, self.pool(c)], dim=1))


class Backbone(nn.Module):
    """Stem + four stages (stride 4, 8, 16, 32); returns the stride 8, 16, 32 features."""

    def __init__(self, channels: tuple[int, ...], depths: tuple[int, ...], stem: int) -> None:
        super().__init__()
        self.stem = QARepVGGBlock(3, stem, stride=2)
        stages, cin = [], stem
        for i, (cout, depth) in enumerate(zip(channels, depths)):
            layers = [QARepVGGBlock(cin, cout, stride=2), CSPStage(cout, cout, depth)]
            if i == len(channels) - 1:
                layers.append(SPPF(cout, cout))
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[1:]


class PAN(nn.Module):
    """Path-aggregation neck over (C3, C4, C5): top-down upsample + concat, then bottom-up downsample + concat."""

    def __init__(self, cin: tuple[int, int, int], cout: tuple[int, int, int], depth: int) -> None:
        super().__init__()
        c3, c4, c5 = cin
        n3, n4, n5 = cout
        self.reduce5 = ConvBNReLU(c5, n4)
        self.td4 = CSPStage(n4 + c4, n4, depth)
        self.reduce4 = ConvBNReLU(n4, n3)
        self.td3 = CSPStage(n3 + c3, n3, depth)
        self.down3 = ConvBNReLU(n3, n3, 3, 2)
        self.bu4 = CSPStage(n3 + n3, n4, depth)
        self.down4 = ConvBNReLU(n4, n4, 3, 2)
        self.bu5 = CSPStage(n4 + n4, n5, depth)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = feats
        p5 = self.reduce5(c5)
        p4 = self.reduce4(self.td4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), c4], 1)))
        out3 = self.td3(torch.cat([F.interpolate(p4, scale_factor=2.0, mode="nearest"), c3], 1))
        out4 = self.bu4(torch.cat([self.down3(out3), p4], 1))
        out5 = self.bu5(torch.cat([self.down4(out4), p5], 1))
        return [out3, out4, out5]


class DecoupledHead(nn.Module):
    """One level's head: a shared 1x1 stem, then separate class and box-distribution branches."""

    def __init__(self, cin: int, width: int, num_classes: int, reg_max: int, prior: float = 0.01) -> None:
        super().__init__()
        self.stem = ConvBNReLU(cin, width)
        self.cls_conv = ConvBNReLU(width, width, 3)
        self.reg_conv = ConvBNReLU(width, width, 3)
        self.cls_pred = nn.Conv2d(width, num_classes, 1)
        self.reg_pred = nn.Conv2d(width, 4 * (reg_max + 1), 1)
        nn.init.zeros_(self.reg_pred.weight)
        nn.init.zeros_(self.reg_pred.bias)
        nn.init.normal_(self.cls_pred.weight, std=0.01)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior) / prior))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        return self.cls_pred(self.cls_conv(x)), self.reg_pred(self.reg_conv(x))


@dataclass(frozen=True)
class DetectorSize:
    """Width/depth multipliers applied to the base channels (64, 128, 256, 512) and depths (2, 3, 3, 2)."""

    width: float
    depth: float


#: The family: ``nano`` and ``small`` (YOLO-NAS ships S/M/L; at our image sizes nano is the workhorse).
SIZES: dict[str, DetectorSize] = {
    "nano": DetectorSize(width=0.25, depth=0.34),
    "small": DetectorSize(width=0.5, depth=0.67),
    "test": DetectorSize(width=0.125, depth=0.34),  # a few thousand parameters, for unit tests
}

BASE_CHANNELS = (64, 128, 256, 512)
DEFAULT_REG_MAX = 8
BASE_DEPTHS = (2, 3, 3, 2)


def _ch(c: int, mult: float) -> int:
    return max(8, int(round(c * mult / 8)) * 8)


class YoloNASLike(nn.Module):
    """The detector. ``forward(x) -> (cls_logits [B, C, N], box_dist [B, 4 * (reg_max + 1), N])``.

    Args:
        num_classes: Object classes.
        size: A key of :data:`SIZES` (``nano``, ``small``) or a :class:`DetectorSize`.
        reg_max: Box sides are predicted as distributions over ``0..reg_max``
            strides (YOLO-NAS uses 16 at 640 px; 8 covers objects up to 16
            strides wide, enough at small input sizes).
        strides: Output strides of the three levels (fixed by the architecture).
    """

    strides = (8, 16, 32)

    def __init__(self, num_classes: int, size: str | DetectorSize = "nano", reg_max: int = DEFAULT_REG_MAX) -> None:
        super().__init__()
        mult = SIZES[size] if isinstance(size, str) else size
        if isinstance(size, str) and size not in SIZES:
            raise ValueError(f"unknown detector size {size!r}; known: {sorted(SIZES)}")
        channels = tuple(_ch(c, mult.width) for c in BASE_CHANNELS)
        depths = tuple(max(1, round(d * mult.depth)) for d in BASE_DEPTHS)
        neck = (channels[1], channels[2], channels[3])
        self.num_classes, self.reg_max = num_classes, reg_max
        self.size = size if isinstance(size, str) else "custom"
        self.backbone = Backbone(channels, depths, stem=max(8, channels[0] // 2))
        self.neck = PAN((channels[1], channels[2], channels[3]), neck, depth=depths[-1])
        self.heads = nn.ModuleList(DecoupledHead(c, c, num_classes, reg_max) for c in neck)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, reg = [], []
        for feat, head in zip(self.neck(self.backbone(x)), self.heads):
            c, r = head(feat)
            cls.append(c.flatten(2))
            reg.append(r.flatten(2))
        return torch.cat(cls, 2), torch.cat(reg, 2)

    @torch.no_grad()
    def reparameterize(self) -> YoloNASLike:
        """Merge every QARepVGG block into a single conv (call in eval mode, before capture); returns self."""
        for module in self.modules():
            if isinstance(module, QARepVGGBlock):
                module.reparameterize()
        return self

    @property
    def reparameterized(self) -> bool:
        return all(m.fused is not None for m in self.modules() if isinstance(m, QARepVGGBlock))


#: ``model.name`` -> its key of :data:`SIZES`: ``yolo_nas_nano``, ``yolo_nas_small``, ``yolo_nas_test``.
DETECTORS: Registry[str] = Registry("detection model", hint="(model.name)")
for _size in SIZES:
    DETECTORS.add(f"yolo_nas_{_size}", _size)


def check_name(name: str) -> None:
    """Refuse a ``model.name`` that is not in :data:`DETECTORS`, with one line (close matches, the fix).

    Raises:
        UnknownNameError: Not a registered detector.
    """
    if name not in DETECTORS:
        close = close_matches(str(name), DETECTORS.list(), n=1)
        mean = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise UnknownNameError(f"model.name={name!r}: not a detection model; {mean}use one of "
                               f"{', '.join(DETECTORS.list())}, or model=<file> for conf/model/*.yaml")


def build_detector(
    name: str, num_classes: int, checkpoint: str | None = None, *, reparameterize: bool = False, **kwargs
) -> YoloNASLike:
    """A detector of :data:`DETECTORS`; ``checkpoint`` is a local state_dict.

    A checkpoint holds the training (multi-branch) form, as the task's cache
    and ``torch.save(model.state_dict())`` after training write it.

    Raises:
        UnknownNameError: ``name`` is not a registered detector.
        WeightsNotFoundError: ``checkpoint`` does not exist.
        WeightsError: ``checkpoint`` is not a loadable state_dict of this detector.
    """
    check_name(name)
    model = YoloNASLike(num_classes, DETECTORS.get(name), **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, key="model.checkpoint", name=name)
    if reparameterize:
        model.eval().reparameterize()
    return model
