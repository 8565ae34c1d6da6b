"""Detection data layer: the shapes generator, COCO validation, letterbox/augmentation, COCOeval mAP.

The generated set is conftest's ``shapes_tiny_root`` (16 train and 4 val images of 48-64 px)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from quantbench.errors import BadInputError, CorruptDataError, DataError, DataNotFoundError
from tasks.detection.data import (
    PAD_VALUE,
    CocoDetection,
    DetectionDataError,
    annotation_path,
    collate,
    ensure_coco,
    letterbox,
    write_shapes_coco,
)
from tasks.detection.evaluate import CocoEvaluator, coco_map, to_coco_detections
from tasks.detection.shapes import CATEGORIES

GREY = PAD_VALUE / 255.0


def _json(root, split="val") -> dict:
    return json.loads(annotation_path(root, split).read_text())


def _xyxy(bbox) -> np.ndarray:
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h])


def _write_coco(root, images, annotations, categories=({"id": 2, "name": "a"}, {"id": 7, "name": "b"})):
    """A hand-written COCO split ``val`` with solid-colour PNGs for ``images`` (id, w, h)."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for image_id, w, h in images:
        Image.new("RGB", (w, h), (200, 30, 30)).save(root / "val" / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
    data = {"images": entries, "annotations": list(annotations), "categories": list(categories)}
    annotation_path(root, "val").write_text(json.dumps(data))
    return root


def _ann(ann_id, image_id, bbox, category_id=2, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": 0, **extra}


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- the generated set -------------------------------------------------------------------------


def test_shapes_set_is_coco_with_noncontiguous_ids(shapes_tiny_root):
    train, val = _json(shapes_tiny_root, "train"), _json(shapes_tiny_root, "val")
    assert [c["id"] for c in val["categories"]] == [1, 3, 5, 7, 9]
    assert len(train["images"]) == 16 and len(val["images"]) == 4
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    sizes = {i["id"]: (i["width"], i["height"]) for i in train["images"] + val["images"]}
    assert all(48 <= s <= 64 for wh in sizes.values() for s in wh) and len(set(sizes.values())) > 1
    for ann in train["annotations"] + val["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w >= 8 and h >= 8
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    ds = CocoDetection(shapes_tiny_root, "train", image_size=96)
    assert ds.cat_ids == [1, 3, 5, 7, 9] and ds.class_names == [n for _, n in CATEGORIES]
    assert ds.label_to_cat_id == [1, 3, 5, 7, 9] and ds.num_classes == 5
    by_image = {}
    for ann in train["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["category_id"])
    for index in range(len(ds)):
        _, target = ds[index]
        cats = sorted(ds.label_to_cat_id[int(label)] for label in target["labels"])
        assert cats == sorted(by_image.get(target["image_id"], []))


def test_generation_is_deterministic(tmp_path):
    a = write_shapes_coco(tmp_path / "a", seed=3, n_train=3, n_val=2, min_size=40, max_size=48)
    b = write_shapes_coco(tmp_path / "b", seed=3, n_train=3, n_val=2, min_size=40, max_size=48)
    c = write_shapes_coco(tmp_path / "c", seed=4, n_train=3, n_val=2, min_size=40, max_size=48)
    for split in ("train", "val"):
        assert annotation_path(a, split).read_bytes() == annotation_path(b, split).read_bytes()
    assert (a / "val" / "1000001.png").read_bytes() == (b / "val" / "1000001.png").read_bytes()
    assert annotation_path(a, "train").read_bytes() != annotation_path(c, "train").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(FileExistsError):
        write_shapes_coco(a, n_train=1, n_val=1, min_size=40, max_size=48)


# --- letterbox and augmentation ----------------------------------------------------------------


def test_letterbox_maps_boxes_back_to_the_json(shapes_tiny_root):
    val = _json(shapes_tiny_root)
    gt = {a["id"]: a for a in val["annotations"]}
    ds = CocoDetection(shapes_tiny_root, "val", image_size=80)
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.shape == (3, 80, 80) and image.dtype == torch.float32
        assert 0 <= image.min() <= image.max() <= 1
        h, w = target["orig_size"]
        assert math.isclose(target["ratio"], 80 / max(h, w))
        left, top = target["pad"]
        assert left == (80 - round(w * target["ratio"])) // 2
        assert top == (80 - round(h * target["ratio"])) // 2
        if left >= 1:
            assert torch.all(image[:, :, 0] == GREY)  # the pad column is grey
        back = (target["boxes"].numpy() - [left, top, left, top]) / target["ratio"]
        expected = [_xyxy(gt[i]["bbox"]) for i in ds.coco.getAnnIds(imgIds=[target["image_id"]])]
        assert back.shape == (len(expected), 4) and target["labels"].dtype == torch.int64
        np.testing.assert_allclose(back, np.array(expected).reshape(-1, 4), atol=1.0)
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 80, 80) and len(targets) == 2


def _crop(image: torch.Tensor, box) -> torch.Tensor:
    x1, y1, x2, y2 = box
    return image[:, math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)]


def test_flip_moves_the_box_with_its_pixels(shapes_tiny_root):
    flipped = CocoDetection(shapes_tiny_root, "train", image_size=96, augment=True, flip_p=1.0, scale_min=1.0)
    plain = flipped.with_augment(False)
    assert plain.coco is flipped.coco and flipped.augment
    torch.manual_seed(0)
    checked = 0
    for index in range(len(plain)):
        (a, ta), (b, tb) = plain[index], flipped[index]
        assert torch.equal(ta["labels"], tb["labels"])
        for box_a, box_b in zip(ta["boxes"].tolist(), tb["boxes"].tolist()):
            assert torch.equal(_crop(b, box_b), _crop(a, box_a).flip(-1))
            checked += 1
    assert checked > 5


def test_scale_jitter_keeps_boxes_on_the_image(shapes_tiny_root):
    ds = CocoDetection(shapes_tiny_root, "train", image_size=96, augment=True, scale_min=0.5)
    torch.manual_seed(1)
    for index in list(range(len(ds))) * 3:
        image, target = ds[index]
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and torch.all(boxes >= 0) and torch.all(boxes <= 96)
        assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 2.0)
        for box in boxes.tolist():
            crop = _crop(image, box)
            pad_share = (crop == GREY).all(0).float().mean()
            assert pad_share < 0.05  # the box lies on image pixels (noisy), not on the grey canvas


def test_letterbox_places_and_flips_exactly():
    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
    boxes = np.array([[4.0, 2.0, 10.0, 12.0]])
    tensor, out, ratio, pad = letterbox(image, boxes, 80, place=(0.0, 1.0))
    assert ratio == 2.0 and pad == (0.0, 40.0)
    np.testing.assert_allclose(out, [[8, 44, 20, 64]])
    tensor_f, out_f, _, _ = letterbox(image, boxes, 80, place=(0.0, 1.0), flip=True)
    np.testing.assert_allclose(out_f, [[60, 44, 72, 64]])
    assert torch.equal(tensor_f[:, 40:], tensor[:, 40:].flip(-1)) and torch.all(tensor[:, :40] == GREY)


# --- hand-written json: empty images, crowd, errors --------------------------------------------


def test_images_without_annotations_and_crowd_give_empty_targets(tmp_path):
    root = _write_coco(tmp_path / "c", [(5, 40, 30), (9, 30, 30)], [
        _ann(1, 9, [2.0, 3.0, 10.0, 8.0], category_id=7),
        _ann(2, 9, [1.0, 1.0, 20.0, 20.0], iscrowd=1),
        _ann(3, 9, [5.0, 5.0, 6.0, 0.0]),  # zero height: kept for COCOeval, never a target (as in COCO 2017)
    ])
    ds = CocoDetection(root, "val", image_size=60)
    assert ds.image_ids == [5, 9] and ds.cat_ids == [2, 7]
    image, target = ds[0]
    assert target["image_id"] == 5 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    _, target = ds[1]
    assert target["labels"].tolist() == [1]
    np.testing.assert_allclose(target["boxes"].numpy(), [[4, 6, 24, 22]])
    assert CocoDetection(root, "val", max_images=1).image_ids in ([5], [9])
    assert len(CocoDetection(root, "val", fraction=0.5)) == 1


def test_missing_json_names_the_path(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        CocoDetection(tmp_path, "val2017")
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, DataError)
    assert str(annotation_path(tmp_path, "val2017")) in _one_line(exc)


def test_invalid_json_names_the_file(tmp_path):
    root = _write_coco(tmp_path / "c", [(1, 20, 20)], [])
    annotation_path(root, "val").write_text('{"images": [')
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(root, "val")
    assert isinstance(exc.value, CorruptDataError) and isinstance(exc.value, DataError)  # stops a sweep: exit 2
    assert isinstance(exc.value, BadInputError) and isinstance(exc.value, ValueError)
    assert str(annotation_path(root, "val")) in _one_line(exc) and "not valid JSON" in str(exc.value)
    annotation_path(root, "val").write_text('{"images": []}')
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(root, "val")
    assert "'annotations'" in _one_line(exc) and str(annotation_path(root, "val")) in str(exc.value)


@pytest.mark.parametrize("bad", [
    {"bbox": [1.0, 1.0, -3.0, 4.0]},
    {"bbox": [1.0, float("nan"), 3.0, 4.0]},
    {"bbox": [1.0, 1.0, 3.0]},
    {"bbox": [15.0, 1.0, 8.0, 4.0]},
    {"category_id": 4},
    {"image_id": 99},
])
def test_bad_annotation_names_its_id_and_image(tmp_path, bad):
    ann = {**_ann(41, 3, [1.0, 1.0, 3.0, 4.0]), **bad}
    root = _write_coco(tmp_path / "c", [(3, 20, 20)], [ann])
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(root, "val")
    message = _one_line(exc)
    assert "annotation 41" in message and f"image {ann['image_id']}" in message
    assert "instances_val.json" in message


def test_missing_or_corrupt_image_names_file_and_id(tmp_path):
    root = _write_coco(tmp_path / "c", [(3, 20, 20), (4, 20, 20)], [])
    (root / "val" / "3.png").unlink()
    (root / "val" / "4.png").write_bytes(b"not a png")
    ds = CocoDetection(root, "val")  # images are checked lazily
    with pytest.raises(DetectionDataError) as exc:
        ds[0]
    assert "3.png" in _one_line(exc) and "image 3" in str(exc.value) and "missing" in str(exc.value)
    with pytest.raises(DetectionDataError) as exc:
        ds[1]
    assert "4.png" in _one_line(exc) and "image 4" in str(exc.value)


def test_ensure_coco_generates_or_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    with pytest.raises(DataNotFoundError) as exc:
        ensure_coco(tmp_path / "coco")
    message = _one_line(exc)
    assert "instances_train2017.json is missing" in message
    assert "COCO_ROOT" in message and "TASK=shapes" in message
    with pytest.raises(DataNotFoundError) as exc:
        ensure_coco(None)
    assert "no data.root given" in _one_line(exc)
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "gen"))
    root = ensure_coco(None, ("train", "val"), task="shapes", generate="shapes",
                       n_train=2, n_val=1, min_size=40, max_size=48)
    assert root == tmp_path / "gen" and annotation_path(root, "val").is_file()
    assert ensure_coco(root, ("train", "val"), generate="shapes") == root  # already there: left alone
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError) as exc:
        ensure_coco(tmp_path / "busy", ("train", "val"), task="shapes", generate="shapes")
    assert "not empty" in _one_line(exc)


