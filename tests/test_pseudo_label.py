"""Pseudo-mask quality that a filled box cannot pass, the filled-box baseline, and the pictures."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from boxmask.cli import main
from boxmask.data.coco import CocoDataset
from boxmask.modeling.condinst import encode_rle
from boxmask.pseudo_label import compare_with_gt, gt_comparison_line, mask_quality

from .conftest import rle, write_dataset
from .test_end_to_end import TINY


def _box(h=40, w=40, y0=10, y1=30, x0=5, x1=35):
    box = torch.zeros(h, w, dtype=torch.bool)
    box[y0:y1, x0:x1] = True
    return box


def _ellipse(h=40, w=40, cy=19.5, cx=19.5, ry=10.0, rx=15.0, inside=0.95, outside=0.02):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    e = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    return torch.where(e, inside, outside)


def test_quality_on_hand_made_masks():
    box = _box()
    good = mask_quality(_ellipse(), box)  # an ellipse touching its box on every side
    assert good["quality"] > 0.8
    assert 0.7 < good["fill"] < 0.85 and good["spill"] == 0 and good["projection"] == 1 and good["stability"] == 1
    # the filled box, confident as a model that learnt only boxes: the old mean probability gave it 1.0
    filled = mask_quality(box.float() * 0.99, box)
    assert filled["fill"] == 1 and filled["quality"] < 0.05
    # a mask over the whole image (cropped to its box it would be the box): spill
    spilling = mask_quality(torch.full((40, 40), 0.9), box)
    assert spilling["spill"] > 1 and spilling["quality"] == 0
    # a good shape that runs past the box: some spill, lower quality
    past = mask_quality(_ellipse(rx=20.0), box)
    assert past["spill"] > 0.1 and past["quality"] < good["quality"] - 0.1
    # the left half of the object only: half the columns untouched
    half = _ellipse().clone()
    half[:, 20:] = 0.0
    assert mask_quality(half, box)["projection"] == pytest.approx(0.5, abs=0.04)
    assert mask_quality(half, box)["quality"] < 0.6
    # probabilities hovering at the threshold: the mask changes with it
    unsure = mask_quality(_ellipse(inside=0.55, outside=0.45), box)
    assert unsure["stability"] == 0 and unsure["quality"] == 0


def test_filled_box_baseline_beside_the_pseudo_mIoU(tmp_path):
    gt = (_ellipse().numpy() > 0.5).astype(np.uint8)
    path = write_dataset(tmp_path, [{"id": 1, "file_name": "a.png", "width": 40, "height": 40,
                                     "array": np.zeros((40, 40, 3), np.uint8)}],
                         [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [5, 10, 30, 20], "area": 1, "iscrowd": 0,
                           "segmentation": rle(gt)}])
    ds = CocoDataset(path, tmp_path / "images")
    as_boxes = {5: {"segmentation": encode_rle(_box())}}
    cmp = compare_with_gt(ds, as_boxes)
    assert cmp["pseudo_mIoU"] == pytest.approx(cmp["box_mIoU"]) and cmp["objects"] == 1
    assert "filled boxes would score" in gt_comparison_line(cmp, path)
    assert "no better than the boxes" in gt_comparison_line(cmp, path)
    shaped = compare_with_gt(ds, {5: {"segmentation": rle(gt)}})
    assert shaped["pseudo_mIoU"] == pytest.approx(1.0) and shaped["box_mIoU"] < 0.9
    assert "add +" in gt_comparison_line(shaped, path)


@pytest.fixture(scope="module")
def short_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pq") / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "2", "--no-progress"]) == 0
    return out


def test_a_short_run_gives_box_masks_that_are_flagged(short_run, synth_data, tmp_path, capsys, monkeypatch):
    import boxmask.pseudo_label as pl

    # what an early mask head often gives: masks covering the whole image (box-shaped once cropped, spilling)
    real = pl.paste_probs
    monkeypatch.setattr(pl, "paste_probs", lambda *a, **k: torch.ones_like(real(*a, **k)))
    out = tmp_path / "masks.json"
    capsys.readouterr()
    assert main(["pseudo-label", str(short_run), "--json", str(synth_data / "train_full.json"), "--images",
                 str(synth_data / "images"), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--min-quality", "0.6", "--viz", "3"]) == 0
    text = capsys.readouterr().out
    anns = json.loads(out.read_text())["annotations"]
    for a in anns:
        assert {"pseudo_quality", "pseudo_fill", "pseudo_spill", "pseudo_projection", "pseudo_stability"} <= set(a)
        assert a.get("pseudo_box_shaped", False) == (a["pseudo_fill"] > 0.95)
        if a.get("pseudo_box_shaped") or a["pseudo_spill"] > 0.5:
            assert a["pseudo_quality"] < 0.6 and a["pseudo_low_quality"]
    shaped = sum(bool(a.get("pseudo_box_shaped")) and "pseudo_fallback" not in a for a in anns)
    low = sum(bool(a.get("pseudo_low_quality")) for a in anns)
    assert shaped > 0 and f"{shaped} of the" in text and f"{low} below --min-quality 0.6" in text
    assert re.search(r"mIoU [0-9.]+; filled boxes would score [0-9.]+", text)
    # the pictures: worst quality first, beside --out
    pics = sorted((tmp_path / "masks_viz").glob("*.png"))
    assert len(pics) == 3 and "3 pictures" in text and pics[0].name.startswith("001_")
    qs = [float(re.search(r"quality([0-9.]+)\.png", p.name).group(1)) for p in pics]
    assert qs == sorted(qs)
    im = np.asarray(Image.open(pics[0]))
    assert im.ndim == 3 and im.shape[1] > 2 * 64  # the photo beside its masks, upscaled to be legible
    # --viz-out, and a bad --viz value is a one-line error
    assert main(["pseudo-label", str(short_run), "--json", str(synth_data / "train.json"), "--images",
                 str(synth_data / "images"), "--out", str(tmp_path / "m2.json"), "--device", "cpu", "--no-progress",
                 "--viz", "1", "--viz-out", str(tmp_path / "pics")]) == 0
    assert len(list((tmp_path / "pics").glob("*.png"))) == 1
    assert "filled boxes" not in capsys.readouterr().out  # no GT masks in train.json
    with pytest.raises(SystemExit) as e:  # refused by the parser, before anything runs
        main(["pseudo-label", str(short_run), "--json", str(synth_data / "train.json"), "--images",
              str(synth_data / "images"), "--out", str(tmp_path / "m3.json"), "--viz", "-1"])
    assert e.value.code == 2
    assert not (tmp_path / "m3.json").exists()


def test_pseudo_label_out_must_be_a_new_json_file(tmp_path, capsys):
    from boxmask.cli import main

    src = tmp_path / "in.json"
    src.write_text("{}")
    for out in (tmp_path, src):
        assert main(["pseudo-label", str(tmp_path / "none.pth"), "--json", str(src), "--images", str(tmp_path),
                     "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("boxmask: error: --out") and err.count("\n") == 1
    assert src.read_text() == "{}"
