"""Tests for the procedural dataset generator (boxmask.data.synth)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from boxmask.data.synth import CLASS_NAMES, generate

NUM_TRAIN, NUM_VAL, SIZE, SEED = 40, 8, 96, 3


def _load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    return generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=SEED, show_progress=False)


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32)


def test_files_and_structure(dataset: dict[str, Path]) -> None:
    for key in ("train", "train_full", "val"):
        assert dataset[key].is_file()
    assert dataset["images"].is_dir()
    pngs = sorted(p.name for p in dataset["images"].glob("*.png"))
    assert pngs == [f"train_{i:06d}.png" for i in range(NUM_TRAIN)] + [f"val_{i:06d}.png" for i in range(NUM_VAL)]
    assert not list(dataset["images"].glob("*.tmp")) and not list(dataset["train"].parent.glob(".*.tmp"))

    train = _load(dataset["train"])
    assert "info" in train
    assert [c["id"] for c in train["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in train["categories"]] == list(CLASS_NAMES)
    assert len(train["images"]) == NUM_TRAIN
    for ann in train["annotations"]:
        assert "segmentation" not in ann
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= len(CLASS_NAMES)
    for im in train["images"]:
        img = cv2.imread(str(dataset["images"] / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (im["height"], im["width"], 3)
        assert im["height"] == SIZE and SIZE <= im["width"] <= 1.25 * SIZE


def test_train_and_train_full_agree(dataset: dict[str, Path]) -> None:
    train, full = _load(dataset["train"]), _load(dataset["train_full"])
    assert [im["id"] for im in train["images"]] == [im["id"] for im in full["images"]]
    assert [im["file_name"] for im in train["images"]] == [im["file_name"] for im in full["images"]]
    assert len(train["annotations"]) == len(full["annotations"]) > NUM_TRAIN  # > 1 object per image on average
    for a, b in zip(train["annotations"], full["annotations"]):
        assert (a["id"], a["image_id"], a["category_id"], a["bbox"]) == (b["id"], b["image_id"], b["category_id"],
                                                                        b["bbox"])
    assert len({a["id"] for a in full["annotations"]}) == len(full["annotations"])


@pytest.mark.parametrize("key", ["train_full", "val"])
def test_boxes_are_tight_boxes_of_masks(dataset: dict[str, Path], key: str) -> None:
    data = _load(dataset[key])
    images = {im["id"]: im for im in data["images"]}
    assert data["annotations"]
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        rle = ann["segmentation"]
        assert isinstance(rle["counts"], str)
        assert rle["size"] == [im["height"], im["width"]]
        mask = mask_utils.decode(rle)
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        expected = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
        assert ann["bbox"] == expected
        assert np.allclose(mask_utils.toBbox(rle), ann["bbox"])
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert ann["area"] == float(mask.sum()) >= 30


def test_masks_do_not_overlap_within_image(dataset: dict[str, Path]) -> None:
    # Masks are visible parts after occlusion, so they partition the object pixels.
    data = _load(dataset["train_full"])
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(ann["segmentation"]))
    for masks in by_image.values():
        assert int(np.sum(masks, axis=0).max()) <= 1


def test_determinism(tmp_path: Path) -> None:
    kw = dict(num_train=6, num_val=2, size=64, show_progress=False)
    a = generate(tmp_path / "a", seed=7, **kw)
    b = generate(tmp_path / "b", seed=7, **kw)
    c = generate(tmp_path / "c", seed=8, **kw)
    for key in ("train", "train_full", "val"):
        assert a[key].read_bytes() == b[key].read_bytes()
    names = sorted(p.name for p in a["images"].glob("*.png"))
    assert names == sorted(p.name for p in b["images"].glob("*.png"))
    for name in names:
        assert (a["images"] / name).read_bytes() == (b["images"] / name).read_bytes()
    assert a["train_full"].read_bytes() != c["train_full"].read_bytes()
    assert any((a["images"] / n).read_bytes() != (c["images"] / n).read_bytes() for n in names)


def test_train_images_do_not_depend_on_num_val(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", num_train=4, num_val=0, size=48, seed=1, show_progress=False)
    b = generate(tmp_path / "b", num_train=4, num_val=5, size=48, seed=1, show_progress=False)
    assert a["train_full"].read_bytes() == b["train_full"].read_bytes()
    for i in range(4):
        name = f"train_{i:06d}.png"
        assert (a["images"] / name).read_bytes() == (b["images"] / name).read_bytes()


def test_hard_case_same_class_overlap(dataset: dict[str, Path]) -> None:
    data = _load(dataset["train_full"])
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)

    def boxes_overlap(a: list[float], b: list[float]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    hits = sum(
        any(p["category_id"] == q["category_id"] and boxes_overlap(p["bbox"], q["bbox"])
            for p, q in itertools.combinations(anns, 2))
        for anns in by_image.values()
    )
    assert hits >= 1
    # The per-image metadata agrees in frequency with what was asked for (>= 30 %).
    flagged = sum("same_class_overlap" in im["hard_cases"] for im in data["images"])
    assert flagged >= 0.3 * len(data["images"])


def _near_colour_object(img: np.ndarray, mask: np.ndarray) -> bool:
    """True if pixels just outside ``mask`` nearly share the object's mean colour."""
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    if inner.sum() < 10:
        return False
    mean = img[inner].mean(axis=0)
    ring = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=2).astype(bool) & ~mask.astype(bool)
    close = np.linalg.norm(img[ring] - mean, axis=1) < 10.0
    return int(close.sum()) >= 10 and close.mean() >= 0.1


def test_hard_case_near_colour_neighbour(dataset: dict[str, Path]) -> None:
    data = _load(dataset["train_full"])
    images = {im["id"]: im for im in data["images"]}
    hit_images = set()
    for ann in data["annotations"]:
        img = _read_rgb(dataset["images"] / images[ann["image_id"]]["file_name"])
        if _near_colour_object(img, mask_utils.decode(ann["segmentation"])):
            hit_images.add(ann["image_id"])
    assert len(hit_images) >= 1
    flagged = sum("near_colour" in im["hard_cases"] for im in data["images"])
    assert flagged >= 0.3 * len(data["images"])


def test_pycocotools_loads(dataset: dict[str, Path]) -> None:
    for key in ("train", "train_full", "val"):
        coco = COCO(str(dataset[key]))
        assert len(coco.getImgIds()) == (NUM_TRAIN if key.startswith("train") else NUM_VAL)
        assert len(coco.getCatIds()) == len(CLASS_NAMES)
    coco = COCO(str(dataset["val"]))
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert coco.annToMask(ann).sum() == ann["area"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_train=0), dict(num_val=-1), dict(size=31), dict(seed=-1), dict(size=64.0), dict(num_train=True)],
)
def test_bad_args_raise(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "bad", show_progress=False, **kwargs)


def test_hard_case_val_sets(tmp_path):
    from boxmask.data.synth import HARD_CASES

    paths = generate(tmp_path, num_train=2, num_val=20, size=64, seed=3, show_progress=False)
    val = json.loads(paths["val"].read_text())
    for case in HARD_CASES:
        sub = json.loads(paths[f"val_{case}"].read_text())
        ids = {im["id"] for im in sub["images"]}
        assert ids and ids == {im["id"] for im in val["images"] if case in im["hard_cases"]}
        assert all(a["image_id"] in ids for a in sub["annotations"])
        assert len(sub["annotations"]) == sum(a["image_id"] in ids for a in val["annotations"])
