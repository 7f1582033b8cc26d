"""SIM components on hand-made cases, and a tiny SIM run that trains, resumes exactly and evaluates."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from boxmask.cli import main
from boxmask.config import load_config
from boxmask.engine.checkpoint import load_checkpoint

from .conftest import one_thread
from boxmask.modeling.condinst import CondInst
from boxmask.modeling.sim.prototypes import Prototypes
from boxmask.modeling.sim.pseudo_loss import adaptive_high_threshold, fuse, pseudo_mask_loss, pseudo_targets, region_weight
from boxmask.modeling.sim.self_correction import merge_masks, positive_weights
from boxmask.modeling.sim.sinkhorn import hard_assignment, sinkhorn
from boxmask.modeling.sim.teacher import EMATeacher

from .test_end_to_end import TINY


def test_sinkhorn_marginals_and_partition():
    g = torch.Generator().manual_seed(0)
    for n, l in [(50, 5), (200, 10), (7, 3)]:
        scores = F.normalize(torch.randn(n, 16, generator=g), dim=1) @ F.normalize(torch.randn(l, 16, generator=g), dim=1).t()
        q = sinkhorn(scores, eps=0.05, iters=3)
        assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-5)  # each pixel's assignment sums to 1
        q = sinkhorn(scores, eps=0.05, iters=500)
        # equipartition: every prototype receives N/L of the mass
        assert torch.allclose(q.sum(0), torch.full((l,), n / l), rtol=1e-2)
        a = hard_assignment(q)
        assert a.shape == (n,) and a.min() >= 0 and a.max() < l  # each pixel to exactly one prototype


def test_sinkhorn_over_segments_equals_one_problem_each():
    """Several classes in one call (segments, invalid pixels masked) give each class's own solution."""
    g = torch.Generator().manual_seed(1)
    n, l = 120, 4
    scores = torch.randn(n, l, generator=g)
    seg = torch.randint(0, 3, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.3
    q = sinkhorn(scores, 0.05, 3, seg, 4, valid)  # segment 3 is empty
    for c in range(3):
        idx = torch.nonzero((seg == c) & valid).flatten()
        assert torch.allclose(q[idx], sinkhorn(scores[idx], 0.05, 3), atol=1e-5)
    assert torch.all(q[~valid] == 0)


def test_prototype_ema_moves_by_one_minus_gamma():
    protos = Prototypes(num_classes=2, num_prototypes=3, dim=4, momentum=0.9)
    before = protos.protos.clone()
    c = F.normalize(torch.tensor([1.0, 2.0, 0.0, -1.0]), dim=0)
    feats = c.repeat(30, 1)
    scores = feats @ protos.protos[1].t()
    assign = protos.update(scores, feats, torch.ones(30, dtype=torch.long))
    for l in assign.unique().tolist():
        expected = F.normalize(0.9 * before[1, l] + 0.1 * c, dim=0)
        assert torch.allclose(protos.protos[1, l], expected, atol=1e-6)
    untouched = [l for l in range(3) if l not in assign.tolist()]
    for l in untouched:
        assert torch.equal(protos.protos[1, l], before[1, l])
    assert torch.equal(protos.protos[0], before[0])  # other classes untouched
    assert torch.allclose(protos.protos.norm(dim=-1), torch.ones(2, 3), atol=1e-6)


def test_prototype_warmup_forgets_the_random_start():
    c = F.normalize(torch.tensor([1.0, 2.0, 0.0, -1.0]), dim=0)
    feats = c.repeat(8, 1)
    classes = torch.zeros(8, dtype=torch.long)
    warm, cold = Prototypes(1, 1, 4, momentum=0.999, warmup=True), Prototypes(1, 1, 4, momentum=0.999)
    cold.protos.copy_(warm.protos)
    start = warm.protos[0, 0].clone()
    for proto in (warm, cold):
        proto.update(feats @ proto.protos[0].t(), feats, classes)
    # first update: momentum min(0.999, 1 / 10) = 0.1
    assert torch.allclose(warm.protos[0, 0], F.normalize(0.1 * start + 0.9 * c, dim=0), atol=1e-6)
    assert torch.allclose(cold.protos[0, 0], F.normalize(0.999 * start + 0.001 * c, dim=0), atol=1e-6)
    assert warm.updates.tolist() == [1.0]
    for _ in range(49):
        warm.update(feats @ warm.protos[0].t(), feats, classes)
    assert warm.updates.tolist() == [50.0] and float(warm.protos[0, 0] @ c) > 0.999
    # a prototype that got no pixel keeps its count; checkpoints without the warm-up keep their keys
    warm.update(feats @ warm.protos[0].t(), feats, classes, torch.zeros(8, dtype=torch.bool))
    assert warm.updates.tolist() == [50.0]
    assert "updates" not in cold.state_dict() and "bg_updates" not in Prototypes(1, 1, 4, num_background=2).state_dict()
    bg = Prototypes(1, 1, 4, num_background=2, warmup=True)
    bg.update_background(feats @ bg.bg_protos.t(), feats)
    assert bg.bg_updates.sum().item() >= 1.0


def test_prototype_update_of_several_classes_equals_one_class_at_a_time():
    g = torch.Generator().manual_seed(2)
    together = Prototypes(num_classes=3, num_prototypes=4, dim=8, momentum=0.5)
    apart = Prototypes(num_classes=3, num_prototypes=4, dim=8, momentum=0.5)
    apart.protos.copy_(together.protos)
    n = 90
    feats = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    classes = torch.randint(0, 2, (n,), generator=g)  # class 2 gets no pixel
    valid = torch.rand(n, generator=g) > 0.2
    scores = torch.einsum("nd,nld->nl", feats, together.protos[classes])
    together.update(scores, feats, classes, valid)
    for c in range(2):
        idx = torch.nonzero((classes == c) & valid).flatten()
        apart.update(scores[idx], feats[idx], classes[idx])
    assert torch.allclose(together.protos, apart.protos, atol=1e-6)


def test_semantic_map_uses_best_prototype_and_temperature():
    protos = Prototypes(1, 2, 2)
    protos.protos.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    feats = torch.tensor([[[[1.0]], [[0.0]]]])  # one pixel, z = (1, 0)
    m = protos.semantic_map(feats, torch.tensor([0]), tau=1.0)
    assert m.item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert protos.semantic_map(feats, torch.tensor([0]), tau=0.1).item() == pytest.approx(1 / (1 + math.exp(-10.0)))


def test_positive_mask_weighting_two_positives():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # IoU 1.0 and 0.5
    group = torch.tensor([0, 0])
    w = positive_weights(pred, gt, group, 1, mu=5.0, mode="iou")
    e1, e2 = math.exp(5.0), math.exp(2.5)
    assert w.tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)], rel=1e-5)
    m1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [0.0, 0.5]])
    merged = merge_masks(torch.stack([m1, m2]), w, group, 1)
    assert torch.allclose(merged[0], w[0] * m1 + w[1] * m2)
    assert positive_weights(pred, gt, group, 1, mode="mean").tolist() == [0.5, 0.5]


def test_pseudo_loss_ignores_band_and_outside_box():
    prob = torch.tensor([[[0.9, 0.5, 0.1, 0.9]]])  # fg, band, bg, (outside box)
    box = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    tau_high = torch.tensor([0.75])
    target, weight = pseudo_targets(prob, box, tau_high, 0.4)
    assert target.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]
    assert weight.tolist() == [[[1.0, 0.0, 1.0, 0.0]]]
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    loss = pseudo_mask_loss(logits, target, weight)
    loss.sum().backward()
    g = logits.grad[0, 0]
    assert g[1] == 0 and g[3] == 0 and g[0] != 0 and g[2] != 0
    # changing ignored pixels does not change the loss
    other = torch.tensor([[[0.0, 9.0, 0.0, -9.0]]])
    assert pseudo_mask_loss(other, target, weight).item() == pytest.approx(pseudo_mask_loss(torch.zeros(1, 1, 4), target, weight).item())


