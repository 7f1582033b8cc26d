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
    with pytest.raises(DatasetError, match=r"image id 1 \(a.png\): file not found"):
        CocoDataset(path, root)
    (root / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"image id 1 \(a.png\): cannot read"):
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
    for text, words in [("[" * 100_000 + "]" * 100_000, "cannot read the JSON: maximum recursion depth"),
                        ('{"images": [{"id": ' + "9" * 5000 + "}]}", "cannot read the JSON: Exceeds the limit")]:
        bad.write_text(text)
        with pytest.raises(DatasetError, match=words):
            CocoDataset(bad, tmp_path)
    path, root = _one(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark is skipped
    assert len(CocoDataset(path, root)) == 1


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


# ---------------------------------------------------------------- segmentations, before pycocotools sees them
def _rle_of(mask):
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


@pytest.mark.parametrize(
    "seg, words",
    [
        ([[0, 0, 1e12, 0, 1e12, 1e12]], ["far outside the 32x24 image"]),  # crashed pycocotools in training
        ([[0, 0, 10**400, 0, 5, 5]], ["non-finite"]),  # an integer too large for a float
        ([[0, 0, float("inf"), 0, 5, 5]], ["non-finite"]),
        ([[40, 30, 50, 30, 50, 40]], ["polygon 0 lies outside the 32x24 image"]),
        ([[2, 2, 10, 10, 2, 10], [1, 1, 5, 5, 9, 9]], ["polygon 1 has zero area"]),  # collinear
        ([[3, 3, 3, 3, 3, 3, 3, 3]], ["zero area"]),  # one repeated point
        ([[1, 2, 3, 4]], ["at least 3 points"]),
        ([[1, 2, 3, 4, 5]], ["at least 3 points"]),
        ([[True, 2, 3, 4, 5, 6]], ["not a number"]),
        ([[2, 2, 10, 2, 10, "9"]], ["not a number"]),
        ([1, 2, 3, 4, 5, 6], ["polygon 0"]),
        ("mask.png", ["must be polygons"]),
    ],
)
def test_bad_polygons_are_refused_with_the_annotation_id(tmp_path, seg, words):
    path, root = _one(tmp_path, {"segmentation": seg})
    with pytest.raises(DatasetError) as e:
        CocoDataset(path, root)
    for w in ["annotation id 9 (image id 1)", "segmentation"] + words:
        assert w in str(e.value), (w, str(e.value))


def test_an_empty_segmentation_list_means_box_only(tmp_path):
    path, root = _one(tmp_path, {"segmentation": []})
    ds = CocoDataset(path, root)
    assert ds.mask_counts() == (0, 1) and not ds.report.skipped


def test_polygon_partly_outside_is_clipped_and_counted_or_refused(tmp_path):
    path, root = _one(tmp_path, {"bbox": [20, 10, 12, 14], "segmentation": [[20, 10, 45, 10, 45, 30, 20, 30]]})
    ds = CocoDataset(path, root)
    assert ds.report.clipped == [9] and "1 boxes or polygons partly outside their image clipped (annotation ids 9)" in ds.report.summary()
    mask = ds.load(0, with_masks=True)["masks"][0]
    assert mask.shape == (24, 32) and mask[11:23, 21:31].all()
    with pytest.raises(DatasetError, match="polygon 0 lies partly outside the 32x24 image"):
        CocoDataset(path, root, clip_boxes=False)


def test_polygon_on_the_image_edge_is_not_a_clip(tmp_path):
    path, root = _one(tmp_path, {"bbox": [0, 0, 32, 24], "segmentation": [[0, 0, 32, 0, 32, 24, 0, 24]]})
    ds = CocoDataset(path, root, clip_boxes=False)
    assert ds.report.clipped == [] and ds.load(0, with_masks=True)["masks"][0].all()


def test_rle_checks(tmp_path):
    m = np.zeros((24, 32), np.uint8)
    m[3:9, 4:12] = 1
    good = _rle_of(m)
    counts = [0, 24 * 32]
    cases = [
        (dict(good, size=[32, 24]), "RLE size [32, 24] (height, width) differs from the image's [24, 32]"),
        (_rle_of(np.ones((30, 32), np.uint8)) | {"size": [24, 32]}, "RLE counts cover 960 pixels, not 24x32 = 768"),
        ({"size": [24, 32], "counts": "0000000"}, "RLE counts cover 0 pixels"),  # pycocotools decodes it to garbage
        ({"size": [24, 32], "counts": good["counts"] + "P"}, "not a valid compressed RLE"),  # ends inside a number
        ({"size": [24, 32], "counts": "é5"}, "not a valid compressed RLE"),
        ({"size": [24, 32], "counts": "~~~~"}, "not a valid compressed RLE"),
        ({"size": [24, 32], "counts": "ooooooo1"}, "not a valid compressed RLE"),  # a run longer than any image
        ({"size": [24, 32], "counts": [10, 20]}, "RLE counts cover 30 pixels"),
        ({"size": [24, 32], "counts": [700, -2, 70]}, "integers >= 0"),
        ({"size": [24, 32], "counts": [768.0]}, "integers >= 0"),
        ({"size": [24.0, 32.0], "counts": counts}, "RLE 'size' must be [height, width]"),
        ({"size": [True, 32], "counts": counts}, "RLE 'size' must be [height, width]"),
        ({"size": [24, 32]}, "RLE 'counts' must be a string or a list"),
    ]
    for seg, words in cases:
        path, root = _one(tmp_path, {"segmentation": seg})
        with pytest.raises(DatasetError) as e:
            CocoDataset(path, root)
        assert "annotation id 9 (image id 1): segmentation" in str(e.value) and words in str(e.value), (seg, str(e.value))
    for seg in (good, {"size": [24, 32], "counts": [100, 668]}):
        path, root = _one(tmp_path, {"segmentation": seg})
        assert CocoDataset(path, root).load(0, with_masks=True)["masks"][0].sum() in (48, 668)


def test_rle_string_reading_matches_pycocotools():
    from pycocotools import mask as mask_utils

    from boxmask.data.coco import _rle_string_counts

    rng = np.random.default_rng(0)
    for h, w, p in [(1, 1, 0.5), (24, 32, 0.5), (50, 70, 0.02), (200, 300, 0.999), (300, 200, 0.0)]:
        m = (rng.random((h, w)) < p).astype(np.uint8)
        m[: h // 2, : w // 3] = 1  # long runs too
        r = mask_utils.encode(np.asfortranarray(m))
        counts = _rle_string_counts(r["counts"].decode("ascii"))
        assert sum(counts) == h * w and sum(counts[1::2]) == int(mask_utils.area(r)) == int(m.sum())
    # and reads any string as pycocotools' rleFrString would, refusing what that would misread
    for _ in range(3000):
        text = bytes(rng.integers(47, 113, int(rng.integers(0, 12)), dtype=np.uint8))
        assert _rle_string_counts(text) == _rle_string_counts_reference(text), text


def _rle_string_counts_reference(s: bytes):
    """rleFrString, character by character, refusing out-of-range characters, a string ending inside a
    number, numbers of more than 6 groups and negative counts."""
    counts, x, k = [], 0, 0
    for byte in s:
        c = byte - 48
        if not 0 <= c < 64:
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            if k >= 6:
                return None
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
        x = k = 0
    return None if k else counts


# ---------------------------------------------------------------- boxes, categories, files
@pytest.mark.parametrize(
    "ann_updates, words",
    [
        ({"bbox": [True, True, True, True]}, ["'bbox' must be [x, y, w, h] numbers"]),
        ({"bbox": [0, 0, 1e30, 1e30]}, ["far outside the 32x24 image"]),  # was clipped without a word
        ({"bbox": [-1e30, 2, 2e30, 5]}, ["far outside"]),
        ({"bbox": [2, 2, 10**400, 5]}, ["non-finite"]),
        ({"area": True}, ["'area' must be a number"]),
    ],
)
def test_bad_boxes_named(tmp_path, ann_updates, words):
    path, root = _one(tmp_path, ann_updates)
    with pytest.raises(DatasetError) as e:
        CocoDataset(path, root)
    for w in ["annotation id 9 (image id 1)"] + words:
        assert w in str(e.value), (w, str(e.value))


def test_clipped_boxes_are_counted_and_check_says_so(tmp_path, capsys):
    path, root = _one(tmp_path, {"bbox": [20, 10, 30, 30]})
    assert CocoDataset(path, root).report.clipped == [9]
    assert main(["check", str(path), "--images", str(root)]) == 0
    assert "1 boxes or polygons partly outside their image clipped (annotation ids 9)" in capsys.readouterr().out


def test_categories_names_must_be_unique_and_strings(tmp_path):
    path, root = _one(tmp_path)
    for cats, words in [
        ([{"id": 3, "name": "cat"}, {"id": 7, "name": "cat "}], "categories id 3 and id 7 have the same name cat"),
        ([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}], "duplicate category id 3"),
        ([{"id": True, "name": "a"}], "integer 'id'"),
        ([{"id": 3, "name": ["a"]}], "category id 3: 'name' must be a non-empty string"),
        ([{"id": 3, "name": "  "}], "category id 3: 'name' must be a non-empty string"),
    ]:
        data = json.loads(path.read_text())
        data["categories"] = cats
        path.write_text(json.dumps(data))
        with pytest.raises(DatasetError, match=words):
            CocoDataset(path, root)


def test_two_image_ids_for_one_file(tmp_path):
    path, root = _one(tmp_path)
    data = json.loads(path.read_text())
    data["images"].append({"id": 2, "file_name": "./a.png", "width": 32, "height": 24})
    data["annotations"].append({"id": 10, "image_id": 2, "category_id": 3, "bbox": [1, 1, 4, 4]})
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image id 2 \(./a.png\): the same file as image id 1"):
        CocoDataset(path, root)
    ds = CocoDataset(path, root, skip_invalid=True)
    assert ds.image_ids == [1] and ds.report.skipped == {"duplicate file": 1, "annotation of a skipped image": 1}


def test_no_annotations_warns_that_every_image_is_a_negative(tmp_path, caplog, capsys):
    path, root = _one(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = []
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="boxmask"):
        ds = CocoDataset(path, root)
    assert len(ds) == 1
    assert any("no annotations: every image is a negative" in r.getMessage() for r in caplog.records)
    assert main(["check", str(path), "--images", str(root)]) == 0
    assert "warning: no annotations: every image is a negative" in capsys.readouterr().out
    del data["annotations"]  # a missing list is the same
    path.write_text(json.dumps(data))
    assert CocoDataset(path, root).report.warnings


def test_non_regular_image_file_is_reported_not_read(tmp_path):
    import os

    path, root = _one(tmp_path, write_image=False)
    os.mkfifo(root / "a.png")  # reading it would block forever
    with pytest.raises(DatasetError, match=r"image id 1 \(a.png\): not a regular file"):
        CocoDataset(path, root)


# ---------------------------------------------------------------- images
def _truncated_png(path, shape=(24, 32, 3)):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_check_decodes_every_image(tmp_path, capsys):
    path, root = _one(tmp_path)
    _truncated_png(root / "a.png")
    CocoDataset(path, root)  # the header alone is fine: training does not decode everything up front
    assert main(["check", str(path), "--images", str(root)]) == 2  # its only image: the dataset is empty
    out, err = capsys.readouterr()
    assert f"{path}: image id 1 (a.png): cannot read {root / 'a.png'}: image file is truncated" in out
    assert "the dataset is empty" in err and "1 unreadable image" in err and "Traceback" not in err


def test_check_of_an_all_bad_dataset_lists_every_problem(tmp_path, capsys):
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24, "array": np.zeros((24, 32, 3), np.uint8)}
              for i in (1, 2, 3)]
    path = write_dataset(tmp_path, images, [])
    root = tmp_path / "images"
    (root / "1.png").unlink()
    _truncated_png(root / "2.png")
    (root / "3.png").write_bytes(b"nope")
    assert main(["check", str(path), "--images", str(root), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}: image id ") for line in lines)
    assert "image id 1 (1.png): file not found" in lines[0]
    assert "image id 2 (2.png): cannot read" in lines[1] and "image id 3 (3.png): cannot read" in lines[2]
    assert err.startswith("boxmask: error:") and "the dataset is empty" in err and len(err.splitlines()) == 1


def test_unreadable_image_at_training_time_is_skipped_with_skip_invalid(tmp_path, caplog):
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24, "array": np.full((24, 32, 3), 9 * i, np.uint8)}
              for i in (1, 2)]
    anns = [{"id": i, "image_id": i, "category_id": 3, "bbox": [2, 2, 10, 10]} for i in (1, 2)]
    path = write_dataset(tmp_path, images, anns)
    root = tmp_path / "images"
    _truncated_png(root / "1.png")
    with pytest.raises(DatasetError, match=r"image id 1 \(1.png\): cannot read .*truncated.*skip_invalid"):
        CocoDataset(path, root).load(0)
    ds = CocoDataset(path, root, skip_invalid=True)
    with caplog.at_level("WARNING", logger="boxmask"):
        s = ds.load(0, with_masks=True)
    assert s["image_id"] == 2 and s["image"].max() == 18  # the next readable image instead
    assert any("image id 1 (1.png): cannot read" in r.getMessage() for r in caplog.records)
    assert ds.load(0)["image_id"] == 2
    blank = ds.load(0, with_masks=True, for_eval=True)  # evaluation: its own id, no pixels, objects missed
    assert blank["image_id"] == 1 and blank["image"].shape == (24, 32, 3) and blank["image"].max() == 0
    _truncated_png(root / "2.png")
    with pytest.raises(DatasetError, match="none of the 2 images can be read"):
        CocoDataset(path, root, skip_invalid=True).load(1)


