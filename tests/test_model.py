"""Model parts: target assignment, top-k positives, dynamic head, backbone weights, inference format."""
import hashlib

import pytest
import torch
import torchvision

from boxmask.config import Config, load_config
from boxmask.modeling.backbone import Backbone, WeightsError, torchvision_cache_file
from boxmask.modeling.condinst import CondInst, paste_masks
from boxmask.modeling.dynamic_mask_head import DynamicMaskHead, aligned_bilinear
from boxmask.modeling.targets import assign_image, centerness_target, compute_locations, topk_per_gt


def tiny_cfg(**model) -> Config:
    cfg = load_config("configs/tiny.yaml", ["model.fpn_channels=32", "model.mask_branch_channels=32"])
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def test_locations_and_assignment():
    locs = compute_locations(2, 3, 8, torch.device("cpu"))
    assert locs.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    locs = compute_locations(8, 8, 8, torch.device("cpu"))
    n = locs.shape[0]
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [16.0, 16.0, 32.0, 32.0]])
    gi, reg = assign_image(locs, torch.zeros(n, dtype=torch.long), torch.full((n,), 8.0),
                           torch.tensor([[-1.0, 1e8]]).expand(n, 2), boxes, radius=1.5)
    # the location (20, 20) is inside both boxes and near both centres: the smaller box wins
    idx = 2 * 8 + 2
    assert gi[idx].item() == 1 and reg[idx].tolist() == [4, 4, 12, 12]
    # far from both centres -> background
    assert gi[7 * 8 + 7].item() == -1
    assert centerness_target(torch.tensor([[4.0, 4.0, 4.0, 4.0]])).item() == pytest.approx(1.0)


def test_topk_per_gt_keeps_best_per_object():
    gt = torch.tensor([0, 0, 0, 1, 1, 0])
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.7])
    keep = topk_per_gt(gt, score, total=4)  # 2 per GT
    assert torch.nonzero(keep).flatten().tolist() == [1, 3, 4, 5]