def test_pseudo_loss_background_region_and_bce_alone():
    prob = torch.tensor([[[0.9, 0.5, 0.1, 0.05]]])  # fg, band, bg, bg
    box = torch.ones(1, 1, 4)
    target, weight = pseudo_targets(prob, box, torch.tensor([0.75]), 0.4)
    bg_only = region_weight(target, weight, "background")
    assert bg_only.tolist() == [[[0.0, 0.0, 1.0, 1.0]]]
    assert torch.equal(region_weight(target, weight, "all"), weight)
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    pseudo_mask_loss(logits, target, bg_only, "bce").sum().backward()
    g = logits.grad[0, 0]
    assert g[0] == 0 and g[1] == 0 and g[2] > 0 and g[3] > 0  # only the background pixels, pushed down
    # bce alone: the mean BCE over the confident pixels, no Dice
    x = torch.tensor([[[2.0, 0.0, -1.0, 0.5]]])
    expect = F.binary_cross_entropy_with_logits(x[0, 0, [0, 2, 3]], target[0, 0, [0, 2, 3]])
    assert pseudo_mask_loss(x, target, weight, "bce").item() == pytest.approx(expect.item(), rel=1e-6)
    assert pseudo_mask_loss(x, target, weight, "bce_dice").item() > expect.item()


def test_adaptive_threshold_rank_and_clamp():
    prob = torch.tensor([[[0.95, 0.9, 0.75, 0.2]], [[0.99, 0.98, 0.97, 0.96]], [[0.5, 0.5, 0.5, 0.5]]])
    box = torch.ones(3, 1, 4)
    t = adaptive_high_threshold(prob, box, torch.tensor([3, 2, 0]), 0.7, 0.8)
    assert t.tolist() == pytest.approx([0.75, 0.8, 0.8])
    assert fuse(torch.tensor([0.2]), torch.tensor([1.0]), 0.5).item() == pytest.approx(0.6)


def _cfg(method):
    return load_config("configs/tiny.yaml", [f"method={method}"] + TINY)


def test_teacher_starts_as_copy_and_follows_ema():
    cfg = _cfg("sim")
    torch.manual_seed(0)
    student = CondInst(cfg, 3)
    teacher = EMATeacher(student, momentum=0.5, warmup=False)
    for (n, p), (_, q) in zip(student.named_parameters(), teacher.model.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    old = {n: q.clone() for n, q in teacher.model.named_parameters()}
    teacher.update(student)
    for n, q in teacher.model.named_parameters():
        # lerp rounds differently from the written-out sum: an absolute tolerance for values near 0
        assert torch.allclose(q, 0.5 * old[n] + 0.5 * dict(student.named_parameters())[n], atol=1e-6)


@pytest.mark.parametrize("backbone", ["ema", "student"])
def test_teacher_outputs_match_student_at_start(backbone):
    """At step 0 the teacher is the student: same mask features and controller outputs whether it runs its
    own (channels-last) backbone or its heads on the student's FPN features."""
    torch.manual_seed(0)
    student = CondInst(_cfg("sim"), 3).eval()
    teacher = EMATeacher(student, momentum=0.9, backbone=backbone)
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        s_out = student.head_outputs(images)
    t_out = teacher(images, s_out["fpn"])
    assert torch.allclose(t_out["mask_feats"], s_out["mask_feats"], atol=1e-4)
    for t, s in zip(t_out["box_feats"], s_out["box_feats"], strict=True):  # the controller's input
        assert torch.allclose(t, s, atol=1e-4)
    assert "cls" not in t_out and "reg" not in t_out  # the teacher computes only what SIM reads
    if backbone == "student":
        with pytest.raises(ValueError, match="FPN"):
            teacher(images)


def test_sim_adds_nothing_at_inference():
    torch.manual_seed(0)
    sim_model = CondInst(_cfg("sim"), 3).eval()
    box_model = CondInst(_cfg("boxinst"), 3).eval()
    assert set(sim_model.state_dict()) == set(box_model.state_dict())
    box_model.load_state_dict(sim_model.state_dict())
    batch = {"images": torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "image_sizes": [(64, 64)],
             "orig_sizes": [(64, 64)]}
    a, b = sim_model(batch)[0], box_model(batch)[0]
    for k in a:
        assert torch.equal(a[k], b[k])


def _train(synth_data, out, iters=4, resume=False):
    # a 2-entry bank filled from iteration 1 and pasting every step after (paste masks: any M_I > 0.01)
    args = ["train", "-c", "configs/tiny.yaml", *TINY, "sim.warmup_frac=0.25", "sim.bank_length=2",
            "sim.paste_prob=1.0", "sim.fg_thresh=0.01", "--viz-paste", "1", "--method", "sim",
            "--train-json", str(synth_data / "train.json"), "--train-images", str(synth_data / "images"),
            "--val-json", str(synth_data / "val.json"), "--val-images", str(synth_data / "images"),
            "--out", str(out), "--max-iters", str(iters), "--no-progress"]
    return main(args + (["--resume"] if resume else []))


def test_sim_run_trains_resumes_exactly_and_evaluates(synth_data, tmp_path, capsys):
    a = tmp_path / "a"
    with one_thread():  # the resumed run below must equal this one
        assert _train(synth_data, a) == 0
    ckpt = load_checkpoint(a)
    assert "sim" in ckpt and any(k.startswith("prototypes.") for k in ckpt["sim"])
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # the model is a plain CondInst
    records = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert records[0]["loss_pseudo"] == 0.0 and "pseudo_fg" in records[-1]  # off during the warm-up
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "model_0000002.pth", b / "model_0000002.pth")
    (b / "last_checkpoint").write_text("model_0000002.pth\n")
    with one_thread():
        assert _train(synth_data, b, resume=True) == 0
    ckpt_b = load_checkpoint(b)
    bank, bank_b = ckpt["sim"].pop("bank._extra_state"), ckpt_b["sim"].pop("bank._extra_state")
    assert ckpt["sim"].pop("teacher._extra_state") == ckpt_b["sim"].pop("teacher._extra_state") == {"num_updates": 4}
    for key in ("model", "sim"):
        for k, v in ckpt[key].items():
            assert torch.allclose(v.float(), ckpt_b[key][k].float(), atol=1e-6), (key, k)
    # the bank (restored from the checkpoint, not rebuilt) holds the same images and paste masks
    assert len(bank["entries"]) == 2
    for e, e_b in zip(bank["entries"], bank_b["entries"]):
        assert torch.equal(e["image"], e_b["image"]) and torch.equal(e["boxes"], e_b["boxes"])
        assert all(torch.equal(m, m_b) for m, m_b in zip(e["masks"], e_b["masks"]))
    assert records[-1]["loss_paste"] > 0  # objects were pasted and supervised
    assert len(list((a / "paste_viz").glob("*.png"))) == 1
    capsys.readouterr()
    # objects flagged by case (none, one or both): the diagnostics come per split
    data = json.loads((synth_data / "train_full.json").read_text())
    flags = [[], ["near_colour"], ["same_class_overlap"], ["near_colour", "same_class_overlap"]]
    for k, ann in enumerate(data["annotations"]):
        ann["cases"] = flags[k % 4]
    (tmp_path / "cases.json").write_text(json.dumps(data))
    assert main(["eval", str(a), "--json", str(tmp_path / "cases.json"), "--images", str(synth_data / "images"),
                 "--out", str(tmp_path / "m.json"), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "SIM pseudo masks mIoU" in printed and "SIM maps inside the GT boxes" in printed
    q = json.loads((tmp_path / "m.json").read_text())["gt_box_masks"]
    assert 0.0 <= q["pseudo_mIoU"] <= 1.0 and 0.0 <= q["model_mIoU"] <= 1.0 and q["covered"] > 0
    assert set(q["splits"]) == {"plain", "near_colour", "same_class_overlap"}
    assert sum(q["splits"][c]["num_gt"] for c in ("plain", "near_colour", "same_class_overlap")) == \
        q["num_gt"] + sum(k % 4 == 3 for k in range(len(data["annotations"])))  # the doubly flagged count twice
    maps = q["sim_maps"]
    assert set(maps) == {"all", "plain", "near_colour", "same_class_overlap"} and maps["all"]["objects"] == q["covered"]
    for split in maps.values():
        assert "m_s" not in split["auc"]  # the default has no semantic map
        for m in ("m_i", "fused"):
            assert 0.0 <= split["auc"][m]["pooled"] <= 1.0 and 0.0 <= split["auc"][m]["per_object"] <= 1.0
        assert 0.0 <= split["pseudo_bg"]["recall"] <= 1.0 and 0.0 <= split["pseudo_ignored"] <= 1.0
        assert all(name in printed for name in maps)


def _sync_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        protos = Prototypes(2, 3, 4)
        protos.protos.copy_(F.normalize(torch.full((2, 3, 4), float(rank + 1)) + torch.arange(4.0) * rank, dim=-1))
        protos.sync()
        torch.save(protos.protos, f"{out_dir}/p{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_prototypes_are_averaged_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "p0.pt"), torch.load(tmp_path / "p1.pt")
    assert torch.equal(p0, p1)
    a = F.normalize(torch.full((2, 3, 4), 1.0), dim=-1)
    b = F.normalize(torch.full((2, 3, 4), 2.0) + torch.arange(4.0), dim=-1)
    assert torch.allclose(p0, F.normalize((a + b) / 2, dim=-1), atol=1e-6)


class _Scalar(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))


def test_teacher_momentum_warms_up_so_the_initial_weights_are_forgotten():
    """COCO presets: m = 0.9999 from step 0 would leave 0.9999^t of the initial (random-headed) teacher;
    with the warm-up min(m, (1 + t) / (10 + t)) the initial share is 9! t! / (t + 9)!."""
    shares = {}
    for warmup in (False, True):
        student = _Scalar(0.0)
        teacher = EMATeacher(student, momentum=0.9999, warmup=warmup)
        with torch.no_grad():
            teacher.model.w.fill_(1.0)  # the initial weights: what remains of them is the teacher's value
        momenta = []
        for _ in range(1000):
            momenta.append(teacher.current_momentum())
            teacher.update(student)
        shares[warmup] = float(teacher.model.w)
        if warmup:
            assert momenta[:3] == pytest.approx([0.1, 2 / 11, 3 / 12]) and max(momenta) <= 0.9999
            assert teacher.num_updates == 1000
    assert shares[False] == pytest.approx(0.9999 ** 1000, rel=1e-6)  # 90% of the initial weights left
    assert shares[True] == pytest.approx(math.factorial(9) / math.prod(range(1001, 1010)), rel=1e-6)
    assert shares[True] < 1e-20
    # the count survives a state dict round trip; a checkpoint without it counts as warmed up
    again = EMATeacher(_Scalar(0.0), momentum=0.9999)
    again.load_state_dict(teacher.state_dict())
    assert again.num_updates == 1000
    old = {k: v for k, v in teacher.state_dict().items() if not k.endswith("_extra_state")}
    again.load_state_dict(old)
    assert again.current_momentum() == 0.9999
    assert not EMATeacher(_Scalar(0.0), momentum=0.9999, warmup=False).current_momentum() < 0.9999


def test_paired_box_iou_is_the_diagonal_of_box_iou():
    from torchvision.ops import box_iou

    from boxmask.modeling.sim.self_correction import paired_box_iou

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    a = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 30 + 1], 1)
    xy = torch.rand(50, 2, generator=g) * 50
    b = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 30 + 1], 1)
    b[:5] = a[:5]  # identical pairs: IoU 1
    assert torch.allclose(paired_box_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(paired_box_iou(a[:5], b[:5]), torch.ones(5))


def test_semantic_softmax_against_background_prototypes():
    protos = Prototypes(1, 2, 2, num_background=2)
    protos.protos.copy_(torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]))
    protos.bg_protos.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    z = F.normalize(torch.tensor([1.0, 1.0]), dim=0)  # cos: class (0.707, 0.990), background (0.707, -0.707)
    feats = z.view(1, 2, 1, 1)
    s_c, s_bg = 0.6 * z[0] + 0.8 * z[1], z[1]
    m = protos.semantic_map(feats, torch.tensor([0]), tau=0.1, softmax=True)
    expected = math.exp(s_c / 0.1) / (math.exp(s_c / 0.1) + math.exp(s_bg / 0.1))
    assert m.item() == pytest.approx(expected, rel=1e-5)
    # without background prototypes the paper's map is unchanged; the softmax needs them
    assert protos.semantic_map(feats, torch.tensor([0]), tau=0.1).item() == pytest.approx(1 / (1 + math.exp(-s_c / 0.1)))
    with pytest.raises(ValueError, match="background"):
        Prototypes(1, 2, 2).semantic_map(feats, torch.tensor([0]), softmax=True)
    assert "bg_protos" not in Prototypes(1, 2, 2).state_dict()  # old checkpoints keep their keys