def test_training_skips_an_undecodable_image(tmp_path, capsys, caplog):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64, "array": np.full((64, 64, 3), 40 * i, np.uint8)}
              for i in (1, 2, 3)]
    anns = [{"id": i, "image_id": i, "category_id": 3, "bbox": [8, 8, 30, 20]} for i in (1, 2, 3)]
    path = write_dataset(tmp_path, images, anns)
    root = tmp_path / "images"
    _truncated_png(root / "2.png", (64, 64, 3))
    run = tmp_path / "run"
    args = ["train", "-c", "configs/tiny.yaml", "--train-json", str(path), "--train-images", str(root),
            "--out", str(run), "--max-iters", "2", "--no-progress"]
    assert main(args) == 2 and "image id 2 (2.png): cannot read" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("WARNING", logger="boxmask"):
        assert main(args[:-1] + ["--out", str(tmp_path / "run2"), "data.skip_invalid=true", "data.num_workers=0",
                                 "solver.ims_per_batch=3", "--no-progress"]) == 0
    assert any("skipped:" in r.getMessage() and "image id 2 (2.png): cannot read" in r.getMessage() for r in caplog.records)


def test_float_and_int32_images(tmp_path):
    from PIL import Image

    from boxmask.data.coco import load_image

    path, root = _one(tmp_path, image_updates={"file_name": "a.tif"}, write_image=False)
    Image.fromarray(np.random.default_rng(0).random((24, 32)).astype(np.float32)).save(root / "a.tif")
    with pytest.raises(DatasetError, match=r"image id 1 \(a.tif\): cannot read .*mode F"):
        CocoDataset(path, root)
    wide = (np.arange(24 * 32).reshape(24, 32) * 1000).astype(np.int32)  # beyond 16 bits
    Image.fromarray(wide).save(root / "a.tif")
    with pytest.raises(DatasetError, match=r"image id 1 \(a.tif\): cannot read .*outside 0..65535"):
        CocoDataset(path, root, decode_images=True)
    ok = np.full((24, 32), 30000, np.int32)
    ok[0, 0] = 65535
    Image.fromarray(ok).save(root / "a.tif")
    assert Image.open(root / "a.tif").mode == "I"
    image = CocoDataset(path, root, decode_images=True).load(0)["image"]
    assert image.shape == (24, 32, 3) and image[1, 1].tolist() == [117, 117, 117] and image[0, 0, 0] == 255
    np.testing.assert_array_equal(load_image(root / "a.tif"), image)