# --- COCOeval ----------------------------------------------------------------------------------


def _predict_gt(ds, mutate=None):
    """The ground truth itself as detections (canvas pixels, score 1), optionally changed."""
    evaluator = CocoEvaluator(ds)
    for index in range(len(ds)):
        _, target = ds[index]
        det = {"boxes": target["boxes"].clone(), "scores": torch.ones(len(target["labels"])),
               "labels": target["labels"].clone()}
        evaluator.update([mutate(det) if mutate else det], [target])
    return evaluator


def test_perfect_predictions_score_one(shapes_tiny_root):
    ds = CocoDetection(shapes_tiny_root, "val", image_size=64)
    metrics = _predict_gt(ds).compute()
    assert abs(metrics["map50_95"] - 1.0) < 1e-6 and abs(metrics["map50"] - 1.0) < 1e-6


def test_shifted_or_wrong_class_predictions_score_less(shapes_tiny_root):
    ds = CocoDetection(shapes_tiny_root, "val", image_size=64)

    def shift(det):
        det["boxes"] += torch.tensor([4.0, 3.0, 4.0, 3.0])
        return det

    def wrong_class(det):
        det["labels"] = (det["labels"] + 1) % ds.num_classes
        return det

    assert _predict_gt(ds, shift).compute()["map50_95"] < 0.9
    assert _predict_gt(ds, wrong_class).compute() == {"map50_95": 0.0, "map50": 0.0}


