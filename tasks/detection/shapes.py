"""The ``shapes`` detection set: a real COCO-format data set, drawn offline.

Five classes of filled shapes (circle, square, triangle, star, cross) on a
cluttered, noisy gradient background, written as PNGs plus the two COCO jsons
(``annotations/instances_{train,val}.json``). It exists so that the detection
task runs end to end on a fresh machine through exactly the loader and the
COCOeval code that COCO 2017 uses, and it is built to exercise what COCO
exercises:

* category ids are not contiguous (1, 3, 5, 7, 9), so the id -> label mapping
  is tested for real;
* image sizes vary, so the letterbox matters; some images hold no object;
* objects range from about 16 px to 60% of the short side (COCO's small,
  medium and large areas) and may overlap, but every ground-truth object stays
  at least 60% visible;
* clutter (thin lines, arcs, small blobs) is there to be ignored.

Each shape is rasterised at 4x and averaged down (anti-aliased edges), and its
box is the tight box of that 4x mask: exact to a quarter pixel, never the
nominal parameters. Every image draws from its own generator seeded by
``(seed, split, index)``, so a set is a pure function of its arguments.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "SPLITS", "ShapesSpec", "draw_image", "write_shapes_coco"]

log = logging.getLogger(__name__)

CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "circle"), (3, "square"), (5, "triangle"), (7, "star"), (9, "cross"),
)
"""``(category id, name)``: ids deliberately non-contiguous, as in COCO."""

SPLITS: tuple[str, str] = ("train", "val")
_SUPERSAMPLE = 4
_MAX_TILT = math.radians(25.0)  # squares, crosses: beyond this a square reads as a diamond, a cross as an X


@dataclass(frozen=True)
class ShapesSpec:
    """How one image is drawn.

    Attributes:
        min_size: Smallest image side (width and height are drawn independently).
        max_size: Largest image side.
        max_objects: Objects per image are drawn uniformly from 1..max_objects.
        empty_fraction: Share of images without any object.
        min_object: Smallest object extent in pixels (diameter of its enclosing circle).
        max_object_fraction: Largest object extent as a fraction of the short side.
        max_iou: A new object's box overlaps every earlier box by less than this IoU.
        max_covered: At most this share of an object's pixels is hidden by later objects.
        min_contrast: Least RGB distance of an object's colour to the mean colour beneath it.
    """

    min_size: int = 112
    max_size: int = 160
    max_objects: int = 5
    empty_fraction: float = 0.03
    min_object: float = 16.0
    max_object_fraction: float = 0.6
    max_iou: float = 0.3
    max_covered: float = 0.4
    min_contrast: float = 110.0

    def __post_init__(self) -> None:
        if not 2 * self.min_object + 2 <= self.min_size <= self.max_size:
            raise ValueError(f"need 2 * min_object + 2 <= min_size <= max_size, got min_object="
                             f"{self.min_object}, min_size={self.min_size}, max_size={self.max_size}")
        if self.max_objects < 1 or not 0.0 <= self.empty_fraction < 1.0:
            raise ValueError(f"need max_objects >= 1 and 0 <= empty_fraction < 1, got {self.max_objects}, "
                             f"{self.empty_fraction}")


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _outline(name: str, r: float, rng: np.random.Generator) -> np.ndarray | tuple[float, float]:
    """Vertices (k x 2, centred at 0) of a shape inside a circle of radius ``r``; radii for a circle."""
    if name == "circle":
        aspect = rng.uniform(0.85, 1.15)
        return r * min(1.0, aspect), r * min(1.0, 1.0 / aspect)
    if name == "square":
        angle = rng.uniform(-_MAX_TILT, _MAX_TILT)
        half = r / (abs(math.cos(angle)) + abs(math.sin(angle)))
        return _rotate(half * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), angle)
    if name == "triangle":
        theta = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3
        return r * np.stack([np.cos(theta), np.sin(theta)], 1)
    if name == "star":
        theta = rng.uniform(0, 2 * math.pi) + np.arange(10) * math.pi / 5
        radius = r * np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    if name == "cross":
        arm = r / math.hypot(1.0, 0.32)
        t = 0.32 * arm
        unit = [(-t, -arm), (t, -arm), (t, -t), (arm, -t), (arm, t), (t, t),
                (t, arm), (-t, arm), (-t, t), (-arm, t), (-arm, -t), (-t, -t)]
        return _rotate(np.array(unit, float), rng.uniform(-_MAX_TILT, _MAX_TILT))
    raise ValueError(f"unknown shape {name!r}; known: {[n for _, n in CATEGORIES]}")


def _rasterise(name: str, extent: float, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, ...]]:
    """Coverage (alpha in [0, 1], P x P) of one shape and its tight box ``(x0, y0, x1, y1)`` in patch pixels.

    The patch has a one-pixel margin around the shape's enclosing circle, whose
    centre is jittered by up to half a pixel so that edges fall at sub-pixel
    positions.
    """
    f = _SUPERSAMPLE
    side = int(math.ceil(extent)) + 2
    centre = side * f / 2 + rng.uniform(-f / 2, f / 2, 2)
    mask = Image.new("L", (side * f, side * f), 0)
    draw = ImageDraw.Draw(mask)
    shape = _outline(name, extent * f / 2, rng)
    if isinstance(shape, tuple):
        rx, ry = shape
        draw.ellipse([centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry], fill=255)
    else:
        draw.polygon([tuple(p) for p in (shape + centre)], fill=255)
    inside = np.asarray(mask) > 127
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    box = (cols[0] / f, rows[0] / f, (cols[-1] + 1) / f, (rows[-1] + 1) / f)
    return inside.reshape(side, f, side, f).mean(axis=(1, 3)), box


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random colour with a linear gradient in a random direction."""
    start = rng.uniform(0, 255, 3)
    end = np.clip(start + rng.normal(0, 50, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    pixels = start + (end - start) * ramp[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _random_line(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    length, angle = rng.uniform(8, 0.5 * max(width, height)), rng.uniform(0, 2 * math.pi)
    end = (x + length * math.cos(angle), y + length * math.sin(angle))
    draw.line([(x, y), end], fill=_colour(rng), width=1)


def _clutter(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Thin lines, arcs and blobs smaller than any object: things the detector must ignore."""
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 5)):
        _random_line(draw, rng, width, height)
    for _ in range(rng.integers(0, 3)):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 30)
        start, span = rng.uniform(0, 360), rng.uniform(40, 200)
        draw.arc([x - r, y - r, x + r, y + r], start, start + span, fill=_colour(rng), width=1)
    for _ in range(rng.integers(0, 5)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(1.0, 2.5, 2)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_colour(rng))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class _Layout:
    """Which object owns each visible pixel, so that a new object never hides too much of an old one."""

    def __init__(self, width: int, height: int, spec: ShapesSpec) -> None:
        self.owner = np.full((height, width), -1, np.int32)
        self.boxes: list[tuple[float, ...]] = []
        self.total: list[int] = []
        self.visible: list[int] = []
        self.spec = spec

    def fits(self, box: tuple[float, ...], pixels: np.ndarray, x: int, y: int) -> bool:
        if any(_iou(box, old) >= self.spec.max_iou for old in self.boxes):
            return False
        under = self.owner[y:y + pixels.shape[0], x:x + pixels.shape[1]][pixels]
        hidden = np.bincount(under[under >= 0], minlength=len(self.boxes))
        return all(v - h >= (1.0 - self.spec.max_covered) * t
                   for v, h, t in zip(self.visible, hidden, self.total))

    def add(self, box: tuple[float, ...], pixels: np.ndarray, x: int, y: int) -> None:
        region = self.owner[y:y + pixels.shape[0], x:x + pixels.shape[1]]
        hidden = np.bincount(region[pixels][region[pixels] >= 0], minlength=len(self.boxes))
        self.visible = [v - int(h) for v, h in zip(self.visible, hidden)]
        region[pixels] = len(self.boxes)
        self.boxes.append(box)
        self.total.append(int(pixels.sum()))
        self.visible.append(int(pixels.sum()))


def _contrasting_colour(rng: np.random.Generator, beneath: np.ndarray, least: float) -> tuple[int, ...]:
    """A random colour at least ``least`` (RGB distance) from ``beneath``; black or white if none is found."""
    for _ in range(32):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - beneath) >= least:
            return tuple(int(v) for v in colour)
    return tuple(int(v) for v in np.where(beneath > 127, 0, 255))


def _place(canvas: Image.Image, layout: _Layout, rng: np.random.Generator, spec: ShapesSpec) -> dict | None:
    """Draw one object where it keeps the overlap rules (up to 25 tries); its annotation, or None."""
    width, height = canvas.size
    category_id, name = CATEGORIES[rng.integers(len(CATEGORIES))]
    largest = max(spec.min_object, spec.max_object_fraction * min(width, height))
    for _ in range(25):
        extent = math.exp(rng.uniform(math.log(spec.min_object), math.log(largest)))
        alpha, (x0, y0, x1, y1) = _rasterise(name, extent, rng)
        side = alpha.shape[0]
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box, pixels = (x + x0, y + y0, x + x1, y + y1), alpha >= 0.5
        if not layout.fits(box, pixels, x, y):
            continue
        beneath = np.asarray(canvas.crop((x, y, x + side, y + side)), np.float64)[pixels].mean(0)
        colour = _contrasting_colour(rng, beneath, spec.min_contrast)
        coverage = Image.fromarray(np.round(alpha * 255).astype(np.uint8))
        canvas.paste(colour, (x, y, x + side, y + side), coverage)
        layout.add(box, pixels, x, y)
        bbox = [float(box[0]), float(box[1]), float(x1 - x0), float(y1 - y0)]
        return {"category_id": category_id, "bbox": bbox, "area": round(float(alpha.sum()), 2), "iscrowd": 0}
    return None


def draw_image(rng: np.random.Generator, spec: ShapesSpec) -> tuple[Image.Image, list[dict]]:
    """One RGB image and its annotations (``category_id``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd``)."""
    width, height = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, 2))
    canvas = _background(rng, width, height)
    _clutter(canvas, rng)
    wanted = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    layout = _Layout(width, height, spec)
    annotations = [a for a in (_place(canvas, layout, rng, spec) for _ in range(wanted)) if a is not None]
    if rng.random() < 0.25:  # now and then a stray line crosses the objects too
        _random_line(ImageDraw.Draw(canvas), rng, width, height)
    pixels = np.asarray(canvas, np.float32)
    pixels = pixels + rng.uniform(1.5, 5.0) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "RGB"), annotations


def _write_split(root: Path, split: str, count: int, first_id: tuple[int, int], seed: int,
                 spec: ShapesSpec) -> dict:
    """Write ``count`` PNGs under ``root/split``; the split's COCO dict (first image and annotation ids)."""
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, objects = draw_image(rng, spec)
        image_id = first_id[0] + index
        file_name = f"{image_id:06d}.png"
        image.save(folder / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": first_id[1] + len(annotations), "image_id": image_id, **obj})
    return {
        "info": {"description": f"quantbench shapes ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES],
    }


def write_shapes_coco(
    out: str | os.PathLike,
    *,
    n_train: int = 2000,
    n_val: int = 300,
    min_size: int = 112,
    max_size: int = 160,
    seed: int = 0,
    size: int | None = None,
    max_objects: int = 5,
    empty_fraction: float = 0.03,
) -> Path:
    """Write the shapes set in the COCO layout (``out/{train,val}/``, ``out/annotations/instances_*.json``).

    Image and annotation ids are unique across splits (train both from 1; val
    images from 1_000_001, val annotations from 10_000_001). Everything is written to a temporary sibling and
    renamed into place, jsons last, so an interrupted write never leaves a set
    that a later run would take for a finished one.

    Args:
        out: Root of the set; must not exist, or be an empty folder.
        n_train: Images in ``train``.
        n_val: Images in ``val``.
        min_size: Smallest image side.
        max_size: Largest image side.
        seed: Seed of every image (same seed, same bytes).
        size: Shorthand for ``quantbench data shapes --size``: ``max_size=size``,
            ``min_size=round(0.7 * size)``.
        max_objects: Objects per non-empty image are 1..max_objects.
        empty_fraction: Share of images without objects.

    Returns:
        ``out`` as a Path.
    """
    if size is not None:
        min_size, max_size = round(0.7 * size), size
    spec = ShapesSpec(min_size=min_size, max_size=max_size, max_objects=max_objects,
                      empty_fraction=empty_fraction)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not empty; remove it or choose another --out", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        sets = {split: _write_split(tmp, split, n, first, seed, spec)
                for split, n, first in (("train", n_train, (1, 1)), ("val", n_val, (1_000_001, 10_000_001)))}
        (tmp / "annotations").mkdir()
        for split, data in sets.items():
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    objects = sum(len(d["annotations"]) for d in sets.values())
    empty = sum(len(d["images"]) - len({a["image_id"] for a in d["annotations"]}) for d in sets.values())
    # DEBUG: `quantbench data` prints its own line, and a run logs that it is writing the set
    log.debug("wrote %d train and %d val shapes images (%d-%d px, %d objects, %d images without any) to %s",
             n_train, n_val, min_size, max_size, objects, empty, out)
    return out
