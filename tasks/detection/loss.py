"""Detection loss: task-aligned assignment, varifocal classification, GIoU + DFL box regression.

* Assignment (TOOD, Feng et al., arXiv 2108.07755): for every ground-truth
  box, the anchor points whose centre lies inside it are ranked by the
  alignment metric ``t = s^alpha * IoU^beta`` (``s``: the predicted score of
  the box's class, IoU of the predicted box); the top ``k`` are positives.
  A point claimed by several boxes goes to the one it overlaps most. Soft
  targets: ``t`` normalised per box so that its best point gets that box's
  best IoU.
* Classification: varifocal loss (Zhang et al., arXiv 2008.13367) on the soft
  targets, as PP-YOLOE and YOLO-NAS use it: BCE weighted by the target on
  positives and by ``alpha * p^gamma`` on negatives.
* Boxes: GIoU loss (Rezatofighi et al., arXiv 1902.09630) and distribution
  focal loss (Li et al., arXiv 2006.04388) on the positives, both weighted by
  the soft target.

Every term is normalised by the sum of the soft targets, so the loss does not
scale with the batch size or the number of objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tasks.detection.postprocess import Anchors, dfl_expectation

__all__ = ["DetectionLoss", "DetectionObjective", "LossConfig", "TaskAlignedAssigner", "box_iou_pairwise", "giou"]


def _inter_union(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter, area_a + area_b - inter + eps


def box_iou_pairwise(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of boxes that broadcast against each other (x1y1x2y2, last dim 4)."""
    inter, union = _inter_union(a, b, eps)
    return inter / union


def giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Generalized IoU of paired boxes ``[..., 4]`` (x1y1x2y2)."""
    inter, union = _inter_union(a, b, eps)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / (hull + eps)


@dataclass
class Assignment:
    """Per anchor point: foreground mask ``[B, N]``, target boxes ``[B, N, 4]``, soft scores ``[B, N, C]``."""

    fg: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


class TaskAlignedAssigner:
    """TOOD's task-aligned assigner (``top_k`` candidates per box, metric ``s^alpha * IoU^beta``)."""

    def __init__(self, top_k: int = 10, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9) -> None:
        self.top_k, self.alpha, self.beta, self.eps = top_k, alpha, beta, eps

    @torch.no_grad()
    def __call__(
        self,
        scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        points: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_valid: torch.Tensor,
    ) -> Assignment:
        """``scores [B, N, C]`` (probabilities), ``pred_boxes [B, N, 4]``, ``points [N, 2]``,
        ``gt_boxes [B, M, 4]``, ``gt_labels [B, M]``, ``gt_valid [B, M]`` (padding mask)."""
        b, n, c = scores.shape
        m = gt_boxes.shape[1]
        if m == 0:
            return Assignment(
                torch.zeros(b, n, dtype=torch.bool, device=scores.device),
                torch.zeros(b, n, 4, device=scores.device),
                torch.zeros_like(scores),
            )
        # centres inside each box: [B, M, N]
        x, y = points[:, 0].reshape(1, 1, n), points[:, 1].reshape(1, 1, n)
        gx1, gy1, gx2, gy2 = (gt_boxes[..., i : i + 1] for i in range(4))
        inside = torch.minimum(torch.minimum(x - gx1, y - gy1), torch.minimum(gx2 - x, gy2 - y)) > self.eps
        inside &= gt_valid.unsqueeze(-1)
        ious = box_iou_pairwise(gt_boxes.unsqueeze(2), pred_boxes.unsqueeze(1)).clamp(min=0)  # [B, M, N]
        labels = gt_labels.clamp(min=0)
        cls_score = scores.gather(2, labels.unsqueeze(1).expand(b, n, m)).transpose(1, 2)  # [B, M, N]
        metric = cls_score.pow(self.alpha) * ious.pow(self.beta) * inside
        # top-k candidates per box (only among points inside it)
        k = min(self.top_k, n)
        top = metric.topk(k, dim=2).indices
        candidate = torch.zeros_like(inside).scatter_(2, top, True) & inside
        # a point claimed by several boxes goes to the box it overlaps most
        multi = candidate.sum(1, keepdim=True) > 1
        best = F.one_hot((ious * candidate).argmax(1), m).transpose(1, 2).bool()
        positive = torch.where(multi, best & candidate, candidate)
        fg = positive.any(1)  # [B, N]
        owner = positive.float().argmax(1)  # [B, N]
        boxes = gt_boxes.gather(1, owner.unsqueeze(-1).expand(b, n, 4))
        owner_label = labels.gather(1, owner)
        # soft targets: metric normalised per box to the box's best IoU among its positives
        metric = metric * positive
        ious_pos = ious * positive
        norm = metric / (metric.amax(2, keepdim=True) + self.eps) * ious_pos.amax(2, keepdim=True)
        soft = norm.amax(1) * fg  # [B, N]
        target_scores = F.one_hot(owner_label, c).float() * soft.unsqueeze(-1)
        return Assignment(fg, boxes, target_scores)


@dataclass(frozen=True)
class LossConfig:
    """Weights and hyper-parameters (PP-YOLOE / YOLO-NAS defaults: cls 1.0, IoU 2.5, DFL 0.5)."""

    cls_weight: float = 1.0
    iou_weight: float = 2.5
    dfl_weight: float = 0.5
    classification: str = "varifocal"  # or "bce"
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    top_k: int = 10
    align_alpha: float = 1.0
    align_beta: float = 6.0


