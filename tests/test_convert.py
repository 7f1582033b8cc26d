"""boxmask convert: Ultralytics data.yaml, category ids shared across formats, VOC flags and sizes,
encodings, clipping, reported leftovers, atomic output, help texts. Every test builds real files."""
import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

from boxmask.cli import build_parser, main
from boxmask.data.coco import CocoDataset


def _image(path, w=100, h=50):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _convert(capsys, *args):
    capsys.readouterr()
    rc = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _voc(filename, objects, width=100, height=50, encoding=None, extra=""):
    decl = f'<?xml version="1.0" encoding="{encoding}"?>\n' if encoding else ""
    objs = "".join(
        f"  <object>\n    <name>{name}</name>{flags}\n"
        f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>\n  </object>\n"
        for name, (x0, y0, x1, y1), flags in objects)
    return (f"{decl}<annotation>\n  <filename>{filename}</filename>{extra}\n"
            f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n{objs}</annotation>\n")


def _ultralytics(root, names_yaml):
    """root/data.yaml, root/images/{train,val}, root/labels/{train,val} (Ultralytics layout)."""
    root.mkdir()
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n\n{names_yaml}")
    for split in ("train", "val"):
        _image(root / "images" / split / f"{split}0.jpg")
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / f"{split}0.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.25 0.25 0.1 0.1\n")


@pytest.mark.parametrize("names_yaml", [
    "names:\n  - cat\n  - dog\n",
    "nc: 2\nnames: ['cat', 'dog']\n",
    "nc: 2\nnames:\n  0: cat\n  1: dog\n",
    "names: {1: dog, 0: cat}\n",
])
def test_yolo_reads_the_names_of_an_ultralytics_data_yaml(tmp_path, capsys, names_yaml):
    root = tmp_path / "ds"
    _ultralytics(root, names_yaml)
    out = tmp_path / "val.json"
    # no --images: the data.yaml's val folder is the one whose labels these are
    rc, text, err = _convert(capsys, "--from", "yolo", root / "labels" / "val", "--names", root / "data.yaml", "--out", out)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [im["file_name"] for im in data["images"]] == ["val0.jpg"]
    assert [a["category_id"] for a in data["annotations"]] == [2, 1]
    assert data["annotations"][0]["bbox"] == pytest.approx([40.0, 15.0, 20.0, 20.0])
    assert "1 cat, 2 dog" in text
    CocoDataset(out, root / "images" / "val")


def test_roboflow_data_yaml_and_names_as_written(tmp_path, capsys):
    # Roboflow's export: train/images, train/labels and "train: ../train/images" (read as Ultralytics does)
    _image(tmp_path / "train" / "images" / "a.jpg")
    (tmp_path / "train" / "labels").mkdir()
    (tmp_path / "train" / "labels" / "a.txt").write_text("2 0.5 0.5 0.2 0.4\n")
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 3\nnames: [no, 1.0, on]\n")
    out = tmp_path / "train.json"
    rc, _, err = _convert(capsys, "--from", "yolo", tmp_path / "train" / "labels", "--names", tmp_path / "data.yaml",
                          "--out", out)
    assert rc == 0, err
    data = json.loads(out.read_text())
    # the names as written, not YAML's False / 1.0 / True
    assert [c["name"] for c in data["categories"]] == ["no", "1.0", "on"] and data["annotations"][0]["category_id"] == 3


