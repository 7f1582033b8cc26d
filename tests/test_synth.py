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

from boxmask.cli import main
from boxmask.data.synth import CLASS_NAMES, HARD_CASES, TEXTURED_CLASS_NAMES, generate

NUM_TRAIN, NUM_VAL, SIZE, SEED = 40, 8, 96, 3
TEX_SIZE = 128  # textured images: big enough for a few texture periods per object


def _load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    return generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=SEED, show_progress=False)


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth_textured")
    return generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, size=TEX_SIZE, seed=SEED, show_progress=False,
                    kind="textured")


@pytest.fixture(params=["flat", "textured"])
def dataset(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Either kind: the tests that take it hold for both."""
    return request.getfixturevalue(request.param)


def _kind(paths: dict[str, Path]) -> str:
    return _load(paths["train"])["info"]["kind"]


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
    names = CLASS_NAMES if _kind(dataset) == "flat" else TEXTURED_CLASS_NAMES
    assert [c["name"] for c in train["categories"]] == list(names)
    assert len(train["images"]) == NUM_TRAIN
    for ann in train["annotations"]:
        assert "segmentation" not in ann
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= len(CLASS_NAMES)
    for im in train["images"]:
        img = cv2.imread(str(dataset["images"] / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (im["height"], im["width"], 3)
        size = SIZE if _kind(dataset) == "flat" else TEX_SIZE
        assert im["height"] == size and size <= im["width"] <= 1.25 * size


def test_train_and_train_full_agree(dataset: dict[str, Path]) -> None:
    train, full = _load(dataset["train"]), _load(dataset["train_full"])
    assert [im["id"] for im in train["images"]] == [im["id"] for im in full["images"]]
    assert [im["file_name"] for im in train["images"]] == [im["file_name"] for im in full["images"]]
    assert len(train["annotations"]) == len(full["annotations"]) > NUM_TRAIN  # > 1 object per image on average
    for a, b in zip(train["annotations"], full["annotations"]):
        assert (a["id"], a["image_id"], a["category_id"], a["bbox"], a["cases"]) == (
            b["id"], b["image_id"], b["category_id"], b["bbox"], b["cases"])
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


@pytest.mark.parametrize("kind", ["flat", "textured"])
def test_determinism(tmp_path: Path, kind: str) -> None:
    kw = dict(num_train=6, num_val=2, size=64, show_progress=False, kind=kind)
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


def test_hard_case_same_class_overlap(flat: dict[str, Path]) -> None:
    data = _load(flat["train_full"])
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


def test_hard_case_near_colour_neighbour(flat: dict[str, Path]) -> None:
    data = _load(flat["train_full"])
    images = {im["id"]: im for im in data["images"]}
    hit_images = set()
    for ann in data["annotations"]:
        img = _read_rgb(flat["images"] / images[ann["image_id"]]["file_name"])
        if _near_colour_object(img, mask_utils.decode(ann["segmentation"])):
            hit_images.add(ann["image_id"])
    assert len(hit_images) >= 1
    flagged = sum("near_colour" in im["hard_cases"] for im in data["images"])
    assert flagged >= 0.3 * len(data["images"])


def test_cases_field(dataset: dict[str, Path]) -> None:
    # Every annotation names its hard cases; an image's hard_cases are their union.
    for key in ("train", "train_full", "val"):
        data = _load(dataset[key])
        by_image: dict[int, set[str]] = {}
        for ann in data["annotations"]:
            assert isinstance(ann["cases"], list) and set(ann["cases"]) <= set(HARD_CASES)
            assert ann["cases"] == sorted(set(ann["cases"]), key=HARD_CASES.index)
            by_image.setdefault(ann["image_id"], set()).update(ann["cases"])
        for im in data["images"]:
            assert im["hard_cases"] == [c for c in HARD_CASES if c in by_image.get(im["id"], set())]
    anns = _load(dataset["train_full"])["annotations"]
    for case in HARD_CASES:  # each case on a good share of the objects, and plain objects too
        assert sum(case in a["cases"] for a in anns) >= 0.1 * len(anns)
    assert sum(not a["cases"] for a in anns) >= 0.2 * len(anns)


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
    [dict(num_train=0), dict(num_val=-1), dict(size=31), dict(seed=-1), dict(size=64.0), dict(num_train=True),
     dict(kind="photo")],
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


# --------------------------------------------------------------------------- textured kind

# Wavelength bands (px at 192 px images) around the classes' own (see boxmask.data.textures), then the
# background's; textures stop shrinking below 144 px images.
_WAVELENGTH_EDGES = tuple(v * max(TEX_SIZE / 192, 0.75) for v in (2.0, 4.2, 6.6, 9.9, 14.0, 20.0, np.inf))


def _texture_feature(grey: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Share of the spectral energy of ``grey`` inside ``region`` in a few wavelength bands."""
    ys, xs = np.nonzero(region)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    g, m = grey[sl], region[sl]
    z = np.where(m, g - g[m].mean(), 0.0)
    n = max(64, *z.shape)
    power = np.abs(np.fft.fft2(z, s=(n, n))) ** 2
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    lam = 1.0 / np.maximum(f, 1e-9)
    e = np.array([power[(lam >= lo) & (lam < hi)].sum() for lo, hi in zip(_WAVELENGTH_EDGES, _WAVELENGTH_EDGES[1:])])
    return e / e.sum()


def _by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann)
    return out


