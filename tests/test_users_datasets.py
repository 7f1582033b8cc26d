"""Users' own datasets: mixed mask/box supervision, box-fill diagnostics, batch-size scaling, category sets."""
import json
import logging

import pytest
import torch
import yaml

from boxmask.cli import main
from boxmask.config import ConfigError, load_config, scale_for_batch
from boxmask.data.coco import CocoDataset
from boxmask.data.synth import partial_masks
from boxmask.engine.trainer import uses_gt_masks
from boxmask.evaluation.diagnostics import ap_gap_warning, degenerate_warning, fill_from_logits, fill_of_fills
from boxmask.modeling.condinst import CondInst

from .test_end_to_end import TINY


def _batch_and_inst(has_mask):
    """One 32x32 image with two objects: a GT mask for object 0 (a 4x4 square inside its box)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 4, 20, 20], [12, 8, 30, 28]])
    gt = torch.zeros(2, 32, 32, dtype=torch.uint8)
    gt[0, 8:16, 8:16] = 1
    gt[1, 8:28, 12:30] = 1
    batch = {"images": images, "image_sizes": [(32, 32)], "orig_sizes": [(32, 32)], "gt_masks_padded": [gt],
             "targets": [{"boxes": boxes, "labels": torch.tensor([0, 1]), "has_mask": torch.tensor(has_mask)}]}
    inst = {"image": torch.tensor([0, 0]), "gt_global": torch.tensor([0, 1]), "box": boxes}
    return batch, inst


def _only(batch, inst, k, keep_masks):
    b = {**batch, "targets": [{"boxes": batch["targets"][0]["boxes"][k:k + 1],
                               "labels": batch["targets"][0]["labels"][k:k + 1]}]}
    if keep_masks:
        b["gt_masks_padded"] = [batch["gt_masks_padded"][0][k:k + 1]]
    else:
        b.pop("gt_masks_padded")
    return b, {"image": inst["image"][:1], "gt_global": torch.tensor([0]), "box": inst["box"][k:k + 1]}


def test_mixed_batch_gives_each_object_its_own_supervision():
    cfg_box = load_config("configs/tiny.yaml", ["method=boxinst", "loss.bottom_pixels_removed=0"] + TINY)
    cfg_full = load_config("configs/tiny.yaml", ["method=full", "loss.bottom_pixels_removed=0"] + TINY)
    model, full = CondInst(cfg_box, 2), CondInst(cfg_full, 2)
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    batch, inst = _batch_and_inst([True, False])
    mixed, _ = model._mask_losses(logits, batch, inst)
    ref_mask, _ = full._mask_losses(logits[:1], *_only(batch, inst, 0, True))
    ref_box, _ = model._mask_losses(logits[1:], *_only(batch, inst, 1, False))
    assert torch.allclose(mixed["loss_mask"], ref_mask["loss_mask"])
    assert torch.allclose(mixed["loss_proj"], ref_box["loss_proj"])
    assert torch.allclose(mixed["loss_pairwise"], ref_box["loss_pairwise"])
    # no GT mask at all: pure box losses over both objects and a zero mask term
    batch, inst = _batch_and_inst([False, False])
    none, _ = model._mask_losses(logits, batch, inst)
    plain, _ = model._mask_losses(logits, {k: v for k, v in batch.items() if k != "gt_masks_padded"}, inst)
    assert float(none["loss_mask"]) == 0.0 and torch.allclose(none["loss_proj"], plain["loss_proj"])


def test_partial_json_and_gt_masks_ignore(synth_data, tmp_path):
    full = json.loads((synth_data / "train_full.json").read_text())
    part = partial_masks(full, 0.25, seed=0)
    assert part == partial_masks(full, 0.25, seed=0)  # deterministic
    n = len(full["annotations"])
    assert sum("segmentation" in a for a in part["annotations"]) == round(0.25 * n)
    assert [a["id"] for a in part["annotations"]] == [a["id"] for a in full["annotations"]]
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    ds = CocoDataset(path, synth_data / "images")
    assert ds.mask_counts() == (round(0.25 * n), n - round(0.25 * n))
    use = load_config("configs/tiny.yaml", ["method=sim"])
    ignore = load_config("configs/tiny.yaml", ["method=sim", "data.gt_masks=ignore"])
    assert uses_gt_masks(use, ds) and not uses_gt_masks(ignore, ds)
    sample = ds.load(0, with_masks=True)
    assert sample["has_mask"].dtype == bool and len(sample["has_mask"]) == len(sample["boxes"])


def test_mixed_sim_run_logs_the_supervision_split(synth_data, tmp_path, caplog):
    part = partial_masks(json.loads((synth_data / "train_full.json").read_text()), 0.5, seed=0)
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    with caplog.at_level(logging.INFO, logger="boxmask"):
        assert main(["train", "-c", "configs/tiny.yaml", *TINY, "sim.warmup_frac=0.25", "--method", "sim",
                     "--train-json", str(path), "--train-images", str(synth_data / "images"),
                     "--out", str(tmp_path / "run"), "--max-iters", "3", "--no-progress"]) == 0
    assert any("mask-supervised" in r.getMessage() and "box-supervised" in r.getMessage() for r in caplog.records)
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "loss_mask" in rec and "box_fill" in rec and "box_fill_over_95" in rec


def test_fill_statistics_on_hand_made_masks():
    box = torch.zeros(2, 10, 10)
    box[:, 0:10, 0:10] = 1
    logits = torch.full((2, 1, 10, 10), -5.0)
    logits[0, 0, :5, :] = 5.0  # half the box
    logits[1, 0] = 5.0  # all of it
    mean, over = fill_from_logits(logits, box)
    assert float(mean) == pytest.approx(0.75) and float(over) == pytest.approx(0.5)
    assert fill_of_fills([0.5, 1.0, 0.97, 0.2]) == (pytest.approx(0.6675), pytest.approx(0.5))
    assert degenerate_warning(0.97, 0.9) and "pairwise" in degenerate_warning(0.97, 0.9)
    assert degenerate_warning(0.7, 0.9) is None and degenerate_warning(0.97, 0.0) is None
    assert ap_gap_warning({"bbox": {"AP": 0.4}, "segm": {"AP": 0.05}, "box_fill": 0.98})
    assert ap_gap_warning({"bbox": {"AP": 0.4}, "segm": {"AP": 0.3}}) is None


def test_linear_scaling_rule():
    cfg = load_config("configs/boxinst_R50_1x.yaml", ["solver.ims_per_batch=4"])
    scaled, msg = scale_for_batch(cfg, world_size=2)  # effective 8 = half the reference 16
    assert scaled.solver.lr == pytest.approx(0.005) and scaled.solver.max_iters == 180000
    assert scaled.solver.steps == [120000, 160000] and scaled.solver.warmup_iters == 2000
    assert "lr 0.01 -> 0.005" in msg and cfg.solver.max_iters == 90000  # the input is not modified
    assert scale_for_batch(scaled, 2) == (scaled, None)  # idempotent
    same, none = scale_for_batch(load_config("configs/boxinst_R50_1x.yaml"), 1)
    assert none is None and same.solver.lr == 0.01
    off, none = scale_for_batch(load_config("configs/boxinst_R50_1x.yaml", ["solver.ims_per_batch=4",
                                                                            "solver.scale_to_batch=false"]), 1)
    assert none is None and off.solver.max_iters == 90000
    frac = load_config("configs/tiny.yaml", ["solver.ims_per_batch=16"])
    s, _ = scale_for_batch(frac, 1)  # fractions of the schedule stay fractions
    assert s.solver.max_iters == 300 and s.solver.lr == pytest.approx(0.002) and s.loss.pairwise_warmup_frac == frac.loss.pairwise_warmup_frac


def _tiny_batch_4(*extra):
    """The tiny preset (tuned for 8 images per step) at 4: twice the steps."""
    return load_config("configs/tiny.yaml", ["solver.ims_per_batch=4", *extra])


def test_values_typed_by_the_user_are_not_rescaled(monkeypatch):
    cfg = _tiny_batch_4("solver.max_iters=40")
    scaled, msg = scale_for_batch(cfg, 1)
    assert scaled.solver.max_iters == 40  # typed: as given
    assert scaled.solver.lr == pytest.approx(cfg.solver.lr / 2) and scaled.checkpoint_period == 400
    # the warm-up (50 -> 100) would be longer than the run: clamped, and said
    assert scaled.solver.warmup_iters == 40 and "clamped" in msg and "kept as given: solver.max_iters=40" in msg
    lr_typed, msg = scale_for_batch(_tiny_batch_4("solver.lr=0.003", "solver.warmup_iters=10"), 1)
    assert lr_typed.solver.lr == 0.003 and lr_typed.solver.warmup_iters == 10 and lr_typed.solver.max_iters == 1200
    assert "solver.lr=0.003" in msg and "solver.warmup_iters=10" in msg
    # the flags of `boxmask train` count as typed
    from boxmask.cli import build_parser

    args = build_parser().parse_args(["train", "-c", "tiny", "solver.ims_per_batch=4", "--max-iters", "40"])
    seen = {}
    import boxmask.engine.trainer as trainer_mod
    from boxmask import cli

    monkeypatch.setattr(trainer_mod, "train", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    cli._train(args)
    assert scale_for_batch(seen["cfg"], 1)[0].solver.max_iters == 40


def test_warmup_is_clamped_to_the_run_without_batch_scaling():
    cfg = load_config("configs/tiny.yaml", ["solver.max_iters=20"])  # batch as tuned: no scaling
    scaled, msg = scale_for_batch(cfg, 1)
    assert scaled.solver.warmup_iters == 20 and msg.startswith("solver.warmup_iters 50 is longer than the run")
    assert scale_for_batch(scaled, 1) == (scaled, None)


def test_momenta_follow_the_batch_scaling():
    cfg = load_config("configs/sim_tiny.yaml", ["solver.ims_per_batch=4"])
    scaled, msg = scale_for_batch(cfg, 1)
    f = 4 / 8
    assert scaled.sim.ema_momentum == pytest.approx(cfg.sim.ema_momentum ** f)
    assert scaled.sim.proto_momentum == pytest.approx(cfg.sim.proto_momentum ** f)
    # the same forgetting per image seen: m' ** (steps now) == m ** (steps before)
    assert scaled.sim.ema_momentum ** scaled.solver.max_iters == pytest.approx(cfg.sim.ema_momentum ** cfg.solver.max_iters)
    assert "sim.ema_momentum 0.98 -> 0.989949" in msg and "sim.proto_momentum" in msg
    bigger, _ = scale_for_batch(load_config("configs/sim_tiny.yaml", ["solver.ims_per_batch=16"]), 1)
    assert bigger.sim.ema_momentum == pytest.approx(0.98 ** 2)
    typed, msg = scale_for_batch(load_config("configs/sim_tiny.yaml", ["solver.ims_per_batch=4", "sim.ema_momentum=0.9"]), 1)
    assert typed.sim.ema_momentum == 0.9 and typed.sim.proto_momentum == pytest.approx(cfg.sim.proto_momentum ** f)
    assert "kept as given: sim.ema_momentum=0.9" in msg
    huge = load_config("configs/tiny.yaml", ["solver.ims_per_batch=64"])
    huge.solver.lr = 1e308  # as if from a YAML file
    with pytest.raises(ConfigError, match="solver.lr"):  # scaling must not make a value invalid
        scale_for_batch(huge, 8)


def test_scaling_line_and_first_lines_reach_log_txt(synth_data, tmp_path):
    out = tmp_path / "run"
    tiny = [a for a in TINY if a != "solver.scale_to_batch=false"]  # 2 images per step vs the preset's 8
    assert main(["train", "-c", "configs/tiny.yaml", *tiny, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "3",
                 "--no-progress"]) == 0
    log = (out / "log.txt").read_text()
    head = log.splitlines()[:4]
    assert "batch scaling: effective batch 2" in head[0] and "kept as given: solver.max_iters=3" in head[0]
    assert any("train " in l and "train.json" in l for l in head) and any("supervision:" in l for l in head)
    saved = yaml.safe_load((out / "config.yaml").read_text())["solver"]
    assert saved["max_iters"] == 3 and saved["lr"] == pytest.approx(0.001 / 4) and saved["warmup_iters"] == 1
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["iteration"] == 3


def _one_class(synth_data, tmp_path, name="one.json", cat_name="shape"):
    data = json.loads((synth_data / "train_full.json").read_text())
    data["categories"] = [{"id": 1, "name": cat_name}]
    for a in data["annotations"]:
        a["category_id"] = 1
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_one_class_dataset_trains_evaluates_and_category_sets_are_checked(synth_data, tmp_path, capsys):
    one = _one_class(synth_data, tmp_path)
    run = tmp_path / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(one), "--train-images",
                 str(synth_data / "images"), "--val-json", str(one), "--val-images", str(synth_data / "images"),
                 "--out", str(run), "--max-iters", "2", "--no-progress"]) == 0
    assert main(["eval", str(run), "--json", str(one), "--images", str(synth_data / "images"), "--no-progress",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    # a json with other categories: refused by eval and by fine-tuning, unless the classifier is re-initialised
    assert main(["eval", str(run), "--json", str(synth_data / "val.json"), "--images", str(synth_data / "images"),
                 "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "circle" in err and "shape" in err and "reinit_classifier" in err
    args = ["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
            "--train-images", str(synth_data / "images"), "--max-iters", "1", "--no-progress", f"model.init_from={run}"]
    assert main(args + ["--out", str(tmp_path / "ft0")]) == 2
    assert not (tmp_path / "ft0").exists()
    assert main(args + ["--out", str(tmp_path / "ft1"), "model.reinit_classifier=true"]) == 0
    with pytest.raises(ConfigError, match="data.gt_masks"):
        load_config("configs/tiny.yaml", ["data.gt_masks=maybe"])
