"""Outside-the-graph decoding: anchor points, DFL expectation, sigmoid scores and NMS.

The exported graph ends at raw tensors (class logits and box distributions),
so the same code decodes the float model, the fake-quant GraphModule and an
onnxruntime session. Boxes are x1y1x2y2 in input (letterboxed) pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["Anchors", "NmsConfig", "decode", "dfl_expectation", "make_anchors", "postprocess", "split_outputs"]


@dataclass(frozen=True)
class Anchors:
    """Anchor-point centres ``[N, 2]`` (pixels) and each point's stride ``[N]``, level by level."""

    points: torch.Tensor
    strides: torch.Tensor


def make_anchors(image_size: int | tuple[int, int], strides: Sequence[int], device: Any = "cpu") -> Anchors:
    """Cell centres of every level, in the order the detector flattens them (row-major per level)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    points, stride_list = [], []
    for s in strides:
        ny, nx = -(-h // s), -(-w // s)  # ceil, as a stride-2 conv with padding rounds up
        ys, xs = torch.meshgrid(torch.arange(ny, device=device), torch.arange(nx, device=device), indexing="ij")
        points.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * s)
        stride_list.append(torch.full((ny * nx,), float(s), device=device))
    return Anchors(torch.cat(points), torch.cat(stride_list))


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls [B, C, N], reg [B, 4(R+1), N])`` as float CPU-or-device tensors, whatever predict returned."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise ValueError(
            f"a detector's predict must return (class logits, box distributions), got {type(outputs).__name__}"
            f"{'' if not isinstance(outputs, (tuple, list)) else f' of {len(outputs)}'}"
        )
    cls, reg = (torch.as_tensor(t).float() for t in outputs)
    return cls, reg


def dfl_expectation(reg: torch.Tensor, reg_max: int) -> torch.Tensor:
    """``[B, 4(R+1), N]`` distribution logits -> ``[B, N, 4]`` expected (l, t, r, b) in strides."""
    b, _, n = reg.shape
    prob = reg.reshape(b, 4, reg_max + 1, n).softmax(2)
    proj = torch.arange(reg_max + 1, dtype=prob.dtype, device=prob.device).reshape(1, 1, -1, 1)
    return (prob * proj).sum(2).transpose(1, 2)


def decode(
    cls: torch.Tensor, reg: torch.Tensor, anchors: Anchors, reg_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``[B, N, 4]`` (x1y1x2y2 pixels) and class probabilities ``[B, N, C]``."""
    if cls.shape[2] != anchors.points.shape[0]:
        raise ValueError(
            f"the detector produced {cls.shape[2]} anchor points but the input size gives "
            f"{anchors.points.shape[0]}; is data.image_size the size the model was exported with?"
        )
    dist = dfl_expectation(reg, reg_max) * anchors.strides.reshape(1, -1, 1)
    xy = anchors.points.unsqueeze(0)
    boxes = torch.cat([xy - dist[..., :2], xy + dist[..., 2:]], -1)
    return boxes, cls.sigmoid().transpose(1, 2)


@dataclass(frozen=True)
class NmsConfig:
    """Post-processing thresholds (COCO evaluation settings: low score threshold, 100 detections)."""

    score_threshold: float = 0.001
    iou_threshold: float = 0.65
    pre_nms_top_k: int = 1000
    max_detections: int = 100


def postprocess(
    outputs: Any, anchors: Anchors, reg_max: int, cfg: NmsConfig = NmsConfig()
) -> list[dict[str, torch.Tensor]]:
    """Raw outputs -> per image ``{"boxes", "scores", "labels"}`` after class-wise NMS."""
    from torchvision.ops import batched_nms  # after quantbench's CPU shim (tasks import quantbench first)

    cls, reg = split_outputs(outputs)
    boxes, scores = decode(cls, reg, anchors, reg_max)
    num_classes = scores.shape[2]
    results = []
    for b in range(boxes.shape[0]):
        flat = scores[b].flatten()
        keep = (flat > cfg.score_threshold).nonzero().squeeze(1)
        if keep.numel() > cfg.pre_nms_top_k:
            keep = keep[flat[keep].topk(cfg.pre_nms_top_k).indices]
        anchor_idx, labels = keep // num_classes, keep % num_classes
        bx, sc = boxes[b, anchor_idx], flat[keep]
        kept = batched_nms(bx, sc, labels, cfg.iou_threshold)[: cfg.max_detections]
        results.append({"boxes": bx[kept], "scores": sc[kept], "labels": labels[kept]})
    return results