def _synth_batch(synth_data, cfg, n=2, json="train.json", with_masks=False):
    from boxmask.data.batch import TrainDataset, collate
    from boxmask.data.coco import CocoDataset

    ds = CocoDataset(synth_data / json, synth_data / "images")
    td = TrainDataset(ds, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, with_masks)
    return collate([td[(i, 0)] for i in range(n)]), len(ds.cat_ids)


def _sim_step(synth_data, extra=(), pseudo_on=True, json="train.json", with_masks=False, has_mask=None,
              semantic=True):
    """A SIM model and one step's losses on real synth images (the untrained teacher's M_I is about 0.5:
    fg_thresh 0.3 lets pixels through)."""
    from boxmask.modeling.sim.method import SIM

    # the paper's formulation (prototypes at work); instance competition has its own tests
    semantic_keys = ["sim.semantic=true", "sim.proto_pixels=mi"] if semantic else ["sim.semantic=false"]
    cfg = load_config("configs/tiny.yaml", ["method=sim", *TINY, "sim.copy_paste=false", "sim.fg_thresh=0.3",
                                            "sim.instance_competition=false", *semantic_keys, *extra])
    batch, num_classes = _synth_batch(synth_data, cfg, json=json, with_masks=with_masks)
    if has_mask is not None:
        for t in batch["targets"]:
            t["has_mask"] = torch.tensor([has_mask(k) for k in range(len(t["boxes"]))])
    torch.manual_seed(0)
    model = CondInst(cfg, num_classes).train()
    sim = SIM(cfg, model, num_classes)
    batch = sim.prepare_batch(batch, 0, 0)
    losses, aux = model(batch, return_aux=True)
    before = {k: v.clone() for k, v in sim.prototypes.state_dict().items()}
    extra_losses, stats = sim.losses(batch, aux, pseudo_on=pseudo_on)
    return sim, model, batch, aux, {**losses, **extra_losses}, stats, before


def test_background_prototypes_learn_from_pixels_outside_every_box(synth_data):
    sim, _, batch, aux, _, _, before = _sim_step(synth_data, ["sim.bg_prototypes=3", "sim.semantic_softmax=true"])
    assert not torch.equal(sim.prototypes.bg_protos, before["bg_protos"])
    assert torch.allclose(sim.prototypes.bg_protos.norm(dim=-1), torch.ones(3), atol=1e-6)
    h, w = aux["mask_logits"].shape[-2:]
    bg = sim._certain_background(batch, aux, (h, w))
    from boxmask.modeling.condinst import box_cells

    cells = box_cells(aux["gt_boxes"], h, w, sim.cfg.model.mask_out_stride)
    for g, i in enumerate(aux["gt_image"].tolist()):
        assert not (bg[i] & cells[g]).any()  # nothing inside a box
    for i, (ih, iw) in enumerate(batch["image_sizes"]):
        assert not bg[i, (ih + 3) // 4:].any() and not bg[i, :, (iw + 3) // 4:].any()  # nor in the padding
    assert bg.any()


def test_prototype_warmup_in_a_training_step(synth_data):
    sim, *_, before = _sim_step(synth_data, ["sim.proto_warmup=true", "sim.bg_prototypes=2", "sim.semantic_softmax=true"])
    assert "updates" not in before or before["updates"].sum() == 0
    assert sim.prototypes.updates.sum() > 0 and sim.prototypes.bg_updates.sum() > 0
    # the first update of a prototype keeps only a tenth of its random start
    moved = (sim.prototypes.protos - before["protos"]).norm(dim=-1).flatten()[sim.prototypes.updates > 0]
    assert float(moved.min()) > 0.5


def test_proto_confidence_erosion_and_switch_on(synth_data):
    from boxmask.modeling.sim.method import erode

    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 1:6, 1:6] = True
    inner = torch.zeros(1, 7, 7, dtype=torch.bool)
    inner[0, 2:5, 2:5] = True
    assert torch.equal(erode(m, 1), inner) and int(erode(m, 2).sum()) == 1
    moved = lambda sim, before: not torch.equal(sim.prototypes.protos, before["protos"])  # noqa: E731
    sim, *_, before = _sim_step(synth_data)
    assert moved(sim, before)
    # an untrained teacher's M_I is nowhere near 0.99, and a 40-cell erosion leaves nothing: no update
    for extra in (["sim.proto_confidence=0.99"], ["sim.proto_erode=40"]):
        sim, *_, before = _sim_step(synth_data, extra)
        assert not moved(sim, before), extra
    # proto_from=switch_on: no update before the pseudo stage, an update once it is on
    sim, *_, before = _sim_step(synth_data, ["sim.proto_from=switch_on"], pseudo_on=False)
    assert not moved(sim, before)
    sim, *_, before = _sim_step(synth_data, ["sim.proto_from=switch_on"], pseudo_on=True)
    assert moved(sim, before)


