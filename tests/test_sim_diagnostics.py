"""Diagnostics of SIM's maps: ROC AUC by ranks, pooled AUC, pseudo-label precision and recall, per-case
splits, the in-training statistics, and the ablation switches' host syncs."""
import json
import math

import pytest
import torch

from boxmask.evaluation.sim_maps import PooledAuc, SimMapStats, format_sim_maps, object_splits, roc_auc

from .test_end_to_end import TINY


def test_roc_auc_on_hand_made_cases():
    # the textbook case: of the 4 positive-negative pairs, 3 are ordered right
    assert float(roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True]))) == 0.75
    # a tie between a positive and a negative counts 1/2
    assert float(roc_auc(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([True, False, True]))) == 0.75
    rows = torch.tensor([[0.9, 0.8, 0.2, 0.1], [0.1, 0.2, 0.8, 0.9], [0.3, 0.3, 0.3, 0.3], [0.5, 0.6, 0.7, 0.8]])
    labels = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]).bool()
    auc = roc_auc(rows, labels)
    assert auc[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(float(auc[3]))  # one class only: undefined
    # pixels outside ``valid`` take no part, whatever their score
    valid = torch.tensor([[1, 1, 1, 0]]).bool()
    assert float(roc_auc(torch.tensor([[0.2, 0.9, 0.1, 0.95]]), torch.tensor([[1, 0, 0, 1]]).bool(), valid)[0]) == 0.5
    # against a brute-force count of the pairs
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(300, generator=g) * 20).round() / 20  # many ties
    y = torch.rand(300, generator=g) < 0.4
    pairs = (s[y][:, None] > s[~y][None]).double() + 0.5 * (s[y][:, None] == s[~y][None]).double()
    assert float(roc_auc(s, y)) == pytest.approx(float(pairs.mean()), abs=1e-12)


def test_pooled_auc_pools_the_objects_pixels():
    # two objects whose own AUC is 1, but object 2's foreground scores below object 1's background
    a_s, a_y = torch.tensor([0.8, 0.9, 0.6, 0.7]), torch.tensor([True, True, False, False])
    b_s, b_y = torch.tensor([0.3, 0.4, 0.1, 0.2]), torch.tensor([True, True, False, False])
    pooled = PooledAuc()
    pooled.add(a_s, a_y)
    pooled.add(b_s, b_y)
    exact = float(roc_auc(torch.cat([a_s, b_s]), torch.cat([a_y, b_y])))
    assert exact == pytest.approx(12 / 16) and pooled.auc() == pytest.approx(exact)
    assert math.isnan(PooledAuc().auc())


def test_map_statistics_per_split():
    # two 1 x 4 objects; the box is the first three cells
    box = torch.tensor([[[1.0, 1, 1, 0]], [[1.0, 1, 1, 0]]])
    gt = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 1]]]).bool()
    target = torch.tensor([[[1.0, 0, 0, 1]], [[1.0, 1, 0, 0]]])  # the outside cell never counts
    weight = torch.tensor([[[1.0, 0, 1, 1]], [[1.0, 1, 1, 0]]])  # object 1's second cell is ignored
    m = torch.tensor([[[0.9, 0.8, 0.1, 0.0]], [[0.9, 0.95, 0.2, 0.0]]])
    stats = SimMapStats()
    stats.add([["all", "plain"], ["all", "near_colour"]], {"m_s": None, "m_i": m, "fused": m}, target, weight, box, gt)
    out = stats.summary()
    a = out["all"]
    # pseudo fg: (0,0), (1,0), (1,1); GT fg in the box: (0,0), (0,1), (1,0)
    assert a["pseudo_fg"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}
    # pseudo bg: (0,2), (1,2); GT bg in the box: (0,2), (1,1), (1,2)
    assert a["pseudo_bg"] == {"precision": 1.0, "recall": pytest.approx(2 / 3)}
    assert a["pseudo_ignored"] == pytest.approx(1 / 6) and a["objects"] == 2 and "m_s" not in a["auc"]
    assert a["auc"]["m_i"]["per_object"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["plain"]["objects"] == out["near_colour"]["objects"] == 1
    assert out["plain"]["auc"]["fused"]["pooled"] == 1.0
    table = format_sim_maps(out)
    assert "near_colour" in table and "AUC M_I" in table and "m_t" not in a["auc"]
    # the texture map, when SIM has one, is reported beside the others
    stats.add([["all"], ["all"]], {"m_s": None, "m_i": m, "m_t": 1.0 - m, "fused": m}, target, weight, box, gt)
    assert stats.summary()["all"]["auc"]["m_t"]["per_object"] == pytest.approx((0.0 + 0.5) / 2)
    assert "AUC M_T" in format_sim_maps(stats.summary())


def test_object_splits_follow_the_cases_field():
    anns = [{"cases": []}, {"cases": ["near_colour"]}, {"cases": ["near_colour", "same_class_overlap"]}, {}]
    splits, flagged = object_splits(anns)
    assert flagged and splits == [["all", "plain"], ["all", "near_colour"], ["all", "near_colour", "same_class_overlap"],
                                  ["all", "plain"]]
    assert object_splits([{}, {}]) == ([["all"], ["all"]], False)


def test_training_log_carries_the_pseudo_label_statistics(synth_data, tmp_path):
    """Mask-supervised objects in the batch: the log shows how the teacher's pseudo labels for them compare
    with their GT masks (and the pseudo fg/bg shares of the box-only objects, here none: NaN-free)."""
    from boxmask.cli import main

    out = tmp_path / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "sim.warmup_frac=0", "sim.copy_paste=false",
                 "sim.fg_thresh=0.3", "sim.semantic=true", "--method", "sim",
                 "--train-json", str(synth_data / "train_full.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "2",
                 "--no-progress"]) == 0
    rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l][-1]
    for k in ("gt_pseudo_fg_recall", "gt_pseudo_bg_recall"):
        assert 0.0 <= rec[k] <= 1.0, k
    for k in ("gt_pseudo_fg_precision", "gt_pseudo_bg_precision", "gt_m_s_gap", "gt_m_i_gap", "gt_fused_gap",
              "pseudo_fg", "pseudo_bg", "pseudo_ignored"):
        assert k in rec, k


