"""Copy-paste: the memory bank, object selection, the annotation update and the paste loss."""
import pytest
import torch

from boxmask.config import load_config
from boxmask.modeling.condinst import CondInst
from boxmask.modeling.sim.copy_paste import MemoryBank, box_pixel_masks, paste_batch, select_objects
from boxmask.modeling.sim.method import SIM

from .test_end_to_end import TINY


def _entry_image(value: int, h: int = 20, w: int = 20) -> torch.Tensor:
    return torch.full((3, h, w), value, dtype=torch.uint8)


def _push(bank: MemoryBank, value: int, boxes, masks, scores=None, h: int = 20, w: int = 20) -> None:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.ones(len(boxes)) if scores is None else torch.tensor(scores, dtype=torch.float32)
    bank.push(_entry_image(value, h, w), boxes, torch.zeros(len(boxes), dtype=torch.long), masks, scores)


def test_bank_is_fifo_and_bounded():
    bank = MemoryBank(3)
    for v in range(5):
        _push(bank, v, [[0, 0, 4, 4]], box_pixel_masks(torch.tensor([[0.0, 0, 4, 4]]), 20, 20))
    assert len(bank) == 3 and bank.full()
    assert [int(e["image"][0, 0, 0]) for e in bank.entries] == [2, 3, 4]


def test_bank_entries_never_alias_the_batch_or_each_other():
    bank = MemoryBank(4)
    image = _entry_image(7)
    masks = box_pixel_masks(torch.tensor([[2.0, 2, 10, 10]]), 20, 20)
    boxes = torch.tensor([[2.0, 2, 10, 10]])
    for _ in range(2):
        bank.push(image, boxes, torch.zeros(1, dtype=torch.long), masks, torch.ones(1))
    image.fill_(0)
    masks.fill_(False)
    boxes.fill_(0)
    a, b = bank.entries
    assert a["image"].data_ptr() != b["image"].data_ptr() and a["masks"][0].data_ptr() != b["masks"][0].data_ptr()
    assert int(a["image"].min()) == 7 and bool(a["masks"][0].all()) and a["boxes"][0].tolist() == [2, 2, 10, 10]
    # the crop is the tight box and puts the mask back where it was
    assert a["masks"][0].shape == (8, 8) and a["offsets"][0].tolist() == [2, 2]
    full = MemoryBank.object_mask(a, 0, 20, 20)
    assert torch.equal(full, box_pixel_masks(torch.tensor([[2.0, 2, 10, 10]]), 20, 20)[0])


def test_selection_without_replacement_never_repeats_and_skips_zero_scores():
    scores = torch.tensor([0.9, 0.0, 0.5, 0.2, 0.7, 0.0, 0.3, 0.8, 0.1, 0.6, 0.4, 0.05])
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        idx = select_objects(scores, 0.25, 1, 3, False, 1.0, g).tolist()
        assert len(idx) == 3 and len(set(idx)) == 3  # floor(12/4) = 3
        assert all(scores[i] > 0 for i in idx)
    g = torch.Generator().manual_seed(0)
    assert len(select_objects(torch.tensor([0.5, 0.0]), 0.25, 1, 3, False, 1.0, g)) == 1  # clamped up to 1
    assert len(select_objects(torch.tensor([0.0, 0.0]), 0.25, 1, 3, False, 1.0, g)) == 0
    # with replacement (released code): repeats allowed, count not limited by the valid objects
    assert len(select_objects(torch.tensor([0.5, 0.0, 0.0, 0.0]), 0.5, 1, 3, True, 3.0, g)) == 2