def test_student_aug_changes_only_the_students_view(synth_data, monkeypatch):
    from boxmask.modeling.sim import method as sim_method

    from .test_host_syncs import HostSyncs

    monkeypatch.setattr(sim_method, "select_pixels_on_host", lambda device: False)
    extra = ["sim.student_aug=true", "sim.teacher_backbone=ema"]
    sim, model, batch, aux, *_ = _sim_step(synth_data, extra)
    clean = _sim_step(synth_data, ["sim.teacher_backbone=ema"])
    assert "student_images" in batch and not torch.equal(batch["student_images"], batch["images"])
    assert torch.equal(batch["images"], clean[2]["images"])  # the teacher's and the colour terms' input
    assert torch.equal(aux["color_sim"], clean[3]["color_sim"])
    assert not torch.allclose(aux["out"]["mask_feats"], clean[3]["out"]["mask_feats"])  # the student saw the other view
    for i, (h, w) in enumerate(batch["image_sizes"]):  # padding stays zero
        assert int(batch["student_images"][i, :, h:].sum()) == 0 and int(batch["student_images"][i, :, :, w:].sum()) == 0
    # a function of (seed, iteration): the same draw again, another one at the next iteration
    again = sim.prepare_batch({**batch, "student_images": None}, 0, 0)["student_images"]
    assert torch.equal(again, batch["student_images"])
    assert not torch.equal(sim.prepare_batch(batch, 1, 0)["student_images"], again)
    with HostSyncs() as syncs:
        sim.prepare_batch(batch, 2, 0)
    assert sum(syncs.calls.values()) == 0, syncs.calls


@pytest.mark.parametrize("bad, match", [
    (["sim.student_aug=true", "sim.teacher_backbone=student"], "teacher_backbone=ema"),
    (["sim.semantic_softmax=true"], "go together"),
    (["sim.bg_prototypes=2"], "go together"),
    (["sim.proto_from=later"], "proto_from"),
    (["sim.proto_confidence=1.5"], "proto_confidence"),
    (["sim.proto_erode=-1"], "proto_erode"),
])
def test_bad_ablation_switches_are_rejected(bad, match):
    from boxmask.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config("configs/tiny.yaml", ["method=sim", *bad])


def test_mask_supervised_objects_get_no_pseudo_or_feature_pairwise_loss(synth_data):
    """Mixed supervision: an object with a GT mask has its Dice (loss_mask) only; the pseudo loss and the
    feature-similarity pairwise term act on the box-only objects."""
    # an untrained teacher's fused map lies in about [0.49, 0.58]: thresholds inside it make both foreground and background
    # (hard targets: the check below recomputes the pseudo label after losses() moved the prototypes, which
    # a soft target would follow by a little)
    extra = ["sim.pairwise_feat_sim=true", "sim.pairwise_feat_thresh=0.0", "sim.tau_low=0.52", "sim.tau_high_min=0.53",
             "sim.tau_high_max=0.53", "sim.pseudo_target=hard"]
    sim, model, batch, aux, losses, stats, _ = _sim_step(synth_data, extra, json="train_full.json", with_masks=True,
                                                         has_mask=lambda k: k % 2 == 0)
    has_mask = aux["has_mask"]
    assert has_mask.any() and (~has_mask).any()
    logits = aux["mask_logits"]
    for name in ("loss_pseudo", "loss_pairwise"):
        (grad,) = torch.autograd.grad(losses[name], logits, retain_graph=True)
        per_inst = grad.abs().flatten(1).sum(1)
        assert torch.all(per_inst[has_mask] == 0), name
        assert per_inst[~has_mask].sum() > 0, name
    (grad,) = torch.autograd.grad(losses["loss_mask"], logits, retain_graph=True)
    assert torch.all(grad.abs().flatten(1).sum(1)[~has_mask] == 0)
    # the pseudo loss is the mean over the box-only instances, as in a batch of box-only objects
    from boxmask.modeling.sim.pseudo_loss import pseudo_mask_loss

    pm = sim.pseudo_masks(batch, aux)
    per_inst = pseudo_mask_loss(logits[:, 0], pm["target"][pm["group"]], pm["weight"][pm["group"]])
    assert float(losses["loss_pseudo"].detach()) == pytest.approx(float(per_inst[~has_mask].mean().detach()), rel=1e-5)
    # training statistics against the GT of the mask-supervised objects
    for k in ("gt_pseudo_fg_precision", "gt_pseudo_fg_recall", "gt_pseudo_bg_precision", "gt_pseudo_bg_recall"):
        assert 0.0 <= float(stats[k]) <= 1.0, k
    for k in ("gt_m_s_gap", "gt_m_i_gap", "gt_fused_gap"):
        assert -1.0 <= float(stats[k]) <= 1.0, k
    assert float(stats["pseudo_fg"] + stats["pseudo_bg"] + stats["pseudo_ignored"]) == pytest.approx(1.0)


def test_rival_maps_and_the_pixels_other_objects_claim():
    from boxmask.modeling.sim.self_correction import claimed_by_rivals, rival_maps

    g = torch.Generator().manual_seed(0)
    maps, image = torch.rand(6, 5, 7, generator=g), torch.tensor([0, 0, 1, 0, 1, 2])
    rival = rival_maps(maps, image, 3)
    for i in range(6):
        others = [j for j in range(6) if j != i and image[j] == image[i]]
        want = torch.stack([maps[j] for j in others]).amax(0) if others else torch.zeros(5, 7)
        assert torch.allclose(rival[i], want), i
    # two touching objects of one image: each claims its own confident half of the shared box area
    own = torch.zeros(2, 4, 6)
    own[0, :, :3], own[0, :, 3:] = 0.9, 0.6
    own[1, :, :3], own[1, :, 3:] = 0.5, 0.95
    box = torch.ones(2, 4, 6)
    box[1, :, 0] = 0  # object 1's box leaves out the first column: its map there is no claim
    claimed = claimed_by_rivals(own, box, torch.tensor([0, 0]), 1, confident=0.7)
    assert claimed[0, :, 3:].all() and not claimed[0, :, :3].any()
    assert claimed[1, :, 1:3].all() and not claimed[1, :, 0].any() and not claimed[1, :, 3:].any()
    # a rival below the confidence claims nothing
    assert not claimed_by_rivals(own * 0.7, box, torch.tensor([0, 0]), 1, confident=0.7).any()


def test_instance_competition_makes_claimed_pixels_pseudo_background(synth_data):
    from boxmask.modeling.sim.self_correction import claimed_by_rivals

    sim, _, batch, aux, *_ = _sim_step(synth_data, ["sim.instance_competition=false"], semantic=False)
    plain = sim.pseudo_masks(batch, aux)
    sim_c, _, batch_c, aux_c, *_ = _sim_step(synth_data, ["sim.instance_competition=true"], semantic=False)
    comp = sim_c.pseudo_masks(batch_c, aux_c)
    assert torch.allclose(plain["teacher_m_i"], comp["teacher_m_i"])
    claimed = claimed_by_rivals(comp["teacher_m_i"], comp["box"], comp["image"], batch_c["images"].shape[0], 0.3)
    assert claimed.any(), "the synth batch has overlapping boxes"
    assert torch.equal(comp["target"], plain["target"] * ~claimed)
    assert torch.equal(comp["weight"], torch.where(claimed, torch.ones_like(plain["weight"]), plain["weight"]))