def test_data_yaml_errors_and_plain_names_files(tmp_path, capsys):
    root = tmp_path / "ds"
    _ultralytics(root, "nc: 3\nnames: [cat, dog]\n")
    args = ("--from", "yolo", root / "labels" / "train", "--names", root / "data.yaml", "--out", tmp_path / "t.json")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and re.search(r"data\.yaml:5: nc is 3 but 'names' lists 2 classes", err)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  2: dog\n")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and "data.yaml:4: 'names' keys must be the class indices 0..1" in err
    (root / "data.yaml").write_text("path: .\ntrain: images/train\n")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and "without 'names'" in err
    (root / "data.yaml").write_text("names: [cat, dog\n")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and "data.yaml:2: invalid YAML" in err
    assert not (tmp_path / "t.json").exists()
    # a data.yaml under another suffix is still read as one, not as 5 "names"
    (tmp_path / "data.txt").write_text("path: .\ntrain: images/train\nnames: [cat, dog]\n")
    rc, _, err = _convert(capsys, "--from", "yolo", root / "labels" / "train", "--names", tmp_path / "data.txt",
                          "--images", root / "images" / "train", "--out", tmp_path / "t.json")
    assert rc == 0, err
    assert [c["name"] for c in json.loads((tmp_path / "t.json").read_text())["categories"]] == ["cat", "dog"]
    # a plain names file, with a BOM (Windows editors) and CRLF lines: the BOM is not part of 'cat'
    (tmp_path / "classes.txt").write_bytes("\ufeffcat\r\ndog\r\n\r\n".encode("utf-8"))
    rc, _, err = _convert(capsys, "--from", "yolo", root / "labels" / "train", "--names", tmp_path / "classes.txt",
                          "--images", root / "images" / "train", "--out", tmp_path / "t.json")
    assert rc == 0, err
    assert [c["name"] for c in json.loads((tmp_path / "t.json").read_text())["categories"]] == ["cat", "dog"]
    # a blank line inside the names would shift every later class: refused with its line
    (tmp_path / "classes.txt").write_text("cat\n\ndog\n")
    rc, _, err = _convert(capsys, "--from", "yolo", root / "labels" / "train", "--names", tmp_path / "classes.txt",
                          "--images", root / "images" / "train", "--out", tmp_path / "t2.json")
    assert rc == 2 and "classes.txt:2: empty line" in err
    # no data.yaml and no images/ beside labels/: the user is told to give --images
    (tmp_path / "lbl").mkdir()
    rc, _, err = _convert(capsys, "--from", "yolo", tmp_path / "lbl", "--names", tmp_path / "data.txt", "--out",
                          tmp_path / "t2.json")
    assert rc == 2 and "give --images DIR" in err


def _same_data_in_three_formats(tmp_path):
    """One image with a cat and a dog, labelled in VOC, YOLO and LabelMe; names.txt lists dog first."""
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(_voc("a.png", [("cat", (11, 6, 30, 25), ""), ("dog", (41, 6, 60, 25), "")]))
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "a.txt").write_text("1 0.2 0.3 0.2 0.4\n0 0.5 0.3 0.2 0.4\n")
    (tmp_path / "labelme").mkdir()
    doc = {"imagePath": "a.png", "imageWidth": 100, "imageHeight": 50, "shapes": [
        {"label": "cat", "points": [[10, 5], [30, 25]], "shape_type": "rectangle"},
        {"label": "dog", "points": [[40, 5], [60, 25]], "shape_type": "rectangle"}]}
    (tmp_path / "labelme" / "a.json").write_text(json.dumps(doc, indent=1))
    (tmp_path / "names.txt").write_text("dog\ncat\n")


def _ids_by_name(path):
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    return data["categories"], sorted((names[a["category_id"]], a["category_id"]) for a in data["annotations"])