def test_topk_per_gt_over_a_batch_equals_per_image():
    """The batched selection (GT ids global over the batch, caps per image) keeps what a loop over the
    images would: each GT's ``total // n_i`` best, n_i = GTs with candidates in its image."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    gt_image = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])
    offsets = [0, 3, 3, 8, 9]
    per_image, cand_gt, cand_score = [], [], []
    for i, n in enumerate(counts):
        k = 40
        gi = torch.randint(-1, n, (k,), generator=g) if n else torch.full((k,), -1)
        sc = torch.rand(k, generator=g)
        ref = torch.zeros(k, dtype=torch.bool)
        valid = torch.nonzero(gi >= 0).flatten()
        if valid.numel():
            ref[valid[topk_per_gt(gi[valid], sc[valid], 7)]] = True
        per_image.append(ref)
        cand_gt.append(torch.where(gi >= 0, gi + offsets[i], -1))
        cand_score.append(sc)
    keep = topk_per_gt(torch.cat(cand_gt), torch.cat(cand_score), 7, gt_image, len(counts))
    assert torch.equal(keep, torch.cat(per_image))
    assert keep.sum() > 0


def test_giou_loss_matches_torchvision():
    from torchvision.ops import generalized_box_iou_loss

    from boxmask.modeling.fcos import giou_loss

    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 2, generator=g) * 50
    b = torch.rand(200, 2, generator=g) * 50
    boxes1 = torch.cat([a, a + torch.rand(200, 2, generator=g) * 30], 1)
    boxes2 = torch.cat([b, b + torch.rand(200, 2, generator=g) * 30], 1)
    boxes2[:20] = boxes1[:20]  # identical pairs: loss 0
    assert torch.allclose(giou_loss(boxes1, boxes2), generalized_box_iou_loss(boxes1, boxes2, reduction="none"), atol=1e-6)


def test_dynamic_head_shapes_and_default_params():
    head = DynamicMaskHead(16, 8, 3)
    assert head.num_params == (18 * 8 + 8) + (8 * 8 + 8) + (8 + 1) == 233
    params = head.default_params()[None].repeat(3, 1)
    feats = torch.randn(2, 16, 6, 5)
    out = head(feats, 8, params, torch.tensor([0, 1, 1]), torch.tensor([[4.0, 4.0], [20.0, 12.0], [30.0, 40.0]]),
               torch.tensor([64.0, 64.0, 128.0]), 4)
    assert out.shape == (3, 1, 12, 10)
    # the shared initial MLP already responds to the features (not a constant map)
    assert out.std() > 1e-3


def test_aligned_bilinear_keeps_constant_and_shape():
    x = torch.ones(1, 1, 3, 4)
    y = aligned_bilinear(x, 2)
    assert y.shape == (1, 1, 6, 8) and torch.allclose(y, torch.ones_like(y))


def test_paste_masks_to_original_size():
    logits = torch.full((2, 1, 4, 6), -10.0)
    logits[0, :, 1:3, 1:3] = 10.0
    m = paste_masks(logits, 4, (16, 24), (32, 48), 0.5)
    assert m.shape == (2, 32, 48) and m.dtype == torch.bool
    assert m[0].any() and not m[1].any()


def test_inference_output_format():
    cfg = tiny_cfg()
    cfg.model.score_thresh = 0.0
    model = CondInst(cfg, 3).eval()
    batch = {"images": torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8), "image_sizes": [(64, 90), (60, 80)],
             "orig_sizes": [(128, 180), (60, 80)]}
    out = model(batch)
    assert len(out) == 2
    for det, (h, w) in zip(out, [(128, 180), (60, 80)]):
        n = det["boxes"].shape[0]
        assert 0 < n <= cfg.model.detections_per_image
        assert det["masks"].shape == (n, h, w) and det["labels"].max() < 3
        assert (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()


def test_backbone_weights_from_file(tmp_path):
    cfg = tiny_cfg(backbone="resnet18", norm="frozen_bn")
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    cfg.model.weights = str(path)
    bb = Backbone(cfg.model)
    assert torch.equal(bb.fpn.body.conv1.weight, ref.conv1.weight)
    # a file that matches nothing is refused
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    cfg.model.weights = str(tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="no key"):
        Backbone(cfg.model)
    cfg.model.weights = str(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="not found"):
        Backbone(cfg.model)


def test_torchvision_enum_weights_never_download(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        cfg = tiny_cfg(backbone="mobilenet_v2", weights="MobileNet_V2_Weights.IMAGENET1K_V1")
        expected = torchvision_cache_file(cfg.model.weights)
        with pytest.raises(WeightsError) as e:
            Backbone(cfg.model)
        assert str(expected) in str(e.value) and "never downloads" in str(e.value)
        # a file under that name is loaded only if its sha256 starts with the prefix in the name
        ref = torchvision.models.mobilenet_v2(weights=None)
        expected.parent.mkdir(parents=True)
        torch.save(ref.state_dict(), expected)
        with pytest.raises(WeightsError, match="sha256"):
            Backbone(cfg.model)
        digest = hashlib.sha256(expected.read_bytes()).hexdigest()[:8]
        named = expected.with_name(f"mobilenet_v2-{digest}.pth")
        expected.rename(named)
        import boxmask.modeling.backbone as backbone_mod

        real = backbone_mod.torchvision_cache_file
        backbone_mod.torchvision_cache_file = lambda name: named
        try:
            bb = Backbone(cfg.model)
        finally:
            backbone_mod.torchvision_cache_file = real
        assert torch.equal(bb.fpn.body["0"][0].weight, ref.features[0][0].weight)
    finally:
        torch.hub.set_dir(old)


def test_frozen_stages():
    cfg = tiny_cfg(backbone="resnet18", freeze_at=2)
    bb = Backbone(cfg.model)
    assert not bb.fpn.body.conv1.weight.requires_grad and not bb.fpn.body.layer1[0].conv1.weight.requires_grad
    assert bb.fpn.body.layer2[0].conv1.weight.requires_grad


def _train_batch():
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[4.0, 20.0, 30.0, 60.0], [30.0, 2.0, 62.0, 30.0]]), "labels": torch.tensor([0, 2])}]
    masks = [torch.zeros(1, 64, 64, dtype=torch.uint8), torch.zeros(2, 64, 64, dtype=torch.uint8)]
    masks[0][0, 10:30, 10:30] = 1
    masks[1][0, 25:50, 8:25] = 1
    masks[1][1, 5:25, 35:60] = 1
    return {"images": images, "image_sizes": [(64, 64), (60, 64)], "orig_sizes": [(64, 64), (60, 64)],
            "image_ids": [1, 2], "targets": targets, "gt_masks_padded": masks}


@pytest.mark.parametrize("method", ["boxinst", "full"])
def test_training_step_losses_finite_with_and_without_bf16(method):
    from boxmask.modeling.criterion import total_loss

    cfg = tiny_cfg()
    cfg.method = method
    model = CondInst(cfg, 3).train()
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(_train_batch())
        expected = {"loss_cls", "loss_box", "loss_ctr"} | ({"loss_mask"} if method == "full" else {"loss_proj", "loss_pairwise"})
        assert set(losses) == expected
        loss = total_loss({k: v.float() for k, v in losses.items()}, cfg, 10)
        assert torch.isfinite(loss)
        model.zero_grad()
        loss.backward()
        assert model.head.controller.weight.grad.abs().sum() > 0  # the mask loss reaches the controller


def test_empty_targets_give_zero_mask_losses():
    cfg = tiny_cfg()
    model = CondInst(cfg, 3).train()
    batch = _train_batch()
    batch["targets"] = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(batch)
    assert losses["loss_proj"].item() == 0.0 and losses["loss_pairwise"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"])


def test_dynamic_mask_head_equals_grouped_convolutions():
    """The batched-matmul MLP is CondInst's grouped 1x1 convs with one group per instance."""
    import torch.nn.functional as F

    from boxmask.modeling.dynamic_mask_head import DynamicMaskHead

    torch.manual_seed(0)
    head = DynamicMaskHead(8, 8, 3)
    n, h, w = 5, 10, 12
    params = torch.randn(n, head.num_params) * 0.3
    feats = torch.randn(2, 8, h, w)
    img = torch.tensor([0, 1, 1, 0, 1])
    centres, soi = torch.rand(n, 2) * 80, torch.full((n,), 64.0)
    out = head(feats, 8, params, img, centres, soi, 8)  # out stride 8: no upsampling
    xs = torch.arange(w) * 8.0 + 4
    ys = torch.arange(h) * 8.0 + 4
    rel = torch.stack([((centres[:, 0:1] - xs) / 64)[:, None, :].expand(n, h, w),
                       ((centres[:, 1:2] - ys) / 64)[:, :, None].expand(n, h, w)], dim=1)
    x = torch.cat([rel, feats[img]], dim=1).reshape(1, -1, h, w)
    ws, bs = head.split_params_batched(params)
    for i, (wt, b) in enumerate(zip(ws, bs)):
        x = F.conv2d(x, wt.reshape(-1, wt.shape[2], 1, 1), b.reshape(-1), groups=n)
        x = F.relu(x) if i < 2 else x
    assert torch.allclose(out, x.reshape(n, 1, h, w), atol=1e-5)