def test_split_pairs_mark_confident_pairs_on_opposite_sides():
    from boxmask.modeling.color import unfold_neighbours
    from boxmask.modeling.sim.pseudo_loss import split_pairs

    # one row: confident foreground | ignored | confident background
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    weight = torch.tensor([[[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]])
    split = split_pairs(target, weight, size=3, dilation=1)
    # the neighbour index of the right-hand neighbour (dy 0, dx +1) among the K = 8
    right = 4
    assert split[0, right, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # the ignored pixel splits nothing
    wide = split_pairs(target, weight, size=3, dilation=2)
    assert wide[0, right, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # pixel 1 and pixel 3: fg | bg
    # symmetric: a pair is split seen from either end, and pairs within a side never are
    fg, bg = (target * weight)[:, None], ((1 - target) * weight)[:, None]
    want = fg * unfold_neighbours(bg, 3, 2)[:, 0] + bg * unfold_neighbours(fg, 3, 2)[:, 0]
    assert torch.equal(wide, want)
    assert wide[0, 3, 0, 3] == 1.0  # pixel 3's left neighbour at dilation 2 is pixel 1


def test_pairwise_pseudo_cut_leaves_out_the_pairs_the_pseudo_label_splits(synth_data):
    """With sim.pairwise_pseudo_cut the pairwise term is BoxInst's over the pairs the pseudo label does not
    confidently split; before the pseudo loss's switch-on the term is BoxInst's own."""
    from boxmask.modeling import boxinst_loss
    from boxmask.modeling.sim.pseudo_loss import split_pairs

    sim, model, batch, aux, losses, _, _ = _sim_step(synth_data, ["sim.pairwise_pseudo_cut=true"])
    lc = sim.cfg.loss
    logits, box_masks = aux["mask_logits"], aux["box_masks"]
    sim_img = aux["color_sim"][aux["inst"]["image"]]
    args = (lc.pairwise_color_thresh, lc.pairwise_size, lc.pairwise_dilation)
    plain = boxinst_loss.pairwise_loss(logits, sim_img, box_masks, *args)

    def cut_loss(pm):
        split = split_pairs(pm["target"][pm["group"]], pm["weight"][pm["group"]], lc.pairwise_size, lc.pairwise_dilation)
        return boxinst_loss.pairwise_loss(logits, sim_img, box_masks, *args, 1.0 - split), split

    pm = sim.pseudo_masks(batch, aux)
    assert float(losses["loss_pairwise"].detach()) == pytest.approx(float(cut_loss(pm)[0].detach()), rel=1e-6)
    # a pseudo label that splits every box into a foreground left half and a background right half
    box = pm["box"]
    cols = torch.arange(box.shape[-1], dtype=torch.float32)
    left = box.flatten(1).new_zeros(box.shape[0], box.shape[-1])
    for g in range(box.shape[0]):
        xs = cols[box[g].amax(0) > 0]
        left[g] = (cols <= xs.float().mean()).float() if len(xs) else 0.0
    halves = {**pm, "target": box * left[:, None, :], "weight": box}
    want, split = cut_loss(halves)
    counted = (sim_img >= lc.pairwise_color_thresh) & (box_masks[:, None] > 0)
    assert (split.bool() & counted).any()  # some colour pairs are cut
    # (an untrained model's -log P(same) is about log 2 on every pair, so the gradients tell the terms apart)
    def grad(loss):
        return torch.autograd.grad(loss, logits, retain_graph=True)[0]

    assert torch.allclose(grad(sim._pairwise(aux, halves, cut=True)), grad(want))
    assert not torch.allclose(grad(want), grad(plain))
    assert torch.allclose(grad(sim._pairwise(aux, halves, cut=False)), grad(plain))
    _, _, _, _, before_on, _, _ = _sim_step(synth_data, ["sim.pairwise_pseudo_cut=true"], pseudo_on=False)
    assert float(before_on["loss_pairwise"].detach()) == pytest.approx(float(plain.detach()), rel=1e-6)


def test_cut_sides_keep_only_the_pairs_the_teacher_is_sure_of():
    from boxmask.modeling.sim.pseudo_loss import cut_sides

    # one row: pseudo fg at fused 0.95 and 0.75, pseudo bg at 0.05 and 0.35, one ignored, one claimed pixel
    fused = torch.tensor([[[0.95, 0.75, 0.05, 0.35, 0.5, 0.9]]])
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    weight = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]])
    claimed = torch.tensor([[[False, False, False, False, False, True]]])
    assert cut_sides(target, weight, fused, claimed) == (target, weight)  # the defaults: the pseudo label
    fg, w = cut_sides(target, weight, fused, claimed, 0.9, 0.1)
    assert fg[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert w[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # a claimed pixel stays certain background


def _pairwise_counted(synth_data, monkeypatch, extra=()):
    """(config, batch, CondInst, SIM, calls): a SIM with the cut on a synth batch, every computation of the
    colour pairwise term appended to ``calls``."""
    from boxmask.modeling import boxinst_loss
    from boxmask.modeling.sim.method import SIM

    cfg = load_config("configs/tiny.yaml", ["method=sim", *TINY, "sim.copy_paste=false", "sim.fg_thresh=0.3",
                                            "sim.pairwise_pseudo_cut=true", *extra])
    batch, num_classes = _synth_batch(synth_data, cfg)
    torch.manual_seed(0)
    model = CondInst(cfg, num_classes).train()
    sim = SIM(cfg, model, num_classes)
    calls = []
    real = boxinst_loss.pairwise_loss
    monkeypatch.setattr(boxinst_loss, "pairwise_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return cfg, batch, model, sim, calls


def test_the_pairwise_term_is_computed_once_when_sim_replaces_it(synth_data, monkeypatch):
    """With the cut on past the switch-on, CondInst leaves the pairwise term to SIM (one computation per
    step) and the step's term is the cut one; before the switch-on CondInst's colour term stands."""
    cfg, batch, model, sim, calls = _pairwise_counted(synth_data, monkeypatch)
    on = int(cfg.sim.warmup_frac * cfg.solver.max_iters) + 1
    for it, switched in ((0, False), (on, True)):
        calls.clear()
        b = sim.prepare_batch(batch, it, 0)
        assert b.get("pairwise_elsewhere", False) == switched
        losses, aux = model(b, return_aux=True)
        extra, stats = sim.losses(b, aux, pseudo_on=switched)
        assert len(calls) == 1
        assert ("pairwise_cut" in stats) == switched and (not switched or 0.0 <= float(stats["pairwise_cut"]) < 1.0)
        if switched:
            pm = sim.pseudo_masks(b, aux)
            want = sim._pairwise(aux, pm, cut=True)
            assert float(extra["loss_pairwise"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        else:
            assert "loss_pairwise" not in extra and float(losses["loss_pairwise"].detach()) > 0


def test_pairwise_cut_until_hands_the_term_back_to_condinst(synth_data, monkeypatch):
    """sim.pairwise_cut_until: from that fraction of the schedule on, the step's pairwise term is CondInst's
    colour term over every pair again, with the pseudo loss still on."""
    from boxmask.modeling.criterion import pairwise_cut_on, sim_switched_on

    cfg, batch, model, sim, calls = _pairwise_counted(synth_data, monkeypatch, [
        "solver.max_iters=100", "sim.warmup_frac=0.2", "sim.pairwise_cut_until=0.7"])
    assert [pairwise_cut_on(cfg, i) for i in (19, 20, 69, 70, 99)] == [False, True, True, False, False]
    assert sim_switched_on(cfg, 70) and sim_switched_on(cfg, 99)
    for it, cutting in ((50, True), (80, False)):
        calls.clear()
        b = sim.prepare_batch(batch, it, 0)
        assert b.get("pairwise_elsewhere", False) == cutting
        losses, aux = model(b, return_aux=True)
        extra, stats = sim.losses(b, aux, pseudo_on=sim_switched_on(cfg, it), cut_on=pairwise_cut_on(cfg, it))
        assert len(calls) == 1 and ("pairwise_cut" in stats) == cutting
        assert ("loss_pairwise" in extra) == cutting and float(extra["loss_pseudo"].detach()) > 0


def _left_column_cut(synth_data, monkeypatch):
    """A SIM step whose pseudo label is the left three columns of each box (every instance has split pairs),
    with the cut on (the pseudo label's split alone, no texture split): the step's aux, the split pairs per
    instance, the share of each instance's colour-linked pairs they are, and ``keep(key, value)``: the per-pair
    weight the pairwise term gets with ``sim.key=value``."""
    from boxmask.modeling import boxinst_loss
    from boxmask.modeling.sim.pseudo_loss import split_pairs

    sim, _, batch, aux, _, _, _ = _sim_step(synth_data, ["sim.pairwise_pseudo_cut=true", "sim.pairwise_texture_split=0"])
    lc = sim.cfg.loss
    pm = sim.pseudo_masks(batch, aux)
    box = pm["box"]
    cols = torch.arange(box.shape[-1], dtype=torch.float32)
    left = torch.stack([(cols <= (cols[b.amax(0) > 0].min() + 2 if (b > 0).any() else -1)).float() for b in box])
    halves = {**pm, "target": box * left[:, None, :], "weight": box}
    split = split_pairs(halves["target"][pm["group"]], box[pm["group"]], lc.pairwise_size, lc.pairwise_dilation)
    counted = (aux["color_sim"][aux["inst"]["image"]] >= lc.pairwise_color_thresh).float() * aux["box_masks"][:, None]
    share = (counted * split).flatten(1).sum(1) / counted.flatten(1).sum(1).clamp_min(1.0)
    seen = {}
    real = boxinst_loss.pairwise_loss
    monkeypatch.setattr(boxinst_loss, "pairwise_loss", lambda *a, **k: seen.update(keep=a[6]) or real(*a, **k))

    def keep(key: str, value) -> torch.Tensor:
        setattr(sim.cfg.sim, key, value)
        sim._pairwise(aux, halves, cut=True)
        return seen["keep"]

    return aux, split, share, keep


def test_pairwise_cut_min_share_cuts_only_the_objects_above_it(synth_data, monkeypatch):
    """sim.pairwise_cut_min_share: an instance whose share of cut pairs is below it keeps every pair."""
    _, split, share, keep_with = _left_column_cut(synth_data, monkeypatch)
    t = float(share.median())
    assert (share < t).any() and (share >= t).any()
    keep = keep_with("pairwise_cut_min_share", t)
    above = share >= t
    assert torch.equal(keep[~above], torch.ones_like(keep[~above]))
    assert torch.equal(keep[above], 1.0 - split[above])


def test_pairwise_cut_min_side_cuts_only_the_objects_that_large(synth_data, monkeypatch):
    """sim.pairwise_cut_min_side: an instance whose box is narrower than that many mask cells keeps every pair."""
    aux, split, _, keep_with = _left_column_cut(synth_data, monkeypatch)
    # the shorter side of each instance's box on the mask grid, counted by hand
    sides = []
    for m in aux["box_masks"]:
        ys, xs = torch.nonzero(m > 0, as_tuple=True)
        sides.append(min(int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1) if len(ys) else 0)
    sides = torch.tensor(sides)
    t = int(sides.float().median().ceil())
    large = sides >= t
    assert large.any() and (~large).any()
    keep = keep_with("pairwise_cut_min_side", t)
    assert torch.equal(keep[~large], torch.ones_like(keep[~large]))
    assert torch.equal(keep[large], 1.0 - split[large])
    assert bool((split[large] > 0).any())  # the large ones do lose pairs


def test_soft_targets_keep_the_fused_value_in_the_box_and_zero_where_claimed():
    from boxmask.modeling.sim.pseudo_loss import soft_targets

    prob = torch.tensor([[[0.9, 0.3, 0.1, 0.8, 1.2]]])
    box = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 0.0]]])
    claimed = torch.tensor([[[False, False, False, True, False]]])
    assert torch.allclose(soft_targets(prob, box), torch.tensor([[[0.9, 0.3, 0.1, 0.8, 0.0]]]))
    assert torch.allclose(soft_targets(prob, box, claimed), torch.tensor([[[0.9, 0.3, 0.1, 0.0, 0.0]]]))
    # BCE against a soft target is smallest where the student's probability equals it
    target = soft_targets(prob, box, claimed)[:, :, :4]
    weight = torch.ones_like(target)
    at = pseudo_mask_loss(torch.logit(target.clamp(1e-4, 1 - 1e-4)), target, weight, "bce")
    off = pseudo_mask_loss(torch.logit(target.clamp(1e-4, 1 - 1e-4)) + 0.5, target, weight, "bce")
    assert at.item() < off.item()


def test_rim_targets_are_soft_only_on_the_confident_background_next_to_the_rest_of_the_box():
    from boxmask.modeling.sim.pseudo_loss import rim_targets, soft_targets

    # one row: foreground, foreground, ignore band, background x3 (the box), outside the box
    prob = torch.tensor([[[0.9, 0.9, 0.6, 0.3, 0.2, 0.1, 0.05]]])
    box = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]])
    target, weight = pseudo_targets(prob, box, torch.tensor([0.8]), 0.4)
    soft = soft_targets(prob, box)
    # the first background cell keeps the teacher's value; deeper background and the foreground stay 0/1
    assert torch.allclose(rim_targets(target, weight, box, soft, 1), torch.tensor([[[1.0, 1.0, 0.0, 0.3, 0.0, 0.0, 0.0]]]))
    assert torch.allclose(rim_targets(target, weight, box, soft, 2), torch.tensor([[[1.0, 1.0, 0.0, 0.3, 0.2, 0.0, 0.0]]]))
    # soft_rim: the soft target everywhere except the confident background beyond the rim, pulled to 0
    assert torch.allclose(rim_targets(target, weight, box, soft, 1, "soft"),
                          torch.tensor([[[0.9, 0.9, 0.6, 0.3, 0.0, 0.0, 0.0]]]))
    # a box that is background everywhere has no rim: all 0
    empty = torch.zeros_like(prob)
    t0, w0 = pseudo_targets(prob * 0.1, box, torch.tensor([0.8]), 0.4)
    assert torch.equal(rim_targets(t0, w0, box, soft_targets(prob * 0.1, box), 1), empty)


