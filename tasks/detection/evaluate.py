"""COCO box mAP through pycocotools' COCOeval: detections back to original pixels, then score.

The metric is the official one, not a re-implementation: predictions in
letterboxed canvas pixels are mapped back to the original image with the
target's ``ratio`` and ``pad`` (``orig = (box - pad) / ratio``), clipped to the
image, written as COCO results (``[x, y, w, h]``, category ids) and scored by
``COCOeval(iouType="bbox")``. Following torchvision's detection references,
evaluation goes update (per batch) -> accumulate -> summarize; one metric code
path serves the float model, the fake-quant graph and onnxruntime alike.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CocoEvaluator", "coco_map", "to_coco_detections"]

_ZERO = {"map50_95": 0.0, "map50": 0.0}


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_coco_detections(
    dets: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    label_to_cat_id: Sequence[int] | Mapping[int, int],
) -> list[dict]:
    """COCO result dicts for a batch of per-image detections.

    Args:
        dets: Per image, ``boxes [k, 4]`` x1y1x2y2 in canvas pixels, ``scores [k]``
            and ``labels [k]`` (contiguous labels); tensors or arrays.
        targets: The batch's targets from :class:`~tasks.detection.data.CocoDetection`
            (``image_id``, ``ratio``, ``pad``, ``orig_size``), in the same order.
        label_to_cat_id: COCO category id of each label.

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per box,
        in original image pixels, clipped to the image.
    """
    if len(dets) != len(targets):
        raise ValueError(f"{len(dets)} detection entries for {len(targets)} targets; pass one per image")
    results = []
    for det, target in zip(dets, targets):
        boxes = _numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
        if not len(boxes):
            continue
        scores, labels = _numpy(det["scores"]).reshape(-1), _numpy(det["labels"]).reshape(-1)
        left, top = target["pad"]
        height, width = target["orig_size"]
        boxes = (boxes - [left, top, left, top]) / target["ratio"]
        boxes = np.clip(boxes, 0, [width, height, width, height])
        image_id = int(target["image_id"])
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": int(label_to_cat_id[int(label)]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def coco_map(
    coco_gt, detections: Sequence[Mapping[str, Any]], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """``{"map50_95", "map50"}`` (fractions; COCOeval's ``stats[0]``, ``stats[1]``) over ``image_ids``.

    Only the given images are scored (all of ``coco_gt``'s when ``None``), so a
    seeded subset of val is evaluated against exactly its own ground truth.
    No detections at all score 0.0, and so do images without any ground truth
    (where COCOeval reports -1). COCOeval keeps the 100 best detections per image.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` of the split (``CocoDetection.coco``).
        detections: COCO result dicts, e.g. from :func:`to_coco_detections`.
        image_ids: Images to score.

    Raises:
        ValueError: An image id is not in ``coco_gt``.
    """
    from pycocotools.cocoeval import COCOeval

    known = set(coco_gt.getImgIds())
    ids = sorted(known if image_ids is None else {int(i) for i in image_ids})
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the ground truth; evaluate images of this "
                         "split only")
    wanted = set(ids)
    dets = [dict(d) for d in detections if d["image_id"] in wanted]  # loadRes writes into the dicts
    if not ids or not dets:
        return dict(_ZERO)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map50_95": max(0.0, float(stats[0])), "map50": max(0.0, float(stats[1]))}


class CocoEvaluator:
    """Accumulates a split's detections batch by batch; :meth:`compute` scores the images seen.

    Example::

        evaluator = CocoEvaluator(val_set)
        for images, targets in loader:
            evaluator.update(postprocess(predict(images)), targets)
        metrics = evaluator.compute()   # {"map50_95": ..., "map50": ...}

    Args:
        dataset: A :class:`~tasks.detection.data.CocoDetection` split (anything with
            its ``coco`` ground truth and ``label_to_cat_id``).
    """

    def __init__(self, dataset) -> None:
        self.coco_gt = dataset.coco
        self.label_to_cat_id = dataset.label_to_cat_id
        self.reset()

    def reset(self) -> None:
        self.detections: list[dict] = []
        self.image_ids: set[int] = set()

    def update(self, dets: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: per-image detections in canvas pixels and the batch's targets."""
        self.detections += to_coco_detections(dets, targets, self.label_to_cat_id)
        self.image_ids.update(int(t["image_id"]) for t in targets)

    def compute(self) -> dict[str, float]:
        """mAP over every image passed to :meth:`update` (images without detections count as misses)."""
        if not self.image_ids:
            return dict(_ZERO)
        return coco_map(self.coco_gt, self.detections, self.image_ids)