def _box_mask(ann: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    x, y, w, h = (int(v) for v in ann["bbox"])
    box = np.zeros(shape, bool)
    box[y:y + h, x:x + w] = True
    return box


def test_textured_classes_have_their_own_texture(textured: dict[str, Path]) -> None:
    # A nearest-centroid classifier on a crude spectral feature separates the 4 classes and the
    # background far better than chance: texture, not colour, carries the class.
    data = _load(textured["train_full"])
    images = {im["id"]: im for im in data["images"]}
    feats, labels, bg = [], [], []
    kernel = np.ones((5, 5), np.uint8)
    for image_id, anns in _by_image(data).items():
        im = images[image_id]
        grey = cv2.imread(str(textured["images"] / im["file_name"]), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        near = np.zeros(grey.shape, bool)
        for ann in anns:
            inner = cv2.erode(mask_utils.decode(ann["segmentation"]), kernel).astype(bool)
            if inner.sum() >= 60:
                feats.append(_texture_feature(grey, inner))
                labels.append(ann["category_id"])
            near |= cv2.dilate(_box_mask(ann, grey.shape).astype(np.uint8), kernel).astype(bool)
        for y in range(0, grey.shape[0] - 32, 32):  # background windows away from every box
            for x in range(0, grey.shape[1] - 32, 32):
                if not near[y:y + 32, x:x + 32].any():
                    win = np.zeros(grey.shape, bool)
                    win[y:y + 32, x:x + 32] = True
                    bg.append(_texture_feature(grey, win))
    x_obj, y_obj, x_bg = np.array(feats), np.array(labels), np.array(bg)
    assert len(x_obj) >= 60 and len(x_bg) >= 20
    half, bg_half = len(x_obj) // 2, len(x_bg) // 2
    centroids = {c: x_obj[:half][y_obj[:half] == c].mean(axis=0) for c in range(1, len(TEXTURED_CLASS_NAMES) + 1)}
    centroids[0] = x_bg[:bg_half].mean(axis=0)  # 0 = background

    def predict(x: np.ndarray) -> np.ndarray:
        keys = sorted(centroids)
        d = np.stack([np.linalg.norm(x - centroids[k], axis=1) for k in keys], axis=1)
        return np.array(keys)[d.argmin(axis=1)]

    pred = predict(x_obj[half:])
    assert (pred == y_obj[half:]).mean() >= 0.6  # chance: 0.25
    assert (pred == 0).mean() <= 0.1  # objects do not look like background
    assert (predict(x_bg[bg_half:]) == 0).mean() >= 0.9  # background looks like no class


def test_textured_near_colour_flags(textured: dict[str, Path]) -> None:
    # A near-colour object has, inside its box, outside every mask and hugging its mask, a region whose
    # colours are the object's own and whose mean colour is the object's; plain objects do not.
    data = _load(textured["train_full"])
    images = {im["id"]: im for im in data["images"]}
    flagged, plain = [], []
    for image_id, anns in _by_image(data).items():
        img = _read_rgb(textured["images"] / images[image_id]["file_name"])
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        union = np.any(masks, axis=0)
        for ann, mask in zip(anns, masks):
            dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
            hug = _box_mask(ann, mask.shape) & ~union & (dist <= 3)
            obj = img[mask][:: max(1, int(mask.sum()) // 600)]
            colours = img[hug]
            near = np.sqrt(((colours[:, None] - obj[None]) ** 2).sum(-1)).min(axis=1) < 12 if len(colours) else \
                np.zeros(0, bool)
            mean_gap = float(np.linalg.norm(colours[near].mean(0) - img[mask].mean(0))) if near.any() else np.inf
            (flagged if "near_colour" in ann["cases"] else plain).append((int(near.sum()), mean_gap))
    assert len(flagged) >= 10
    good = [n >= 15 and gap < 20 for n, gap in flagged]
    assert np.mean(good) >= 0.9
    assert np.median([n for n, _ in plain]) == 0 and np.mean([n >= 15 for n, _ in plain]) <= 0.2


def test_textured_same_class_overlap_flags(textured: dict[str, Path]) -> None:
    # Flagged exactly when the visible mask touches another instance of its class.
    data = _load(textured["train_full"])
    kernel = np.ones((3, 3), np.uint8)
    n_flagged = 0
    for anns in _by_image(data).values():
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        grown = [cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in masks]
        for i, a in enumerate(anns):
            touching = any(j != i and b["category_id"] == a["category_id"]
                           and max(int((grown[i] & masks[j]).sum()), int((grown[j] & masks[i]).sum())) >= 3
                           for j, b in enumerate(anns))
            assert touching == ("same_class_overlap" in a["cases"]), a["id"]
            n_flagged += touching
    assert n_flagged >= 10


def test_cli_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tex"
    assert main(["synth", str(out), "--kind", "textured", "--num-train", "2", "--num-val", "1", "--size", "64",
                 "--no-progress"]) == 0
    info = _load(out / "val.json")["info"]
    assert info["kind"] == "textured" and info["classes"] == list(TEXTURED_CLASS_NAMES)
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path / "bad"), "--kind", "photo"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