def varifocal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sum of BCE(logits, target) weighted ``target`` on positives and ``alpha * p^gamma`` on negatives."""
    p = logits.sigmoid().detach()
    positive = (target > 0).float()
    weight = alpha * p.pow(gamma) * (1 - positive) + target * positive
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def dfl_loss(reg_logits: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss per positive: CE towards the two bins around each target distance.

    ``reg_logits [P, 4, R+1]``, ``target [P, 4]`` in strides (clipped below ``reg_max``); returns ``[P]``.
    """
    target = target.clamp(0, reg_max - 0.01)
    left = target.long()
    w_right = target - left
    logp = reg_logits.log_softmax(-1)
    loss = -(logp.gather(-1, left.unsqueeze(-1)).squeeze(-1) * (1 - w_right)
             + logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1) * w_right)
    return loss.mean(-1)


def pad_targets(targets: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``boxes``/``labels`` -> ``[B, M, 4]``, ``[B, M]``, validity mask ``[B, M]``."""
    m = max((len(t["labels"]) for t in targets), default=0)
    b = len(targets)
    boxes = torch.zeros(b, m, 4, device=device)
    labels = torch.full((b, m), -1, dtype=torch.long, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        if k:
            boxes[i, :k] = t["boxes"].to(device, torch.float32)
            labels[i, :k] = t["labels"].to(device)
    return boxes, labels, labels >= 0


class DetectionLoss(nn.Module):
    """``loss(outputs, targets) -> (total, {"cls", "iou", "dfl"})`` for the detector's raw outputs."""

    def __init__(self, anchors: Anchors, reg_max: int, cfg: LossConfig = LossConfig()) -> None:
        super().__init__()
        if cfg.classification not in ("varifocal", "bce"):
            raise ValueError(f"loss.classification must be varifocal or bce, got {cfg.classification!r}")
        self.anchors, self.reg_max, self.cfg = anchors, reg_max, cfg
        self.assigner = TaskAlignedAssigner(cfg.top_k, cfg.align_alpha, cfg.align_beta)

    def forward(
        self, outputs: tuple[torch.Tensor, torch.Tensor], targets: Sequence[dict]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cls, reg = outputs
        b, c, n = cls.shape
        device = cls.device
        points = self.anchors.points.to(device)
        strides = self.anchors.strides.to(device).reshape(1, n, 1)
        cls_logits = cls.transpose(1, 2)  # [B, N, C]
        dist = dfl_expectation(reg, self.reg_max) * strides  # [B, N, 4] pixels
        xy = points.unsqueeze(0)
        pred_boxes = torch.cat([xy - dist[..., :2], xy + dist[..., 2:]], -1)
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, device)
        assigned = self.assigner(cls_logits.detach().sigmoid(), pred_boxes.detach(), points, gt_boxes, gt_labels,
                                 gt_valid)
        norm = assigned.scores.sum().clamp(min=1.0)
        if self.cfg.classification == "varifocal":
            loss_cls = varifocal_loss(cls_logits, assigned.scores, self.cfg.vfl_alpha, self.cfg.vfl_gamma) / norm
        else:
            loss_cls = F.binary_cross_entropy_with_logits(cls_logits, assigned.scores, reduction="sum") / norm
        fg = assigned.fg
        if fg.any():
            weight = assigned.scores.sum(-1)[fg]
            loss_iou = ((1.0 - giou(pred_boxes[fg], assigned.boxes[fg])) * weight).sum() / norm
            stride_fg = strides.expand(b, n, 1)[fg]
            anchor_fg = xy.expand(b, n, 2)[fg]
            box = assigned.boxes[fg]
            ltrb = torch.cat([anchor_fg - box[:, :2], box[:, 2:] - anchor_fg], -1) / stride_fg
            reg_fg = reg.reshape(b, 4, self.reg_max + 1, n).permute(0, 3, 1, 2)[fg]  # [P, 4, R+1]
            loss_dfl = (dfl_loss(reg_fg, ltrb, self.reg_max) * weight).sum() / norm
        else:
            loss_iou = loss_dfl = pred_boxes.sum() * 0.0
        total = self.cfg.cls_weight * loss_cls + self.cfg.iou_weight * loss_iou + self.cfg.dfl_weight * loss_dfl
        parts = {"cls": float(loss_cls.detach()), "iou": float(loss_iou.detach()), "dfl": float(loss_dfl.detach())}
        return total, parts


class DetectionObjective:
    """What the detector gives the training layer's one loop (:func:`quantbench.training.fit`).

    The loss of a batch of ``(images, targets)`` through :class:`DetectionLoss`,
    and its additive sums: the total and each part (classification, IoU, DFL)
    and a batch count, which :meth:`summarize` turns into mean batch losses
    (``train_loss``, ``train_cls``, ``train_iou``, ``train_dfl``).
    """

    PARTS = ("loss", "cls", "iou", "dfl")

    def __init__(self, loss_fn: DetectionLoss) -> None:
        self.loss_fn = loss_fn

    def __call__(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        outputs = net(images.to(device, non_blocking=True))
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        loss, parts = self.loss_fn(outputs, targets)
        return loss, {"loss": float(loss.detach()), **parts, "batches": 1}

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Mean batch losses over the epoch."""
        batches = max(sums.get("batches", 0.0), 1.0)
        return {k: sums.get(k, 0.0) / batches for k in self.PARTS}
