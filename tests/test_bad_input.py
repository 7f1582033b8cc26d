"""Bad input gets a clear error naming the file / image id / annotation id, or a counted skip."""
import json

import numpy as np
import pytest

from boxmask.cli import main
from boxmask.data.coco import CocoDataset, DatasetError

from .conftest import write_dataset


def _one(tmp_path, ann_updates=None, image_updates=None, extra_anns=None, write_image=True):
    im = {"id": 1, "file_name": "a.png", "width": 32, "height": 24}
    im.update(image_updates or {})
    if write_image:
        im["array"] = np.zeros((24, 32, 3), np.uint8)
    ann = {"id": 9, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 0}
    ann.update(ann_updates or {})
    return write_dataset(tmp_path, [im], [ann] + (extra_anns or [])), tmp_path / "images"


@pytest.mark.parametrize(
    "ann_updates, words",
    [
        ({"bbox": [2, 2, 0, 10]}, ["annotation id 9", "non-positive"]),
        ({"bbox": [2, 2, -3, 10]}, ["annotation id 9", "non-positive"]),
        ({"bbox": [2, 2, float("nan"), 10]}, ["annotation id 9"]),
        ({"bbox": [100, 100, 10, 10]}, ["annotation id 9", "outside"]),
        ({"bbox": "x"}, ["annotation id 9", "bbox"]),
        ({"category_id": 99}, ["annotation id 9", "unknown category_id 99"]),
        ({"image_id": 42}, ["annotation id 9", "unknown image_id 42"]),
        ({"segmentation": [[1, 2, 3, 4]]}, ["annotation id 9", "segmentation"]),
        ({"segmentation": {"size": [5, 5], "counts": "abc"}}, ["annotation id 9", "RLE"]),
    ],
)
def test_bad_annotations_are_named(tmp_path, ann_updates, words):
    path, root = _one(tmp_path, ann_updates)
    with pytest.raises(DatasetError) as e:
        CocoDataset(path, root)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg
    # Lenient mode: logged skip with a count, the image stays as a negative.
    ds = CocoDataset(path, root, skip_invalid=True)
    assert sum(ds.report.skipped.values()) == 1
    assert ds.load(0)["boxes"].shape == (0, 4)


def test_box_partly_outside_is_clipped_or_rejected(tmp_path):
    path, root = _one(tmp_path, {"bbox": [20, 10, 30, 30]})
    assert CocoDataset(path, root).load(0)["boxes"].tolist() == [[20, 10, 32, 24]]
    with pytest.raises(DatasetError, match="outside"):
        CocoDataset(path, root, clip_boxes=False)


def test_missing_and_unreadable_images(tmp_path):
    path, root = _one(tmp_path, write_image=False)
    with pytest.raises(DatasetError, match="image id 1: file not found"):
        CocoDataset(path, root)
    (root / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="image id 1: cannot read"):
        CocoDataset(path, root)
    with pytest.raises(DatasetError, match="empty"):
        CocoDataset(path, root, skip_invalid=True)


def test_size_mismatch_and_duplicates(tmp_path):
    path, root = _one(tmp_path, image_updates={"width": 99})
    with pytest.raises(DatasetError, match="is 32x24 but the json says 99x24"):
        CocoDataset(path, root)
    path, root = _one(tmp_path, extra_anns=[{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DatasetError, match="duplicate annotation id 9"):
        CocoDataset(path, root)


def test_malformed_json_names_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match=r"bad.json: invalid JSON at line 2"):
        CocoDataset(bad, tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="top level"):
        CocoDataset(tmp_path / "list.json", tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def test_empty_dataset(tmp_path):
    path = write_dataset(tmp_path, [], [])
    with pytest.raises(DatasetError, match="empty"):
        CocoDataset(path, tmp_path)


def test_cli_reports_error_and_writes_nothing(tmp_path, capsys):
    path, root = _one(tmp_path, {"category_id": 99})
    run = tmp_path / "run"
    rc = main(["train", "-c", "configs/tiny.yaml", "--train-json", str(path), "--train-images", str(root),
               "--out", str(run), "--max-iters", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "boxmask: error:" in err and "annotation id 9" in err
    assert not run.exists()


def test_full_method_needs_masks(tmp_path, capsys):
    path, root = _one(tmp_path)
    rc = main(["train", "-c", "configs/tiny.yaml", "--train-json", str(path), "--train-images", str(root),
               "--method", "full", "--out", str(tmp_path / "run"), "--max-iters", "2", "--no-progress"])
    assert rc == 2
    assert "segmentation" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_config_override(tmp_path, capsys):
    rc = main(["train", "-c", "configs/tiny.yaml", "solver.lr=abc", "--no-progress"])
    assert rc == 2 and "solver.lr" in capsys.readouterr().err
    rc = main(["train", "-c", "configs/tiny.yaml", "solver.nope=1", "--no-progress"])
    assert rc == 2 and "unknown config key 'solver.nope'" in capsys.readouterr().err
