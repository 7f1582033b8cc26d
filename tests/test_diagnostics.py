"""Training diagnostics: spill outside the box, box-shaped masks, runs far too short for their data."""
import json
import logging

import pytest
import torch

from boxmask.cli import main
from boxmask.evaluation.diagnostics import (ap_gap_warning, degenerate_warning, fill_and_spill_from_logits,
                                            fill_from_logits, mask_shape, short_run_warning, spill_warning)

from .test_end_to_end import TINY


def test_spill_counts_the_mask_outside_its_box():
    box = torch.zeros(3, 20, 20)
    box[:, 0:10, 0:10] = 1  # a 100-pixel box
    logits = torch.full((3, 1, 20, 20), -5.0)
    logits[0] = 5.0  # the whole image: fills its box and spills 3 box areas
    logits[1, 0, :10, :10] = 5.0  # exactly the box
    logits[2, 0, 2:8, 2:8] = 5.0  # a shape inside the box
    fill, over, spill = fill_and_spill_from_logits(logits, box)
    assert float(fill) == pytest.approx((1 + 1 + 0.36) / 3) and float(over) == pytest.approx(2 / 3)
    assert float(spill) == pytest.approx(3 / 3)
    assert [float(v) for v in fill_from_logits(logits, box)] == [float(fill), float(over)]
    empty = fill_and_spill_from_logits(torch.zeros(0, 1, 20, 20), torch.zeros(0, 20, 20))
    assert all(v != v for v in empty)


def test_spilling_and_box_shaped_masks_get_distinct_warnings():
    spill = spill_warning(3.0, 1.0)
    assert "spill outside their boxes" in spill and "3.0 box areas" in spill and "box-shaped" not in spill
    assert spill_warning(0.1, 1.0) is None and spill_warning(float("nan"), 1.0) is None
    boxy = degenerate_warning(0.97, 0.9)
    assert "box-shaped" in boxy and "spill" not in boxy
    # the evaluation's box fill is the whole mask area / box area: far above 1 is spill, near 1 a box
    assert mask_shape({"box_fill": 17.6, "box_fill_over_95": 1.0}) == "spill"
    assert mask_shape({"box_fill": 0.98, "box_fill_over_95": 0.9}) == "box"
    assert mask_shape({"box_fill": 0.7, "box_fill_over_95": 0.1}) is None


def test_a_run_far_too_short_is_told_with_numbers():
    msg = short_run_warning(30, 8, 33)
    assert msg.startswith("30 iterations (~7.27 epochs of these 33 images) is far too short")
    assert "about 600 iterations at 8 images per step" in msg and "--max-iters 600" in msg
    assert short_run_warning(600, 8, 33) is None  # the preset's budget (4,800 images seen)
    assert "too short" in short_run_warning(200, 8, 33) and "far" not in short_run_warning(200, 8, 33)
    # large data needs epochs, not a fixed number of images: 12 epochs of 10,000 images
    assert "about 15000 iterations" in short_run_warning(1000, 8, 10000)
    # the AP-gap warning gives that reason instead of a list of possible causes
    m = {"bbox": {"AP": 0.458}, "segm": {"AP": 0.0}, "box_fill": 17.6, "box_fill_over_95": 1.0}
    gap = ap_gap_warning(m, short_run=msg)
    assert "spill outside their boxes (mask area 17.6x the box area)" in gap and msg in gap
    assert "(1)" not in gap and "(1)" in ap_gap_warning(m)


def test_training_warns_about_spill_and_a_short_run(synth_data, tmp_path, caplog, monkeypatch):
    import torch

    import boxmask.engine.trainer as trainer_mod

    # masks that cover the image, as a freshly initialised mask head often gives: spill, not "box-shaped"
    def spilling(aux, stride):
        return torch.tensor(0.97), torch.tensor(0.9), torch.tensor(6.0)

    monkeypatch.setattr(trainer_mod, "train_fill", spilling)
    with caplog.at_level(logging.WARNING, logger="boxmask"):
        assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                     "--train-images", str(synth_data / "images"), "--out", str(tmp_path / "run"),
                     "--max-iters", "6", "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("6 iterations (~1 epochs of these 12 images) is far too short") for w in warnings)
    assert any("spill outside their boxes" in w for w in warnings)
    assert not any("box-shaped" in w for w in warnings)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["box_spill"] > 0.5 for r in recs if r["type"] == "train")