def _batch(boxes, h=20, w=20):
    return {"images": torch.zeros(1, 3, h, w, dtype=torch.uint8), "image_sizes": [(h, w)], "orig_sizes": [(h, w)],
            "image_ids": [1], "targets": [{"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                           "labels": torch.ones(len(boxes), dtype=torch.long)}]}


def test_paste_shrinks_the_box_underneath_to_what_remains():
    bank = MemoryBank(1)
    # a 20x20 bank image with one object covering columns 8..15 of every row
    paste = box_pixel_masks(torch.tensor([[8.0, 0, 16, 20]]), 20, 20)
    _push(bank, 200, [[8, 0, 16, 20]], paste)
    batch = _batch([[2, 2, 12, 12]])
    out = paste_batch(batch, bank, torch.Generator().manual_seed(0))
    t = out["targets"][0]
    assert t["boxes"].tolist() == [[2, 2, 8, 12], [8, 0, 16, 20]]
    assert t["labels"].tolist() == [1, 0] and t["pasted"].tolist() == [False, True]
    region = out["region_masks_padded"][0]
    assert int(region[0].sum()) == 6 * 10 and torch.equal(region[1], paste[0])
    # pixels are copied under the paste mask only, and the input batch is untouched
    assert int(out["images"][0, 0, 5, 10]) == 200 and int(out["images"][0, 0, 5, 5]) == 0
    assert int(batch["images"].max()) == 0 and batch["targets"][0]["boxes"].tolist() == [[2, 2, 12, 12]]


def test_fully_covered_object_is_dropped_and_paste_is_cropped_to_the_image():
    bank = MemoryBank(1)
    # bank image larger than the target: the paste mask is cropped to the target's size
    _push(bank, 99, [[0, 0, 30, 30]], box_pixel_masks(torch.tensor([[0.0, 0, 30, 30]]), 30, 30), h=30, w=30)
    out = paste_batch(_batch([[2, 2, 12, 12], [5, 5, 18, 9]]), bank, torch.Generator().manual_seed(0))
    t = out["targets"][0]
    assert t["boxes"].tolist() == [[0, 0, 20, 20]] and t["pasted"].tolist() == [True]
    assert out["region_masks_padded"][0].shape == (1, 20, 20)


def test_nothing_pasteable_returns_the_batch_itself():
    bank = MemoryBank(1)
    _push(bank, 1, [[0, 0, 4, 4]], torch.zeros(1, 20, 20, dtype=torch.bool))  # empty paste mask: score 0
    batch = _batch([[2, 2, 12, 12]])
    assert paste_batch(batch, bank, torch.Generator().manual_seed(0)) is batch


def _sim_cfg(extra=()):
    return load_config("configs/tiny.yaml", ["method=sim"] + TINY + list(extra))


def test_paste_loss_only_weighs_pasted_objects():
    cfg = _sim_cfg()
    sim = SIM(cfg, CondInst(cfg, 2), 2)
    region = torch.zeros(2, 8, 8)
    region[:, 2:6, 2:6] = 1
    batch = {"region_masks_padded": [], "targets": [{"pasted": torch.tensor([False, True])}]}
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    aux = {"mask_logits": logits, "box_masks": region[[0, 1, 1]], "inst": {"gt_global": torch.tensor([0, 1, 1])}}
    loss = sim._paste_loss(batch, aux)
    loss.backward()
    assert loss > 0 and torch.all(logits.grad[0] == 0) and logits.grad[1:].abs().sum() > 0
    batch["targets"][0]["pasted"] = torch.tensor([False, False])
    assert float(sim._paste_loss(batch, aux).detach()) == 0.0


def test_bank_survives_a_state_dict_round_trip():
    cfg = _sim_cfg(["sim.bank_length=2"])
    sim = SIM(cfg, CondInst(cfg, 2), 2)
    _push(sim.bank, 3, [[1, 1, 6, 6], [0, 0, 2, 2]], box_pixel_masks(torch.tensor([[1.0, 1, 6, 6], [0, 0, 2, 2]]), 20, 20),
          [0.8, 0.3])
    state = sim.state_dict()
    other = SIM(cfg, CondInst(cfg, 2), 2)
    other.load_state_dict(state)
    a, b = sim.bank.entries[0], other.bank.entries[0]
    assert len(other.bank) == 1
    for k in ("image", "boxes", "labels", "offsets", "scores"):
        assert torch.equal(a[k], b[k])
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))


@pytest.mark.parametrize("bad", ["sim.bank_length=0", "sim.paste_prob=1.5", "sim.paste_min=4"])
def test_bad_copy_paste_settings_are_rejected(bad):
    from boxmask.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        _sim_cfg([bad])


def test_switch_on_does_not_depend_on_the_pseudo_weight():
    from boxmask.modeling.criterion import pseudo_weight, sim_switched_on

    cfg = _sim_cfg(["sim.pseudo_weight=0", "sim.warmup_frac=0.5", "solver.max_iters=10"])
    assert not sim_switched_on(cfg, 4) and sim_switched_on(cfg, 5) and pseudo_weight(cfg, 5) == 0.0
    assert not sim_switched_on(load_config("configs/tiny.yaml", ["method=boxinst"] + TINY), 10 ** 6)


def test_bank_fills_and_pastes_with_the_pseudo_weight_at_zero(synth_data, tmp_path):
    """Copy-paste alone (sim.pseudo_weight=0): the bank still fills after the warm-up and objects get pasted."""
    import json

    from boxmask.cli import main
    from boxmask.engine.checkpoint import load_checkpoint

    out = tmp_path / "run"
    args = ["train", "-c", "configs/tiny.yaml", *TINY, "sim.pseudo_weight=0", "sim.warmup_frac=0.25", "sim.bank_length=2",
            "sim.paste_prob=1.0", "sim.fg_thresh=0.01", "--method", "sim", "--train-json", str(synth_data / "train.json"),
            "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "4", "--no-progress"]
    assert main(args) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert all(r["loss_pseudo"] == 0.0 for r in records)
    assert records[-1]["loss_paste"] > 0  # the bank filled and its objects were pasted and supervised
    assert len(load_checkpoint(out)["sim"]["bank._extra_state"]["entries"]) == 2


def test_pasted_objects_never_reenter_the_bank():
    """A composite's pasted objects go into the bank with an empty mask and score 0 (never drawn again);
    the objects underneath keep their visible part."""
    cfg = _sim_cfg(["sim.bank_length=4", "sim.fg_thresh=0.5"])
    sim = SIM(cfg, CondInst(cfg, 2), 2)
    _push(sim.bank, 200, [[8, 0, 16, 20]], box_pixel_masks(torch.tensor([[8.0, 0, 16, 20]]), 20, 20))
    batch = paste_batch(_batch([[2, 2, 12, 12]]), sim.bank, torch.Generator().manual_seed(0))
    assert batch["targets"][0]["pasted"].tolist() == [False, True]
    boxes = batch["targets"][0]["boxes"]
    h, w = 5, 5  # the mask grid (stride 4) of the 20 x 20 image
    aux = {"gt_boxes": boxes, "gt_labels": batch["targets"][0]["labels"], "gt_counts": [2]}
    pm = {"m_i": torch.ones(2, h, w)}  # the teacher is sure of both objects everywhere
    sim._fill_bank(batch, aux, pm)
    entry = sim.bank.entries[-1]
    assert entry["scores"][1] == 0 and entry["masks"][1].numel() == 0  # the pasted object
    assert entry["scores"][0] > 0
    visible = MemoryBank.object_mask(entry, 0, 20, 20)
    assert torch.equal(visible, batch["region_masks_padded"][0][0])  # the box minus the pasted pixels
    for seed in range(50):
        assert select_objects(entry["scores"], 1.0, 1, 3, False, 1.0, torch.Generator().manual_seed(seed)).tolist() == [0]


def test_pseudo_loss_leaves_out_pasted_and_mask_supervised_objects():
    """A pasted object is supervised by the paste loss and a mask-supervised one by its GT Dice: the pseudo
    loss would count them twice."""
    batch = {"region_masks_padded": [], "targets": [{"pasted": torch.tensor([False, False, True])}]}
    aux = {"inst": {"gt_global": torch.tensor([0, 0, 1, 2, 2])}}
    assert SIM._pseudo_supervised(batch, aux).tolist() == [1, 1, 1, 0, 0]
    aux["has_mask"] = torch.tensor([False, False, True, False, False])
    assert SIM._pseudo_supervised(batch, aux).tolist() == [1, 1, 0, 0, 0]
    assert SIM._pseudo_supervised({"targets": []}, {"inst": aux["inst"]}) is None  # boxes only: every instance