def test_rim_pseudo_targets_are_used_by_the_loss(synth_data):
    from boxmask.modeling.sim.pseudo_loss import rim_targets, soft_targets

    competition = ["sim.instance_competition=true", "sim.tau_low=0.5", "sim.tau_high_min=0.5", "sim.tau_high_max=0.5"]
    for kind, rest in (("rim", "hard"), ("soft_rim", "soft")):
        sim, _, batch, aux, *_ = _sim_step(synth_data, [*competition, f"sim.pseudo_target={kind}", "sim.pseudo_rim=2"],
                                           semantic=False)
        pm = sim.pseudo_masks(batch, aux)
        soft = soft_targets(pm["fused"], pm["box"], pm["claimed"])
        want = rim_targets(pm["target"], pm["weight"], pm["box"], soft, 2, rest)
        assert torch.equal(pm["loss_target"], want)


def test_soft_pseudo_target_is_the_fused_map_on_the_confident_pixels(synth_data):
    # the untrained teacher's maps are near 0.5: thresholds at 0.5 make every box pixel confident
    competition = ["sim.instance_competition=true", "sim.tau_low=0.5", "sim.tau_high_min=0.5", "sim.tau_high_max=0.5"]
    sim, _, batch, aux, losses_s, *_ = _sim_step(synth_data, [*competition, "sim.pseudo_target=soft"], semantic=False)
    pm = sim.pseudo_masks(batch, aux)
    assert pm["claimed"].any(), "the synth batch has overlapping boxes"
    want = (pm["fused"] * (pm["box"] > 0)).masked_fill(pm["claimed"], 0.0)
    assert torch.equal(pm["loss_target"], want)
    assert not torch.equal(pm["loss_target"], pm["target"])
    # hard targets train on M_hat itself, and the loss differs between the two
    sim_h, _, batch_h, aux_h, losses_h, *_ = _sim_step(synth_data, [*competition, "sim.pseudo_target=hard"],
                                                       semantic=False)
    assert torch.equal(sim_h.pseudo_masks(batch_h, aux_h)["loss_target"], pm["target"])
    assert losses_s["loss_pseudo"].item() != pytest.approx(losses_h["loss_pseudo"].item())