def test_category_ids_agree_across_formats(tmp_path, capsys):
    _same_data_in_three_formats(tmp_path)
    names, images = tmp_path / "names.txt", tmp_path / "images"
    runs = {"voc": [tmp_path / "voc"], "yolo": [tmp_path / "yolo", "--images", images], "labelme": [tmp_path / "labelme"]}
    for fmt, args in runs.items():
        rc, _, err = _convert(capsys, "--from", fmt, *args, "--names", names, "--out", tmp_path / f"{fmt}.json")
        assert rc == 0, err
    expected = ([{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}], [("cat", 2), ("dog", 1)])
    for fmt in runs:
        assert _ids_by_name(tmp_path / f"{fmt}.json") == expected, fmt
    # without --names, VOC and LabelMe sort the labels: documented, and the same for both
    for fmt in ("voc", "labelme"):
        rc, text, _ = _convert(capsys, "--from", fmt, *runs[fmt], "--out", tmp_path / f"{fmt}_sorted.json")
        assert rc == 0 and "sorted label order: 1 cat, 2 dog" in text
        assert _ids_by_name(tmp_path / f"{fmt}_sorted.json")[1] == [("cat", 1), ("dog", 2)]
    # --categories-from reuses an existing json's ids (here the YOLO one) for another format
    (tmp_path / "ref.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 7, "name": "cat", "supercategory": "animal"}, {"id": 3, "name": "dog"}, {"id": 9, "name": "bird"}]}))
    for fmt, args in runs.items():
        extra = ["--names", names] if fmt == "yolo" else []
        rc, _, err = _convert(capsys, "--from", fmt, *args, *extra, "--categories-from", tmp_path / "ref.json",
                              "--out", tmp_path / f"{fmt}_ref.json")
        assert rc == 0, err
        cats, pairs = _ids_by_name(tmp_path / f"{fmt}_ref.json")
        assert pairs == [("cat", 7), ("dog", 3)] and [c["id"] for c in cats] == [7, 3, 9]
    # a label the names (or the existing json) do not have: an error naming the file and line
    (tmp_path / "voc" / "a.xml").write_text(_voc("a.png", [("cat", (11, 6, 30, 25), ""), ("bird", (41, 6, 60, 25), "")]))
    rc, _, err = _convert(capsys, "--from", "voc", tmp_path / "voc", "--names", names, "--out", tmp_path / "x.json")
    assert rc == 2 and re.search(r"a\.xml:8: label 'bird' is not one of the 2 categories of .*names\.txt", err)
    (tmp_path / "names.txt").write_text("dog\ncat\nfox\n")
    rc, _, err = _convert(capsys, "--from", "yolo", *runs["yolo"], "--names", names, "--categories-from",
                          tmp_path / "ref.json", "--out", tmp_path / "x.json")
    assert rc == 2 and re.search(r"names\.txt:3: class 'fox' is not one of the 3 categories of .*ref\.json", err)
    assert not (tmp_path / "x.json").exists()


def test_voc_difficult_truncated_and_sizes_from_images(tmp_path, capsys):
    voc = tmp_path / "VOC" / "Annotations"
    voc.mkdir(parents=True)
    _image(tmp_path / "VOC" / "JPEGImages" / "b.jpg", 80, 60)
    (voc / "a.xml").write_text(_voc("a.jpg", [("cat", (11, 6, 30, 25), "<difficult>1</difficult><truncated>0</truncated>"),
                                              ("cat", (1, 1, 20, 20), "<truncated>1</truncated>")]))
    (voc / "b.xml").write_text(_voc("b.jpg", [("dog", (5, 5, 40, 40), "<difficult>0</difficult>")], width=0, height=0))
    out = tmp_path / "voc.json"
    rc, text, err = _convert(capsys, "--from", "voc", voc, "--out", out)
    assert rc == 0, err
    data = json.loads(out.read_text())
    a, b, c = data["annotations"]
    assert a["attributes"] == {"difficult": True} and a["iscrowd"] == 0
    assert b["attributes"] == {"truncated": True} and "attributes" not in c
    assert "1 difficult objects: kept" in text and "1 truncated objects" in text
    assert data["images"][1] == {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60}  # read from the image
    assert "1 images had no size" in text
    rc, text, _ = _convert(capsys, "--from", "voc", voc, "--difficult", "crowd", "--out", out)
    assert rc == 0 and "as crowd regions" in text
    assert [a["iscrowd"] for a in json.loads(out.read_text())["annotations"]] == [1, 0, 0]
    # no image to read the size from: an error naming the XML line, which says what to give
    (tmp_path / "VOC" / "JPEGImages" / "b.jpg").rename(tmp_path / "b.jpg")
    rc, _, err = _convert(capsys, "--from", "voc", voc, "--out", tmp_path / "x.json")
    assert rc == 2 and re.search(r"b\.xml:3: image size 0x0 is missing or zero and the image 'b\.jpg' was not found", err)
    rc, _, err = _convert(capsys, "--from", "voc", voc, "--images", tmp_path, "--out", tmp_path / "x.json")
    assert rc == 0, err
    # two XML files for one image
    (voc / "c.xml").write_text(_voc("a.jpg", [("cat", (1, 1, 9, 9), "")]))
    rc, _, err = _convert(capsys, "--from", "voc", voc, "--images", tmp_path, "--out", tmp_path / "y.json")
    assert rc == 2 and re.search(r"c\.xml:2: <filename> 'a\.jpg' is also described by .*a\.xml:2", err)
    assert not (tmp_path / "y.json").exists()


def test_voc_encodings(tmp_path, capsys):
    voc = tmp_path / "xml"
    voc.mkdir()
    (voc / "a.xml").write_bytes(_voc("caf\u00e9.jpg", [("p\u00e2te", (1, 1, 9, 9), "")], encoding="ISO-8859-1").encode("latin-1"))
    (voc / "b.xml").write_bytes(_voc("b.jpg", [("\u732b", (1, 1, 9, 9), "")], encoding="GBK").encode("gbk"))
    (voc / "c.xml").write_bytes(b"\xef\xbb\xbf" + _voc("c.jpg", [("p\u00e2te", (1, 1, 9, 9), "")]).encode("utf-8"))
    rc, _, err = _convert(capsys, "--from", "voc", voc, "--out", tmp_path / "o.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "o.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["p\u00e2te", "\u732b"]
    assert data["images"][0]["file_name"] == "caf\u00e9.jpg"
    # undeclared Latin-1 is not UTF-8: an error with its line, not replacement characters
    (voc / "c.xml").write_bytes(_voc("c.jpg", [("p\u00e2te", (1, 1, 9, 9), "")]).encode("latin-1"))
    rc, _, err = _convert(capsys, "--from", "voc", voc, "--out", tmp_path / "o.json")
    assert rc == 2 and re.search(r"c\.xml:5: not valid utf-8 text \(byte 0xe2", err)


def test_yolo_leftovers_binary_labels_and_clipping(tmp_path, capsys):
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "sub" / "b.png")
    _image(tmp_path / "images" / "c.png")
    (tmp_path / "labels" / "sub").mkdir(parents=True)
    # a box reaching past the right edge, and one label file per image, in the images' subfolders
    (tmp_path / "labels" / "a.txt").write_text("0 0.95 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "sub" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "gone.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "classes.txt").write_text("cat\n")  # LabelImg writes it there
    args = ("--from", "yolo", tmp_path / "labels", "--names", tmp_path / "labels" / "classes.txt", "--out", tmp_path / "o.json")
    rc, text, err = _convert(capsys, *args)  # no --images: images/ beside labels/
    assert rc == 0, err
    assert "1 label files have no image" in err and "gone.txt" in err and "classes.txt" not in err
    assert "1 of 2 boxes extended past the image edge and were clipped" in err
    assert "1 images have no label file" in text
    data = json.loads((tmp_path / "o.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["a.png", "c.png", "sub/b.png"]
    assert data["annotations"][0]["bbox"] == pytest.approx([85.0, 20.0, 15.0, 10.0])
    assert data["annotations"][1]["image_id"] == 3
    # a binary label file: a one-line error naming it
    (tmp_path / "labels" / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and re.fullmatch(r"boxmask: error: \S*a\.txt: a binary file, not text\n", err)
    (tmp_path / "labels" / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2 \xe9\n")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and re.fullmatch(r"boxmask: error: \S*a\.txt:1: not valid utf-8-sig text .*\n", err)
    # a BOM at the start of a label file is not part of its first class index
    (tmp_path / "labels" / "a.txt").write_bytes("\ufeff0 0.5 0.5 0.2 0.2\n".encode("utf-8"))
    assert _convert(capsys, *args)[0] == 0
    # two images sharing one label file
    _image(tmp_path / "images" / "a.jpg")
    rc, _, err = _convert(capsys, *args)
    assert rc == 2 and "a.txt: the label file of two images" in err


def test_clipping_voc_and_labelme(tmp_path, capsys):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(_voc("a.jpg", [("cat", (0, -5, 120, 30), ""), ("cat", (1, 1, 10, 10), "")]))
    rc, _, err = _convert(capsys, "--from", "voc", tmp_path / "voc", "--out", tmp_path / "v.json")
    assert rc == 0 and "1 of 2 boxes extended past the image edge" in err
    assert json.loads((tmp_path / "v.json").read_text())["annotations"][0]["bbox"] == [0.0, 0.0, 100.0, 30.0]
    (tmp_path / "voc" / "a.xml").write_text(_voc("a.jpg", [("cat", (150, 5, 160, 30), "")]))
    rc, _, err = _convert(capsys, "--from", "voc", tmp_path / "voc", "--out", tmp_path / "v2.json")
    assert rc == 2 and re.search(r"a\.xml:4: box .* lies outside the 100x50 image", err)
    (tmp_path / "lm").mkdir()
    doc = {"imagePath": "im.png", "imageWidth": 40, "imageHeight": 30, "shapes": [
        {"label": "leaf", "points": [[-4, 3], [20, 5], [10, 40]], "shape_type": "polygon"}]}
    (tmp_path / "lm" / "im.json").write_text(json.dumps(doc, indent=1))
    out = tmp_path / "lm" / "coco.json"  # beside the LabelMe files: not read back as one on the next run
    for _ in range(2):
        rc, _, err = _convert(capsys, "--from", "labelme", tmp_path / "lm", "--out", out)
        assert rc == 0 and "1 of 1 boxes extended past the image edge" in err, err
    a = json.loads(out.read_text())["annotations"][0]
    assert a["segmentation"] == [[0.0, 3.0, 20.0, 5.0, 10.0, 30.0]] and a["bbox"] == [0.0, 3.0, 20.0, 27.0]
    doc["shapes"][0]["points"] = [[1, 1], [5, 5], [9, 9]]
    (tmp_path / "lm" / "im.json").write_text(json.dumps(doc, indent=1))
    rc, _, err = _convert(capsys, "--from", "labelme", tmp_path / "lm", "--out", out)
    assert rc == 2 and re.search(r"im\.json:\d+: the polygon has no area .*collinear", err)
    doc["shapes"][0]["points"] = [[1, 1], [5, 1], [9, 9]]
    (tmp_path / "lm" / "im.json").write_text(json.dumps(doc, indent=1))
    (tmp_path / "lm" / "copy.json").write_text(json.dumps(doc, indent=1))
    rc, _, err = _convert(capsys, "--from", "labelme", tmp_path / "lm", "--out", out)
    assert rc == 2 and "imagePath 'im.png' is also described by" in err


def test_nothing_written_on_error(tmp_path, capsys):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(_voc("a.jpg", [("cat", (1, 1, 9, 9), "")]))
    (tmp_path / "voc" / "b.xml").write_text(_voc("b.jpg", [("cat", (1, 1, "x", 9), "")]))
    out = tmp_path / "out.json"
    out.write_text("previous")
    rc, text, err = _convert(capsys, "--from", "voc", tmp_path / "voc", "--out", out)
    assert rc == 2 and re.fullmatch(r"boxmask: error: \S*b\.xml:4: <xmax>: expected a number, got 'x'\n", err)
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "voc"]
    rc, _, err = _convert(capsys, "--from", "voc", tmp_path / "voc", "--out", tmp_path / "voc")
    assert rc == 2 and "is a folder" in err
    rc, _, err = _convert(capsys, "--from", "labelme", tmp_path / "voc", "--difficult", "crowd", "--out", out)
    assert rc == 2 and "--difficult applies to --from voc only" in err
    rc, _, err = _convert(capsys, "--from", "yolo", tmp_path / "voc", "--out", out)
    assert rc == 2 and "--from yolo needs --names" in err
    assert out.read_text() == "previous"


def test_convert_help_covers_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    convert = sub.choices["convert"]
    actions = [a for a in convert._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in actions} >= {"src", "fmt", "out", "images", "names", "categories_from", "difficult"}
    for a in actions:
        assert a.help and a.help != argparse.SUPPRESS, a.dest
    assert "sorted order" in convert.description and "--categories-from" in convert.description