def test_zero_detections_and_subsets(shapes_tiny_root):
    ds = CocoDetection(shapes_tiny_root, "val", image_size=64)
    assert coco_map(ds.coco, []) == {"map50_95": 0.0, "map50": 0.0}
    _, target = next(ds[i] for i in range(len(ds)) if len(ds[i][1]["labels"]))
    det = {"boxes": target["boxes"], "scores": torch.ones(len(target["labels"])), "labels": target["labels"]}
    results = to_coco_detections([det], [target], ds.label_to_cat_id)
    assert all(r["category_id"] in ds.cat_ids and r["image_id"] == target["image_id"] for r in results)
    assert coco_map(ds.coco, results, [target["image_id"]])["map50_95"] == pytest.approx(1.0)
    assert coco_map(ds.coco, results)["map50_95"] < 1.0  # the other images' objects count as misses
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_map(ds.coco, results, [123456789])


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_writes_the_shapes_set(tmp_path, monkeypatch, capsys):
    from quantbench import cli

    module, function, _ = cli.DATA_WRITERS["shapes"]
    monkeypatch.setitem(cli.DATA_WRITERS, "shapes", (module, function, {"n_train": 3, "n_val": 2}))
    out = tmp_path / "shapes"
    assert cli.main(["data", "shapes", "--out", str(out), "--size", "48", "--seed", "1"]) == 0
    assert f"wrote the shapes data set to {out}" in capsys.readouterr().out
    images = _json(out, "train")["images"]
    assert len(images) == 3 and all(34 <= i["width"] <= 48 and 34 <= i["height"] <= 48 for i in images)
    assert cli.main(["data", "shapes", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