def test_hard_target_until_trains_on_m_hat_first_then_on_the_soft_target(synth_data):
    """sim.hard_target_until: hard targets from the switch-on until that fraction of the schedule, the
    configured (soft) targets after; the pseudo loss of a step equals the plain hard / soft one."""
    from boxmask.modeling.criterion import hard_targets_on

    competition = ["sim.instance_competition=true", "sim.tau_low=0.5", "sim.tau_high_min=0.5", "sim.tau_high_max=0.5"]
    sched = ["solver.max_iters=100", "sim.warmup_frac=0.2"]
    sim, model, batch, aux, losses_s, *_ = _sim_step(synth_data, [*competition, *sched, "sim.hard_target_until=0.6"],
                                                     semantic=False)
    cfg = sim.cfg
    assert [hard_targets_on(cfg, i) for i in (19, 20, 59, 60, 99)] == [False, True, True, False, False]
    assert all(hard_targets_on(load_config(None, ["method=sim", "sim.pseudo_target=hard"]), i) for i in (0, 50))
    hard, _ = sim.losses(batch, aux, pseudo_on=True, hard_on=True)
    _, _, _, _, losses_h, *_ = _sim_step(synth_data, [*competition, *sched, "sim.pseudo_target=hard"], semantic=False)
    assert hard["loss_pseudo"].item() == pytest.approx(losses_h["loss_pseudo"].item(), rel=1e-6)
    assert losses_s["loss_pseudo"].item() != pytest.approx(losses_h["loss_pseudo"].item())


def test_hard_target_min_share_gives_hard_targets_to_the_objects_whose_pairs_the_label_splits(synth_data,
                                                                                            monkeypatch):
    """sim.hard_target_min_share: an instance whose pseudo label splits at least that share of its linked
    neighbour pairs trains on M_hat's 0/1, the others on the soft target."""
    from boxmask.modeling.sim.pseudo_loss import pseudo_mask_loss

    sim, _, batch, aux, *_ = _sim_step(synth_data, semantic=False)
    pm = sim.pseudo_masks(batch, aux)
    box = pm["box"]
    # even objects: the left three columns of the box foreground, the rest background (split pairs);
    # odd ones: the whole box foreground (none)
    cols = torch.arange(box.shape[-1], dtype=torch.float32)
    left = torch.stack([(cols <= (cols[b.amax(0) > 0].min() + 2 if (b > 0).any() else -1)).float() for b in box])
    odd = (torch.arange(box.shape[0]) % 2 == 1).float()[:, None, None]
    hand = {**pm, "target": box * torch.maximum(left[:, None, :], odd), "weight": box}
    monkeypatch.setattr(sim, "pseudo_masks", lambda *a, **k: hand)
    share = sim._split_share(aux, hand)[2]
    gate = share > 0
    assert gate.any() and not gate.all() and not gate[(pm["group"] % 2) == 1].any()
    sim.cfg.sim.hard_target_min_share = 1e-6
    extra, stats = sim.losses(batch, aux, pseudo_on=True)
    g = pm["group"]
    want = torch.where(gate[:, None, None], hand["target"][g], pm["loss_target"][g])
    per_inst = pseudo_mask_loss(aux["mask_logits"][:, 0], want, box[g])
    assert extra["loss_pseudo"].item() == pytest.approx(per_inst.mean().item(), rel=1e-5)
    assert stats["hard_target_share"].item() == pytest.approx(gate.float().mean().item())
    sim.cfg.sim.hard_target_min_share = 0.0  # off: the soft target for every instance
    off, _ = sim.losses(batch, aux, pseudo_on=True)
    soft = pseudo_mask_loss(aux["mask_logits"][:, 0], pm["loss_target"][g], box[g]).mean()
    assert off["loss_pseudo"].item() == pytest.approx(soft.item(), rel=1e-5)
    assert off["loss_pseudo"].item() != pytest.approx(extra["loss_pseudo"].item())


def test_texture_map_is_fused_into_the_pseudo_label(synth_data):
    """sim.texture_map: the fused map becomes (1 - texture_weight) P + texture_weight M_T for the objects
    whose texture map has cells on both sides (the others keep P), before the thresholds."""
    sim, _, batch, aux, *_ = _sim_step(synth_data, semantic=False)
    plain = sim.pseudo_masks(batch, aux)
    assert plain["m_t"] is None
    # the untrained teacher's in-box values are alike: thresholds at their median split every box in two
    s = sim.cfg.sim
    s.tau_low = s.tau_high_min = s.tau_high_max = float(plain["fused"][plain["box"] > 0].median())
    plain = sim.pseudo_masks(batch, aux)
    s.texture_map, s.texture_weight = True, 0.4
    pm = sim.pseudo_masks(batch, aux)
    mixed = 0.6 * plain["fused"] + 0.4 * pm["m_t"]
    took = torch.isclose(pm["fused"], mixed).flatten(1).all(1)
    assert took.any() and torch.equal(pm["fused"][~took], plain["fused"][~took])
    assert not torch.equal(pm["fused"], plain["fused"])
    assert pm["m_t"].shape == plain["fused"].shape and (pm["m_t"] * (pm["box"] == 0)).abs().max() == 0


def test_margin_ignores_the_background_ring_around_the_pseudo_foreground():
    from boxmask.modeling.sim.pseudo_loss import margin_ignored

    target = torch.zeros(1, 7, 9)
    target[0, 2:5, 3:6] = 1.0
    weight = torch.ones(1, 7, 9)
    weight[0, 0, :] = 0.0  # outside the box: stays ignored
    assert torch.equal(margin_ignored(target, weight, 0), weight)
    one = margin_ignored(target, weight, 1)
    ring = torch.zeros(7, 9, dtype=torch.bool)
    ring[1:6, 2:7] = True
    ring[2:5, 3:6] = False
    assert torch.equal(one[0] == 0, ring | (weight[0] == 0))  # the 1-cell ring and what was already ignored
    assert torch.equal(one[0, 2:5, 3:6], torch.ones(3, 3))  # the foreground keeps its weight
    two = margin_ignored(target, weight, 2)
    assert int((two[0] == 0).sum()) > int((one[0] == 0).sum()) and bool(two[0, 6, 0] == 1)
    # an ignored foreground pixel (weight 0) does not widen the ring
    weight_f = weight.clone()
    weight_f[0, 2:5, 5] = 0.0
    assert bool(margin_ignored(target, weight_f, 1)[0, 3, 6] == 1)


def test_pseudo_bg_margin_reaches_the_pseudo_label_and_the_cut(synth_data):
    """sim.pseudo_bg_margin: the weight the pseudo loss and the pairwise cut see has the ring ignored, and
    a rival's claimed pixels stay confident background (the untrained teacher's maps lie in about
    [0.47, 0.49]: thresholds at 0.48 split them)."""
    from boxmask.modeling.sim.pseudo_loss import margin_ignored

    common = ["sim.tau_low=0.48", "sim.tau_high_min=0.48", "sim.tau_high_max=0.48", "sim.pairwise_pseudo_cut=true"]
    sim0, _, batch0, aux0, losses0, *_ = _sim_step(synth_data, common, semantic=False)
    sim1, _, batch1, aux1, losses1, *_ = _sim_step(synth_data, [*common, "sim.pseudo_bg_margin=1"], semantic=False)
    pm0, pm1 = sim0.pseudo_masks(batch0, aux0), sim1.pseudo_masks(batch1, aux1)
    assert torch.equal(pm1["target"], pm0["target"])
    assert torch.equal(pm1["weight"], margin_ignored(pm0["target"], pm0["weight"], 1))
    assert pm1["weight"].sum() < pm0["weight"].sum()
    assert losses1["loss_pseudo"].item() != pytest.approx(losses0["loss_pseudo"].item())
    assert losses1["loss_pairwise"].item() != pytest.approx(losses0["loss_pairwise"].item())
    comp = ["sim.instance_competition=true", *common, "sim.pseudo_bg_margin=1"]
    sim_c, _, batch_c, aux_c, *_ = _sim_step(synth_data, comp, semantic=False)
    pm_c = sim_c.pseudo_masks(batch_c, aux_c)
    assert pm_c["claimed"].any() and bool((pm_c["weight"][pm_c["claimed"]] == 1).all())


