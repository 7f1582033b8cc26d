"""The inference path (folded BatchNorms, controller at the kept locations only, mask branch only with
detections) gives the detections of the plain dense computation, within float rounding."""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d, batched_nms

from boxmask.config import load_config
from boxmask.modeling.bn_folding import fold_batchnorm
from boxmask.modeling.condinst import CondInst, paste_masks, paste_probs
from boxmask.modeling.fcos import ltrb_to_boxes


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", ["model.fpn_channels=32", "model.mask_branch_channels=32",
                                             "model.score_thresh=0.0", "model.detections_per_image=30", *overrides])


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial norm statistics and affine parameters, so that folding them is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif isinstance(m, nn.Conv2d) and m.out_channels != 1:
                m.weight.mul_(1.5)


def _model(*overrides, seed: int = 0) -> CondInst:
    torch.manual_seed(seed)
    model = CondInst(_cfg(*overrides), num_classes=3)
    _randomise_norms(model, seed)
    return model.eval()


def _batch(sizes, orig_sizes, seed: int = 0) -> dict:
    """Images of ``sizes`` padded to one canvas (multiple of 32), as collate makes them."""
    g = torch.Generator().manual_seed(seed)
    ch = max(-(-h // 32) * 32 for h, _ in sizes)
    cw = max(-(-w // 32) * 32 for _, w in sizes)
    images = torch.zeros(len(sizes), 3, ch, cw, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8)
    return {"images": images, "image_sizes": list(sizes), "orig_sizes": list(orig_sizes)}


@torch.no_grad()
def dense_reference(model: CondInst, batch: dict) -> list[dict]:
    """Detections computed the plain way: the training modules (norms as they are), the controller and
    the mask branch at every location, the mask head per image."""
    m = model.cfg.model
    out = model.head_outputs(batch["images"])
    cls, ctr = out["cls"].sigmoid(), out["ctr"].sigmoid()
    results = []
    for i, ((ih, iw), (oh, ow)) in enumerate(zip(batch["image_sizes"], batch["orig_sizes"])):
        scores = cls[i] * ctr[i][:, None]
        locs, labs, scs, start = [], [], [], 0
        for n in out["level_sizes"]:
            s = scores[start : start + n]
            keep = torch.nonzero(s > m.score_thresh)
            if keep.shape[0] > m.pre_nms_topk:
                keep = keep[s[keep[:, 0], keep[:, 1]].topk(m.pre_nms_topk).indices]
            locs.append(keep[:, 0] + start)
            labs.append(keep[:, 1])
            scs.append(s[keep[:, 0], keep[:, 1]])
            start += n
        loc, lab, sc = torch.cat(locs), torch.cat(labs), torch.cat(scs).sqrt()
        boxes = ltrb_to_boxes(out["locations"][loc], out["reg"][i, loc])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, iw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ih)
        keep = batched_nms(boxes, sc, lab, m.nms_thresh)[: m.detections_per_image]
        loc, lab, sc, boxes = loc[keep], lab[keep], sc[keep], boxes[keep]
        logits = model.instance_mask_logits(out, torch.full_like(loc, i), loc)
        scale = torch.tensor([ow / iw, oh / ih, ow / iw, oh / ih])
        results.append({"boxes": boxes * scale, "scores": sc, "labels": lab, "logits": logits,
                        "masks": paste_masks(logits, m.mask_out_stride, (ih, iw), (oh, ow), m.mask_thresh)})
    return results


def _assert_same(got: list[dict], ref: list[dict], mask_tol: float = 1e-3) -> None:
    for g, r in zip(got, ref):
        assert len(r["boxes"]) > 0
        assert torch.equal(g["labels"], r["labels"])
        torch.testing.assert_close(g["scores"], r["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g["boxes"], r["boxes"], rtol=1e-4, atol=1e-3)
        assert g["masks"].shape == r["masks"].shape and g["masks"].dtype == torch.bool
        # pixels whose probability sits at the threshold may flip with rounding
        assert (g["masks"] != r["masks"]).float().mean() <= mask_tol


@pytest.mark.parametrize("backbone,norm", [("resnet18", "frozen_bn"), ("resnet18", "bn"), ("mobilenet_v2", "bn")])
def test_folded_backbone_equals_the_modules(backbone, norm):
    torch.manual_seed(0)
    model = CondInst(_cfg(f"model.backbone={backbone}", f"model.norm={norm}"), num_classes=3)
    _randomise_norms(model)
    model.eval()
    folded = fold_batchnorm(model.backbone)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        pairs = list(zip(model.backbone(x), folded(x)))
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    # the original keeps its norms and weights
    assert any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.backbone.modules())


def test_inference_equals_the_dense_computation():
    model = _model()
    batch = _batch([(64, 96), (50, 70)], [(128, 192), (75, 105)])
    got, ref = model.inference(batch), dense_reference(model, batch)
    _assert_same(got, ref)
    assert got[0]["masks"].shape == (30, 128, 192) and got[1]["masks"].shape == (30, 75, 105)
    # the RLE form holds the same masks
    from pycocotools import mask as mask_util

    rles = model.inference(batch, rle=True)
    assert len(rles[1]["rles"]) == 30
    decoded = torch.from_numpy(mask_util.decode(rles[1]["rles"])).permute(2, 0, 1).bool()
    assert torch.equal(decoded, got[1]["masks"])


def test_controller_at_kept_locations_equals_the_convolution():
    model = _model()
    with torch.no_grad():
        head = model.head.forward_dense(model.backbone(torch.randn(2, 3, 64, 96)))
        for lvl, b in enumerate(head["box_feats"]):
            dense = model.head.controller(b)  # [B, P, h, w]
            h, w = b.shape[-2:]
            # every corner and edge (the zero padding) and the centre
            ys = torch.tensor([0, 0, h - 1, h - 1, h // 2, 0])
            xs = torch.tensor([0, w - 1, 0, w - 1, w // 2, w // 2])
            img = torch.tensor([0, 1, 0, 1, 1, 0])
            got = model.head.controller_on(model.head.patches_at(b, img, ys, xs))
            torch.testing.assert_close(got, dense[img, :, ys, xs], rtol=1e-4, atol=1e-5)


def test_no_detection_skips_the_mask_branch(monkeypatch):
    model = _model("model.score_thresh=1.0")
    calls = []
    folded_branch = model.inference_modules()[1]
    monkeypatch.setattr(folded_branch, "forward", lambda feats: calls.append(1))
    out = model.inference(_batch([(64, 64)], [(100, 90)]))
    assert calls == [] and out[0]["masks"].shape == (0, 100, 90) and len(out[0]["boxes"]) == 0


def test_folded_copies_follow_weight_changes_and_stay_out_of_state_and_copies():
    model = _model()
    batch = _batch([(64, 64)], [(64, 64)])
    before = model.inference(batch)
    with torch.no_grad():  # as an optimiser step or load_state_dict changes a weight: in place
        model.backbone.fpn.body.conv1.weight.mul_(0.5)
        model.mask_branch.out.bias.add_(1.0)
    after = model.inference(batch)
    _assert_same(after, dense_reference(model, batch))
    assert not torch.equal(before[0]["scores"], after[0]["scores"])
    assert not any("_folded" in k for k in model.state_dict())
    assert copy.deepcopy(model).__dict__["_folded"].modules == ()
    # training mode: the modules themselves (BatchNorm with batch statistics), the cache untouched
    model.train()
    assert model.inference_modules()[0] is model.backbone


def test_bf16_inference_runs_and_stays_close():
    model = _model("model.detections_per_image=5")
    batch = _batch([(64, 96)], [(64, 96)])
    ref = model.inference(batch)[0]
    model.cfg.model.infer_bf16 = True
    got = model.inference(batch)[0]
    assert got["boxes"].dtype == torch.float32 and got["scores"].dtype == torch.float32
    assert got["masks"].shape[1:] == (64, 96)
    # bf16 keeps ~3 significant digits: the best scores agree to about that
    assert abs(float(got["scores"][0]) - float(ref["scores"][0])) < 0.02


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_paste_at_the_same_size_equals_thresholding_the_probabilities(factor):
    g = torch.Generator().manual_seed(factor)
    logits = torch.randn(5, 1, 9, 13, generator=g) * 3
    size = (9 * factor - 3, 13 * factor - 1) if factor > 1 else (9, 13)
    probs = paste_probs(logits.sigmoid()[:, 0], factor, size, size)
    assert torch.equal(paste_masks(logits, factor, size, size, 0.5), probs > 0.5)


def test_training_mask_logits_equal_the_dense_controller():
    """Training evaluates the controller only at the instances it needs, on any level: the same mask logits
    (and gradients into the controller) as its dense convolution at every location."""
    model = _model().train()
    torch.manual_seed(0)
    out = model.head_outputs(torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8))
    sizes = out["level_sizes"]
    # one instance at the first and the last location of every level, in both images
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    loc = torch.tensor([i for s, n in zip(starts, sizes) for i in (s, s + n - 1)] * 2)
    img = torch.arange(2).repeat_interleave(len(loc) // 2)
    got = model.instance_mask_logits(out, img, loc)
    dense = model._flatten([model.head.controller(b) for b in out["box_feats"]])[img, loc]
    want = model.mask_head(out["mask_feats"], model.strides[0], dense, img, out["locations"][loc],
                           model.level_soi[out["levels"][loc]], model.cfg.model.mask_out_stride)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    grad_got = torch.autograd.grad(got.sum(), model.head.controller.weight, retain_graph=True)[0]
    grad_want = torch.autograd.grad(want.sum(), model.head.controller.weight)[0]
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
