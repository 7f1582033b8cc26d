"""Tests for boxmask.visualize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from boxmask.visualize import PALETTE, display_order, draw_instances, picture_path, safe_file_name, save_png, side_by_side

H, W = 96, 128
NAMES = ["cat", "dog"]


def _image() -> np.ndarray:
    return np.full((H, W, 3), 100, dtype=np.uint8)


def _det(mask_dtype=torch.bool, as_numpy: bool = False) -> dict:
    mask = torch.zeros((1, H, W), dtype=mask_dtype)
    mask[0, 20:40, 15:45] = 1
    det = {
        "boxes": torch.tensor([[12.0, 18.0, 48.0, 44.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "masks": mask,
    }
    if as_numpy:
        det = {k: v.numpy() for k, v in det.items()}
    return det


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_draw_instances_basic(mask_dtype, as_numpy):
    img = _image()
    orig = img.copy()
    out = draw_instances(img, _det(mask_dtype, as_numpy), NAMES)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(img, orig)  # input untouched
    # Interior of the mask is tinted.
    assert (out[30, 30] != orig[30, 30]).any()
    assert (out[25:35, 20:40] != orig[25:35, 20:40]).any(axis=-1).all()
    # Far away from the box and its label nothing changes.
    np.testing.assert_array_equal(out[60:, 60:], orig[60:, 60:])


def test_draw_instances_deterministic():
    a = draw_instances(_image(), _det(), NAMES)
    b = draw_instances(_image(), _det(), NAMES)
    np.testing.assert_array_equal(a, b)


def test_draw_instances_without_masks_and_empty():
    img = _image()
    det = _det()
    del det["masks"]
    out = draw_instances(img, det, NAMES)
    assert out.shape == img.shape and out.dtype == np.uint8
    # Box interior (not on the outline, below the label) is untouched without masks.
    np.testing.assert_array_equal(out[30:40, 25:40], img[30:40, 25:40])
    # The box outline is drawn.
    assert (out[43, 30] != img[43, 30]).any()

    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros((0, H, W), dtype=torch.bool)}
    np.testing.assert_array_equal(draw_instances(img, empty, NAMES), img)
    del empty["masks"]
    np.testing.assert_array_equal(draw_instances(img, empty, NAMES), img)


def test_draw_instances_score_thresh():
    img = _image()
    det = _det()
    det["scores"] = torch.tensor([0.1])
    out = draw_instances(img, det, NAMES, score_thresh=0.3)
    # the object is not drawn; a note in the top-left corner says why
    np.testing.assert_array_equal(out[25:, :], img[25:, :])
    assert (out[:12, :60] == 0).any()


def test_draw_instances_box_outside_image_and_unknown_label():
    img = _image()
    det = {"boxes": torch.tensor([[-10.0, -5.0, 500.0, 400.0], [120.0, 90.0, 119.0, 89.0]]),
           "scores": torch.tensor([0.8, 0.7]), "labels": torch.tensor([5, 0])}
    out = draw_instances(img, det, NAMES)
    assert out.shape == img.shape


def test_draw_instances_bad_mask_shape():
    det = _det()
    det["masks"] = torch.zeros((1, H // 2, W // 2), dtype=torch.bool)
    with pytest.raises(ValueError):
        draw_instances(_image(), det, NAMES)


def test_side_by_side():
    a = np.zeros((10, 5, 3), np.uint8)
    b = np.full((7, 6, 3), 50, np.uint8)
    out = side_by_side(a, b, gap=3)
    assert out.shape == (10, 5 + 3 + 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :5], a)
    np.testing.assert_array_equal(out[:7, 8:], b)
    assert (out[:, 5:8] == 255).all()
    assert (out[7:, 8:] == 255).all()


def test_save_png(tmp_path):
    img = draw_instances(_image(), _det(), NAMES)
    path = tmp_path / "sub" / "vis.png"
    save_png(path, img)
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), img)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vis.png"]
    # Overwriting goes through the same atomic path.
    save_png(str(path), np.zeros((4, 4, 3), np.uint8))
    with Image.open(path) as im:
        assert im.size == (4, 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vis.png"]


def test_save_png_failure_leaves_no_temp(tmp_path):
    with pytest.raises(Exception):
        save_png(tmp_path / "bad.png", np.zeros((4, 4, 7), np.uint8))  # PIL cannot make this
    assert list(tmp_path.iterdir()) == []


def test_one_pass_blend_keeps_the_photo_visible_under_overlapping_masks():
    """Stacked masks used to be blended one over the other (three masks: 12% of the photo left); one pass
    keeps 1 - alpha of it wherever masks overlap, and the most confident object's colour shows."""
    img = np.full((H, W, 3), 200, np.uint8)
    masks = torch.zeros((3, H, W), dtype=torch.bool)
    masks[0, 10:60, 10:60] = True
    masks[1, 20:70, 20:70] = True
    masks[2, 30:80, 30:80] = True
    det = {"boxes": torch.tensor([[10.0, 10, 60, 60], [20.0, 20, 70, 70], [30.0, 30, 80, 80]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 0]), "masks": masks}
    out = draw_instances(img, det, NAMES, alpha=0.45, dedupe_iou=None).astype(float)
    expected = 0.55 * 200 + 0.45 * np.array(PALETTE[0])  # object 0 (most confident) on top
    np.testing.assert_allclose(out[45, 45], expected, atol=1)
    expected = 0.55 * 200 + 0.45 * np.array(PALETTE[2])
    np.testing.assert_allclose(out[75, 75], expected, atol=1)