@pytest.mark.parametrize("features", ["c3", "c2"])
def test_texture_gate_unlinks_only_pairs_across_a_texture_boundary(features):
    """sim.pairwise_texture_thresh: a pair keeps its colour affinity where the backbone's features (C3, or C2
    with sim.pairwise_texture_features=c2) of its two pixels agree; on a map whose left and right halves have
    orthogonal features, the pairs it unlinks all straddle the boundary, and some do."""
    from types import SimpleNamespace

    from boxmask.modeling.color import unfold_neighbours
    from boxmask.modeling.sim.method import SIM

    cfg = load_config("configs/tiny.yaml", ["method=sim", "sim.pairwise_texture_thresh=0.5",
                                            f"sim.pairwise_texture_features={features}"])
    stub = SimpleNamespace(cfg=cfg)
    stub._upsampled = lambda f, hw: SIM._upsampled(stub, f, hw)
    stub.low_level = lambda aux, name, hw: SIM.low_level(stub, aux, name, hw)
    # C3 has the stride of the first pyramid level, C2 that of the mask grid
    factor = cfg.model.fpn_strides[0] // cfg.model.mask_out_stride if features == "c3" else 1
    low = torch.zeros(1, 4, 6, 8)
    low[0, 0, :, :4], low[0, 1, :, 4:] = 1.0, 1.0  # left half along e0, right half along e1
    h, w = 6 * factor, 8 * factor
    size, dil = cfg.loss.pairwise_size, cfg.loss.pairwise_dilation
    x = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w) + 1  # 0 = a neighbour outside the map
    nx = unfold_neighbours(x, size, dil)[:, 0]
    colour = (nx > 0).float().expand(1, size * size - 1, h, w)
    aux = {"color_sim": colour, "out": {features: low}}
    affinity, thresh = SIM._pair_affinity(stub, aux, {})
    assert thresh == cfg.loss.pairwise_color_thresh
    unlinked = (colour > 0) & (affinity == 0)
    straddles = (x[:, 0, None] <= 4 * factor) != (nx <= 4 * factor)  # left cells: x + 1 <= 4 * factor
    assert unlinked.any() and not (unlinked & ~straddles).any()
    # within one side every pair keeps its colour affinity; with the gate off, affinity is colour alone
    assert torch.equal(affinity[~straddles], colour[~straddles])
    stub.cfg = load_config("configs/tiny.yaml", ["method=sim"])
    assert SIM._pair_affinity(stub, aux, {})[0] is colour


def test_texture_gate_makes_the_pairwise_term_sims_own_from_the_first_step(synth_data):
    """With the gate on, SIM computes the pairwise term from step 0 (before the self-training stage), and
    CondInst leaves its own colour term out."""
    _, _, batch, _, losses, _, _ = _sim_step(synth_data, ["sim.pairwise_texture_thresh=0.5"], pseudo_on=False,
                                             semantic=False)
    assert batch["pairwise_elsewhere"]
    assert losses["loss_pairwise"].requires_grad and float(losses["loss_pairwise"].detach()) > 0


@pytest.mark.parametrize("mask_stride", [4, 8, 2])
def test_c2_on_the_mask_grid_at_any_mask_stride(mask_stride):
    """The texture gate's C2 (stride 4) on the mask grid: itself at the default mask stride 4, the mean of
    each cell at stride 8 (not its top-left quarter), upsampled at stride 2; always the grid's shape."""
    from types import SimpleNamespace

    from boxmask.modeling.sim.method import SIM

    cfg = load_config("configs/tiny.yaml", ["method=sim", f"model.mask_out_stride={mask_stride}"])
    stub = SimpleNamespace(cfg=cfg)
    c2 = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)  # a 32 x 48 image
    hw = (32 // mask_stride, 48 // mask_stride)
    got = SIM.low_level(stub, {"out": {"c2": c2}}, "c2", hw)
    assert got.shape == (2, 3, *hw)
    if mask_stride == 4:
        assert torch.equal(got, c2)
    elif mask_stride == 8:
        assert torch.equal(got, torch.nn.functional.avg_pool2d(c2, 2))


def test_texture_split_leaves_out_pairs_across_the_objects_own_texture_contrast():
    """texture_split: an object whose own cells (left) and surroundings (right) have orthogonal features;
    the pairs it leaves out all straddle the boundary (and some do), none leaves the map, none at all below
    the step or for an object whose contrast means nothing."""
    from boxmask.modeling.color import unfold_neighbours
    from boxmask.modeling.sim.texture_map import texture_contrast, texture_split

    f = torch.zeros(1, 2, 6, 8)
    f[0, 0, :, :4], f[0, 1, :, 4:] = 1.0, 1.0
    fg = torch.zeros(1, 6, 8, dtype=torch.bool)
    fg[:, :, :2] = True
    bg = torch.zeros(1, 6, 8, dtype=torch.bool)
    bg[:, :, 6:] = True
    contrast, valid = texture_contrast(f, torch.tensor([0]), fg, bg)
    assert torch.equal(contrast[0, :, :4], torch.ones(6, 4)) and torch.equal(contrast[0, :, 4:], -torch.ones(6, 4))
    split = texture_split(contrast, valid, 0.5, 3, 2)
    x = torch.arange(8, dtype=torch.float32).expand(1, 1, 6, 8) + 1
    nx = unfold_neighbours(x, 3, 2)[:, 0]
    straddles = ((x[:, 0, None] <= 4) != (nx <= 4)) & (nx > 0)
    assert split.shape == (1, 8, 6, 8) and split.bool().any()
    assert torch.equal(split.bool(), straddles)  # both cells of a straddling pair are certain of their side
    assert not texture_split(contrast, valid, 2.5, 3, 2).any()  # the step is 2 here
    assert not texture_split(contrast, torch.tensor([False]), 0.5, 3, 2).any()
    _, few = texture_contrast(f, torch.tensor([0]), fg & False, bg)
    assert not few.item()


def test_texture_split_widens_the_pairwise_cut(synth_data, monkeypatch):
    """sim.pairwise_texture_split: past the switch-on the cut leaves out the pseudo label's split pairs and the
    texture contrast's too (logged as pairwise_texture_split, part of pairwise_cut); the term stays finite. The
    untrained teacher is unsure everywhere, so the pseudo label here is each box's left half (foreground) and
    right half (background)."""
    cfg, batch, model, sim, _ = _pairwise_counted(synth_data, monkeypatch, ["sim.pairwise_texture_split=0.05"])
    on = int(cfg.sim.warmup_frac * cfg.solver.max_iters) + 1
    b = sim.prepare_batch(batch, on, 0)
    _, aux = model(b, return_aux=True)
    pm = sim.pseudo_masks(b, aux)
    box = pm["box"]
    cols = torch.arange(box.shape[-1]).view(1, 1, -1)
    first = torch.where(box.amax(1) > 0, cols[:, 0], box.shape[-1]).amin(1)
    last = torch.where(box.amax(1) > 0, cols[:, 0], -1).amax(1)
    left = (cols <= ((first + last) // 2).view(-1, 1, 1)).float() * box
    pm.update(target=left, weight=box, fused=0.05 + 0.9 * left)
    stats = {}
    term = sim._pairwise(aux, pm, True, stats)
    assert torch.isfinite(term) and term.requires_grad
    share, cut = float(stats["pairwise_texture_split"]), float(stats["pairwise_cut"])
    assert 0.0 < share and cut < 1.0
    sim.cfg.sim.pairwise_cut_min_side = 1000  # the cut's gates act on the texture split too
    gated = {}
    sim._pairwise(aux, pm, True, gated)
    assert float(gated["pairwise_cut"]) == 0.0
    sim.cfg.sim.pairwise_cut_min_side = 0
    sim.cfg.sim.pairwise_texture_split = 0.0
    without = {}
    sim._pairwise(aux, pm, True, without)
    assert "pairwise_texture_split" not in without and float(without["pairwise_cut"]) < cut
    from boxmask.config import ConfigError

    with pytest.raises(ConfigError, match=r"sim\.pairwise_texture_split"):
        load_config("configs/tiny.yaml", ["method=sim", "sim.pairwise_pseudo_cut=false", "sim.pairwise_texture_split=0.3"])
