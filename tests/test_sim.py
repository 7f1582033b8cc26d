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
from boxmask.modeling.condinst import CondInst
from boxmask.modeling.sim.prototypes import Prototypes
from boxmask.modeling.sim.pseudo_loss import adaptive_high_threshold, fuse, pseudo_mask_loss, pseudo_targets
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
    teacher = EMATeacher(student, momentum=0.5)
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
    for k in ("mask_feats", "params"):
        assert torch.allclose(t_out[k], s_out[k], atol=1e-4), k
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
    assert _train(synth_data, b, resume=True) == 0
    ckpt_b = load_checkpoint(b)
    bank, bank_b = ckpt["sim"].pop("bank._extra_state"), ckpt_b["sim"].pop("bank._extra_state")
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
    assert main(["eval", str(a), "--json", str(synth_data / "train_full.json"), "--images", str(synth_data / "images"),
                 "--out", str(tmp_path / "m.json"), "--no-progress", "--device", "cpu"]) == 0
    assert "SIM pseudo masks mIoU" in capsys.readouterr().out
    q = json.loads((tmp_path / "m.json").read_text())["gt_box_masks"]
    assert 0.0 <= q["pseudo_mIoU"] <= 1.0 and 0.0 <= q["model_mIoU"] <= 1.0 and q["covered"] > 0


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
