"""Tests for boxmask.visualize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from boxmask.visualize import draw_instances, save_png, side_by_side

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
    np.testing.assert_array_equal(draw_instances(img, det, NAMES, score_thresh=0.3), img)


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