@pytest.mark.parametrize("extra", [
    ["sim.semantic=true", "sim.bg_prototypes=2", "sim.semantic_softmax=true"],
    ["sim.semantic=true", "sim.proto_confidence=0.4", "sim.proto_erode=1", "sim.proto_from=switch_on"],
    ["sim.semantic=true", "sim.proto_warmup=true", "sim.bg_prototypes=2", "sim.semantic_softmax=true"],
    ["sim.student_aug=true", "sim.teacher_backbone=ema", "sim.pairwise_feat_sim=true"],
])
def test_ablation_switches_keep_one_host_sync_per_step(synth_data, monkeypatch, extra):
    from boxmask.config import load_config
    from boxmask.data.batch import TrainDataset, collate
    from boxmask.data.coco import CocoDataset
    from boxmask.engine.trainer import build_model
    from boxmask.modeling.sim import method as sim_method
    from boxmask.modeling.sim.method import SIM

    from .test_host_syncs import HostSyncs

    monkeypatch.setattr(sim_method, "select_pixels_on_host", lambda device: False)
    cfg = load_config("configs/tiny.yaml", ["method=sim", *TINY, "sim.copy_paste=false", "sim.fg_thresh=0.3", *extra])
    ds = CocoDataset(synth_data / "train_full.json", synth_data / "images")
    td = TrainDataset(ds, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, True)  # mixed supervision
    batch = collate([td[(i, 0)] for i in range(2)])
    batch["targets"][0]["has_mask"] = torch.zeros_like(batch["targets"][0]["has_mask"])
    torch.manual_seed(0)
    model = build_model(cfg, len(ds.cat_ids)).train()
    sim = SIM(cfg, model, len(ds.cat_ids))
    with HostSyncs() as syncs:
        batch = sim.prepare_batch(batch, 0, 0)
    assert not syncs.calls, syncs.calls
    # (the mixed-supervision path of the GT-mask loss has its own selection: count SIM's part alone)
    _, aux = model(batch, return_aux=True)
    with HostSyncs() as syncs:
        _, stats = sim.losses(batch, aux, pseudo_on=True)
    assert not syncs.calls, syncs.calls
    assert "gt_pseudo_fg_recall" in stats and "pseudo_bg" in stats


def test_gt_box_quality_per_object_covers_every_object(synth_data):
    import torch

    from boxmask.config import load_config
    from boxmask.data.coco import CocoDataset
    from boxmask.engine.trainer import build_model
    from boxmask.evaluation.evaluator import gt_box_mask_quality

    cfg = load_config("configs/tiny.yaml", ["data.min_size_test=64", "model.fpn_channels=32",
                                            "model.mask_branch_channels=32"])
    ds = CocoDataset(synth_data / "val.json", synth_data / "images")
    model = build_model(cfg, len(ds.cat_ids))
    q = gt_box_mask_quality(model, ds, cfg, torch.device("cpu"), progress=False, per_object=True)
    ids = {a["id"] for i in ds.image_ids for a in ds.annotations[i] if not a.get("iscrowd", 0)}
    per = q["per_object"]["model"]
    assert set(per) == ids and all(0.0 <= v <= 1.0 for v in per.values())
    covered = [v for v in per.values()]
    assert abs(sum(covered) / len(covered) - q["model_mIoU"] * q["covered"] / len(covered)) < 1e-6
    # a mask's IoU is at most its precision and its recall, so the means keep that order too
    assert q["model_mIoU"] <= min(q["model_precision"], q["model_recall"]) + 1e-9
    assert 0.0 <= q["model_precision"] <= 1.0 and 0.0 <= q["model_recall"] <= 1.0


def test_mask_precision_and_recall_tell_too_large_from_too_small():
    from boxmask.evaluation.evaluator import _precision_recall

    gt = torch.zeros(3, 6, 6, dtype=torch.bool)
    gt[:, 1:5, 1:5] = True  # 16 pixels
    pred = torch.zeros_like(gt)
    pred[0, 0:6, 0:6] = True  # too large: 36 pixels covering the GT
    pred[1, 2:4, 2:4] = True  # too small: 4 pixels inside it
    precision, recall = _precision_recall(pred, gt)  # the third is empty
    assert precision == pytest.approx([16 / 36, 1.0, 0.0]) and recall == pytest.approx([1.0, 4 / 16, 0.0])