def test_duplicates_of_one_object_show_one_label():
    """Five detections of one object in several classes: only the most confident is drawn."""
    mask = torch.zeros((H, W), dtype=torch.bool)
    mask[20:60, 20:70] = True
    n = 5
    det = {"boxes": torch.tensor([[20.0, 20, 70, 60]]).repeat(n, 1) + torch.arange(n)[:, None] * 0.5,
           "scores": torch.tensor([0.6, 0.9, 0.7, 0.55, 0.8]), "labels": torch.tensor([0, 1, 0, 1, 0]),
           "masks": mask[None].repeat(n, 1, 1)}
    order = display_order(det["scores"].numpy(), det["boxes"].numpy(), det["masks"].numpy(), 0.5)
    assert order.tolist() == [1]
    # masks that agree while the boxes do not (a stray pixel widens one box) are duplicates too
    masks = det["masks"].clone()
    masks[0, 0, 0] = True
    boxes = det["boxes"].clone()
    boxes[0] = torch.tensor([0.0, 0, 70, 60])
    assert display_order(det["scores"].numpy(), boxes.numpy(), masks.numpy(), 0.5).tolist() == [1]
    # two separate objects both stay, in score order; below the threshold nothing is drawn
    boxes[2] = torch.tensor([80.0, 60, 120, 90])
    masks[2] = False
    masks[2, 60:90, 80:120] = True
    assert display_order(det["scores"].numpy(), boxes.numpy(), masks.numpy(), 0.5).tolist() == [1, 2]
    assert display_order(det["scores"].numpy(), boxes.numpy(), masks.numpy(), 0.95).tolist() == []
    # the default threshold is 0.5: a 0.45 detection is not drawn
    low = {k: v[:1] for k, v in det.items()}
    low["scores"] = torch.tensor([0.45])
    np.testing.assert_array_equal(draw_instances(_image(), low, NAMES)[25:], _image()[25:])


def _label_rects(out: np.ndarray, colors) -> list:
    """Bounding rectangles of the solid areas painted exactly in each colour (the labels' filled
    backgrounds; a 3x3 erosion removes the 1-pixel box outlines of the same colour)."""
    rects = []
    for c in colors:
        m = np.pad((out == np.array(c)).all(-1), 1)
        solid = np.ones_like(m[1:-1, 1:-1])
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                solid &= m[dy : dy + m.shape[0] - 2, dx : dx + m.shape[1] - 2]
        ys, xs = np.nonzero(solid)
        rects.append((xs.min() - 1, ys.min() - 1, xs.max() + 1, ys.max() + 1) if len(xs) else None)
    return rects


def test_labels_stay_inside_the_picture_and_apart():
    """Boxes at the borders and boxes sharing a corner: every label is whole, inside the image, and no
    two overlap (they used to be cut at the border and stacked on one another)."""
    h, w = 200, 240
    img = np.full((h, w, 3), 255, np.uint8)
    boxes = torch.tensor([[200.0, 0, 240, 30],  # top-right corner: a label above would be cut
                          [0.0, 170, 30, 200],  # bottom-left
                          [60.0, 60, 140, 140], [60.0, 60, 100, 100], [62.0, 62, 120, 120]])
    det = {"boxes": boxes, "scores": torch.tensor([0.9, 0.85, 0.8, 0.75, 0.7]),
           "labels": torch.tensor([0, 1, 0, 1, 0])}
    names = ["motorcycle", "person"]
    out = draw_instances(img, det, names, dedupe_iou=None)
    rects = _label_rects(out, PALETTE[:5])
    for r in rects:
        assert r is not None
        x0, y0, x1, y1 = r
        assert 0 <= x0 and x1 < w and 0 <= y0 and y1 < h
    labels = [(x0, y0, x1, y1) for x0, y0, x1, y1 in rects]
    # label backgrounds are ~14+ px high and wide enough for the text: none is cut to a sliver
    assert all(y1 - y0 >= 12 and x1 - x0 >= 40 for x0, y0, x1, y1 in labels)
    # the top-right label is wide enough for "motorcycle 0.90" (its left end was cut before)
    assert labels[0][2] - labels[0][0] >= 60
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i], labels[j]
            inter_w = min(a[2], b[2]) - max(a[0], b[0])
            inter_h = min(a[3], b[3]) - max(a[1], b[1])
            # (1 pixel of slack: a box outline of the same colour may touch its label)
            assert inter_w <= 1 or inter_h <= 1, (i, j, a, b)


def test_safe_file_names_never_leave_their_folder(tmp_path):
    for hostile in ("../../evil", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\x", "C:\\x", "x\x00y", "", "é" * 200):
        name = safe_file_name(hostile)
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert name not in ("", ".", "..") and not name.startswith(".")
        assert len(name.encode()) <= 200
        path = picture_path(tmp_path, "001", f"image{hostile}", "maskIoU0.50")
        assert path.parent == tmp_path and path.name.endswith(".png")
        assert path.resolve().parent == tmp_path.resolve()
    assert safe_file_name("photo 1.jpg") == "photo 1.jpg"  # ordinary names are kept