@pytest.mark.parametrize("backbone, c2_channels", [("resnet18", 64), ("mobilenet_v2", 24)])
def test_levels_and_low_level_outputs_in_one_pass(backbone, c2_channels):
    """levels_and_low gives forward's pyramid levels and the body's stride-4 (C2) and stride-8 (C3) outputs."""
    cfg = Config()
    cfg.model.backbone, cfg.model.fpn_channels, cfg.model.fpn_strides = backbone, 16, [8, 16, 32]
    torch.manual_seed(0)
    bb = Backbone(cfg.model).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        levels, low = bb.levels_and_low(x)
        for a, b in zip(levels, bb(x)):
            assert torch.equal(a, b)
    assert low["c2"].shape[1:] == (c2_channels, 16, 24)
    assert low["c3"].shape[-2:] == (8, 12)


def test_separable_head_convolutions_cost_less_and_train():
    """model.head_conv=separable: the FCOS towers and the FPN outputs are depthwise 3x3 + pointwise 1x1, at
    well under a quarter of the full convolutions' multiply-adds, and the model trains and predicts."""
    from torch.utils.flop_counter import FlopCounterMode

    from boxmask.modeling.criterion import total_loss

    flops = {}
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    for conv in ("full", "separable"):
        cfg = tiny_cfg(head_conv=conv, fpn_channels=64)
        torch.manual_seed(0)
        model = CondInst(cfg, 3)
        depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 64]
        # 2 towers x head_convs, and one FPN output per level
        assert len(depthwise) == (2 * cfg.model.head_convs + len(cfg.model.fpn_strides) if conv == "separable" else 0)
        counter = FlopCounterMode(display=False)
        with torch.no_grad():
            feats = model.backbone(images.float())
            with counter:
                for x in feats:
                    model.head.cls_tower(x), model.head.box_tower(x)
        flops[conv] = counter.get_total_flops()
    assert flops["separable"] < flops["full"] / 4
    # the separable model trains (finite loss, gradient into the depthwise filters) and predicts
    loss = total_loss({k: v.float() for k, v in model(_train_batch()).items()}, cfg, 10)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in depthwise)
    cfg.model.score_thresh = 0.0
    out = model.eval()({"images": images, "image_sizes": [(64, 64)], "orig_sizes": [(64, 64)]})
    assert out[0]["masks"].shape[-2:] == (64, 64)


def test_head_conv_choice_checked_at_load():
    from boxmask.config import ConfigError

    assert load_config("configs/tiny.yaml", ["model.head_conv=separable"]).model.head_conv == "separable"
    with pytest.raises(ConfigError, match="model.head_conv"):
        load_config("configs/tiny.yaml", ["model.head_conv=dilated"])
