"""COCO-format detection data: find or generate a root, validate it, letterbox images, collate.

One code path serves COCO 2017 and the generated ``shapes`` set: both are the
COCO layout, read through pycocotools::

    ROOT/annotations/instances_{split}.json      split = train2017/val2017 (COCO), train/val (shapes)
    ROOT/{split}/<file_name>                     file_name as written in the json

Annotations are checked once, when a split is opened, so a bad box fails at
once with its annotation and image named, not hours into training; images are
checked when they are read. Images are letterboxed: the long side resized to
``image_size`` (bilinear, aspect kept) and the image placed in the *centre* of
a grey (114, 114, 114) square canvas. A target carries ``ratio`` and ``pad``
so that predictions map back to original pixels: ``orig = (box - pad) / ratio``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from quantbench.errors import CorruptDataError, DataNotFoundError
from quantbench.registry import Registry
from quantbench.training import data as shared
from tasks.detection.shapes import write_shapes_coco

__all__ = [
    "GENERATORS",
    "PAD_VALUE",
    "CocoDetection",
    "DataNotFoundError",
    "DetectionDataError",
    "annotation_path",
    "collate",
    "ensure_coco",
    "letterbox",
    "make_loader",
    "resolve_root",
    "write_shapes_coco",
]

log = logging.getLogger(__name__)

PAD_VALUE = 114
"""Grey of the letterbox canvas (YOLO's), as 0..255."""

#: ``data.generate`` name -> writer of a COCO-format set.
GENERATORS: Registry[Any] = Registry("data generator", hint="(data.generate)")
GENERATORS.add("shapes", write_shapes_coco)
_REQUIRED_KEYS = ("images", "annotations", "categories")


class DetectionDataError(CorruptDataError):
    """The data set is there but its content is wrong; the one-line message names the culprit and the fix."""


def annotation_path(root: str | os.PathLike, split: str) -> Path:
    """``root/annotations/instances_{split}.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def resolve_root(root: str | os.PathLike | None, root_env: str | None = "COCO_ROOT") -> Path | None:
    """``root``, else the ``root_env`` environment variable, else ``None``."""
    root = root or (os.environ.get(root_env) if root_env else None)
    return Path(root).expanduser() if root else None


def _missing(task: str, root: Path | None, split: str, root_env: str | None, generate: str | None) -> str:
    where = f"{annotation_path(root, split)} is missing" if root is not None else "no data.root given"
    env = f" or {root_env}=PATH" if root_env else ""
    if generate and root is not None:
        return (f"{task} data not found: {where} and {root} is not empty, so the {generate} set was not "
                f"generated there; remove {root} to regenerate it, or set data.root to another folder")
    other = "" if generate else " (or use TASK=shapes)"
    return (f"{task} data not found: {where}; put a COCO-layout set there "
            f"(annotations/instances_{split}.json and {split}/), e.g. COCO 2017, and set "
            f"data.root=PATH{env}{other}")


def ensure_coco(
    root: str | os.PathLike | None,
    splits: Sequence[str] = ("train2017", "val2017"),
    *,
    task: str = "coco",
    generate: str | None = None,
    root_env: str | None = "COCO_ROOT",
    **generate_kwargs: Any,
) -> Path:
    """Return a COCO-layout root holding the json of every split, generating it if told how.

    A set is generated (``generate="shapes"``) only when the root does not
    exist or is an empty folder: never into someone's half-filled folder. The
    generator writes a temporary sibling and renames it into place, so
    concurrent sweep jobs race safely: the loser finds the winner's set.

    Args:
        root: The root (``data.root``); ``None`` reads ``root_env``.
        splits: Split names whose ``annotations/instances_{split}.json`` must exist.
        task: Task name for the messages.
        generate: Name in :data:`GENERATORS`, or ``None`` for user-supplied data.
        root_env: Environment variable that supplies ``root`` when it is unset.
        **generate_kwargs: Passed to the generator (``seed``, ``n_train``, ...).

    Raises:
        DataNotFoundError: A split's json is missing and the set cannot be generated.
    """
    path = resolve_root(root, root_env)
    if generate is not None:
        GENERATORS.get(generate)
    fresh = path is not None and (not path.exists() or (path.is_dir() and not any(path.iterdir())))
    if generate and fresh:
        log.info("writing the %s detection set to %s", generate, path)
        try:
            GENERATORS.get(generate)(path, **generate_kwargs)
        except OSError:
            if not all(annotation_path(path, s).is_file() for s in splits):  # nobody else won the race
                raise
    for split in splits:
        if path is None or not annotation_path(path, split).is_file():
            raise DataNotFoundError(_missing(task, path, split, root_env, generate))
    return path


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataNotFoundError(f"coco annotations not found: {path} is missing; point data.root at a "
                                "COCO-layout root (annotations/instances_<split>.json)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DetectionDataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                                 f"{exc.colno}); restore or regenerate the file") from None
    except UnicodeDecodeError as exc:
        raise DetectionDataError(f"{path} is not UTF-8 JSON ({_one_line(exc)}); restore or regenerate "
                                 "the file") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DetectionDataError(f"{path} is not a COCO instances file: no list under "
                                 f"{', '.join(map(repr, missing))}; restore or regenerate the file")
    return data


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_images(path: Path, images: list) -> dict[int, tuple[float, float]]:
    sizes: dict[int, tuple[float, float]] = {}
    for i, img in enumerate(images):
        ok = (isinstance(img, dict) and isinstance(img.get("id"), int)
              and isinstance(img.get("file_name"), str))
        if not ok or not all(_is_number(img.get(k)) and img[k] > 0 for k in ("width", "height")):
            ident = img.get("id", f"#{i}") if isinstance(img, dict) else f"#{i}"
            raise DetectionDataError(f"{path}: image {ident} needs an int id, a file_name and positive "
                                     "width/height; fix the entry")
        if img["id"] in sizes:
            raise DetectionDataError(f"{path}: image id {img['id']} appears twice; make the ids unique")
        sizes[img["id"]] = (img["width"], img["height"])
    return sizes


def _check_categories(path: Path, categories: list) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or cat["id"] in names:
            ident = cat.get("id", f"#{i}") if isinstance(cat, dict) else f"#{i}"
            raise DetectionDataError(f"{path}: category {ident} needs a unique int id; fix the categories "
                                     "list")
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    if not names:
        raise DetectionDataError(f"{path} has no categories; a detection set needs at least one")
    return names


def _check_annotation(path: Path, ann: Any, sizes: dict, names: dict) -> bool:
    """Raise on a bad annotation; True when its box is degenerate (zero width or height)."""
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
        raise DetectionDataError(f"{path}: an annotation has no int id ({_one_line(ann)[:80]}); fix the "
                                 "entry")
    aid, iid, bbox = ann["id"], ann.get("image_id"), ann.get("bbox")
    where = f"{path}: annotation {aid} (image {iid})"
    if iid not in sizes:
        raise DetectionDataError(f"{where} refers to an image id that is not in 'images'; fix or drop the "
                                 "annotation")
    if ann.get("category_id") not in names:
        raise DetectionDataError(f"{where} has category_id {ann.get('category_id')!r}, not in 'categories' "
                                 f"({sorted(names)}); fix or drop the annotation")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DetectionDataError(f"{where} has bbox {bbox!r}, not 4 finite numbers [x, y, w, h]; fix or "
                                 "drop it")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise DetectionDataError(f"{where} has bbox {bbox} with a negative width or height; fix or drop it")
    width, height = sizes[iid]
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise DetectionDataError(f"{where} has bbox {bbox} outside its {width}x{height} image by more than "
                                 "1 px; fix or drop it")
    return w == 0 or h == 0


def _validate(path: Path, data: dict) -> dict[int, str]:
    """Check every image entry, category and annotation; the category names by id."""
    sizes = _check_images(path, data["images"])
    names = _check_categories(path, data["categories"])
    degenerate = [a["id"] for a in data["annotations"] if _check_annotation(path, a, sizes, names)]
    if degenerate:
        log.warning("%s: %d annotation(s) with a zero-width or zero-height box (first: id %d) are kept for "
                    "COCOeval but never used as training targets", path, len(degenerate), degenerate[0])
    return names


def _coco(data: dict):
    """A ``pycocotools.coco.COCO`` index over an already-parsed dict (its progress prints silenced)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def letterbox(
    image: Image.Image,
    boxes: np.ndarray,
    size: int,
    *,
    scale: float = 1.0,
    place: tuple[float, float] | None = None,
    flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray, float, tuple[float, float]]:
    """Resize ``image`` (long side to ``size * scale``), paste it on a grey ``size`` square, move ``boxes``.

    Args:
        image: RGB image.
        boxes: ``[n, 4]`` x1y1x2y2 in original pixels.
        size: Side of the square canvas.
        scale: Fraction of ``size`` the long side is resized to (1 for evaluation).
        place: Where the image sits in the free space, as fractions (0 = left/top,
            1 = right/bottom); ``None`` centres it.
        flip: Mirror the image (and the boxes) left-right.

    Returns:
        ``(image [3, size, size] float32 in [0, 1], boxes [n, 4] float32 in canvas
        pixels, ratio, (left, top))`` with ``canvas = original * ratio + (left, top)``
        for an unflipped image. Sizes are rounded to whole pixels, so image content
        and boxes agree to half a pixel.
    """
    width, height = image.size
    ratio = size * scale / max(width, height)
    new_w, new_h = min(size, max(1, round(width * ratio))), min(size, max(1, round(height * ratio)))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    fx, fy = (0.5, 0.5) if place is None else place
    left = (size - new_w) // 2 if place is None else round(fx * (size - new_w))
    top = (size - new_h) // 2 if place is None else round(fy * (size - new_h))
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[top:top + new_h, left:left + new_w] = np.asarray(image)
    out = np.asarray(boxes, np.float32).reshape(-1, 4) * ratio
    if flip:
        out[:, [0, 2]] = new_w - out[:, [2, 0]]
    out += np.array([left, top, left, top], np.float32)
    tensor = torch.from_numpy(canvas).permute(2, 0, 1).contiguous().float().div_(255.0)
    return tensor, out, ratio, (float(left), float(top))


class CocoDetection(Dataset):
    """One split of a COCO-layout root, letterboxed to ``image_size``; items are ``(image, target)``.

    Category ids are mapped to contiguous labels ``0..C-1`` in ascending id
    order (``cat_ids[label]`` is the id, ``class_names[label]`` its name).
    ``iscrowd=1`` and zero-size boxes stay in :attr:`coco` (COCOeval needs
    them) but are never training targets; images without annotations give
    empty targets. The target dict holds ``boxes`` (float32 ``[n, 4]``
    x1y1x2y2 in canvas pixels), ``labels`` (int64 ``[n]``), ``image_id``,
    ``ratio``, ``pad`` (left, top) and ``orig_size`` (h, w).

    Args:
        root: The COCO-layout root.
        split: ``train2017``, ``val2017``, ``train``, ``val``, ...
        image_size: Side of the square letterbox canvas.
        augment: Training augmentation: horizontal flip and scale jitter (the long
            side resized to ``image_size * U(scale_min, 1)``, placed at a random
            offset), drawn from torch's global RNG (the task's training loader seeds
            it per sample and epoch with :class:`~quantbench.training.distributed.EpochSeeded`).
        scale_min: Lower end of the scale jitter.
        flip_p: Probability of the horizontal flip.
        min_box_size: Boxes narrower or lower than this (canvas pixels) are dropped from the targets.
        fraction: Use a seeded random subset of this share of the images (quick runs).
        max_images: Use at most this many images (a seeded random subset, after ``fraction``).
        seed: Seed of the subset. Subsets keep image id order.

    Raises:
        DataNotFoundError: The split's json is missing.
        DetectionDataError: The json is invalid or an annotation is wrong.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_size: int = 640,
        *,
        augment: bool = False,
        scale_min: float = 0.6,
        flip_p: float = 0.5,
        min_box_size: float = 2.0,
        fraction: float = 1.0,
        max_images: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < scale_min <= 1.0 or not 0.0 < fraction <= 1.0:
            raise ValueError(f"scale_min and fraction must be in (0, 1], got {scale_min} and {fraction}")
        self.root, self.split, self.image_dir = Path(root), split, Path(root) / split
        self.annotation_file = annotation_path(root, split)
        data = _read_json(self.annotation_file)
        names = _validate(self.annotation_file, data)
        self.coco = _coco(data)
        self.cat_ids: list[int] = sorted(names)
        self.class_names: list[str] = [names[c] for c in self.cat_ids]
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds())
        keep = max(1, round(len(ids) * fraction))
        keep = keep if max_images is None else min(keep, max_images)
        if keep < len(ids):
            pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:keep]
            ids = [ids[i] for i in sorted(pick.tolist())]
        self.image_ids: list[int] = ids
        self.image_size, self.augment = image_size, augment
        self.scale_min, self.flip_p, self.min_box_size = scale_min, flip_p, min_box_size

    @property
    def label_to_cat_id(self) -> list[int]:
        """COCO category id of each label (``label_to_cat_id[label]``)."""
        return self.cat_ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def with_augment(self, augment: bool) -> CocoDetection:
        """The same images and COCO index with augmentation switched, without reading the json again.

        Why: training and calibration read the same split, one augmented and
        one not, and parsing COCO's 450 MB train json twice costs seconds and
        memory.
        """
        clone = copy.copy(self)
        clone.augment = augment
        return clone

    def _load(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except FileNotFoundError:
            raise DetectionDataError(f"{path} (image {image_id}) is missing; restore it or drop the image "
                                     f"from {self.annotation_file}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DetectionDataError(f"{path} (image {image_id}) cannot be decoded ({_one_line(exc)}); "
                                     "restore or re-encode it") from None
        if image.size != (info["width"], info["height"]):
            raise DetectionDataError(f"{path} (image {image_id}) is {image.width}x{image.height} but the "
                                     f"json says {info['width']}x{info['height']}; fix the json or the image")
        return image

    def _boxes(self, image_id: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes (x1y1x2y2, clipped to the image) and labels: no crowd, no zero-size box."""
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not anns:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        xywh = np.array([a["bbox"] for a in anns], np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        return boxes, np.array([self.cat_id_to_label[a["category_id"]] for a in anns], np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.image_ids[index]
        image = self._load(image_id)
        boxes, labels = self._boxes(image_id, image.width, image.height)
        scale, place, flip = 1.0, None, False
        if self.augment:
            scale = float(torch.empty(()).uniform_(self.scale_min, 1.0))
            place = (float(torch.rand(())), float(torch.rand(())))
            flip = bool(torch.rand(()) < self.flip_p)
        tensor, boxes, ratio, pad = letterbox(image, boxes, self.image_size, scale=scale, place=place,
                                              flip=flip)
        boxes = np.clip(boxes, 0, self.image_size)
        keep = np.all(boxes[:, 2:] - boxes[:, :2] >= self.min_box_size, axis=1)
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[keep])),
            "labels": torch.from_numpy(labels[keep]),
            "image_id": int(image_id),
            "ratio": ratio,
            "pad": pad,
            "orig_size": (image.height, image.width),
        }
        return tensor, target


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """``[(image, target), ...]`` -> ``(images [B, 3, S, S], [target, ...])``."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                pin_memory: bool = False, shard: bool = False) -> DataLoader:
    """:func:`quantbench.training.data.make_loader` with :func:`collate` (images stacked, targets listed)."""
    return shared.make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                              pin_memory=pin_memory, shard=shard, collate_fn=collate)
