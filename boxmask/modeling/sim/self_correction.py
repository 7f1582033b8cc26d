"""Self-correction: merge the masks of each object's positive samples, weighted by their box quality."""
from __future__ import annotations

import torch


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each xyxy box with its partner: ``boxes1[i]`` vs ``boxes2[i]``, [N] (``box_iou`` would build
    the N x N matrix of every pair)."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp_min(1e-12)


def positive_weights(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, group: torch.Tensor, num_groups: int,
                     mu: float = 5.0, mode: str = "iou") -> torch.Tensor:
    """Weights of the positives of each object (they sum to 1 per object).

    ``iou``: softmax over the object's positives of mu * IoU(predicted box, GT box) (paper, Eq. 6);
    ``mean``: uniform (the released code)."""
    if mode == "mean" or pred_boxes.shape[0] == 0:
        logits = torch.zeros(group.shape[0], device=group.device)
    else:
        iou = paired_box_iou(pred_boxes.float(), gt_boxes.float())
        logits = mu * iou
    # softmax within groups: subtract each group's max for stability
    gmax = torch.full((num_groups,), -1e9, device=group.device).scatter_reduce(0, group, logits, "amax")
    e = torch.exp(logits - gmax[group])
    denom = torch.zeros(num_groups, device=group.device).index_add_(0, group, e)
    return e / denom[group].clamp_min(1e-12)


def merge_masks(probs: torch.Tensor, weights: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Weighted sum of per-positive mask probabilities [N, h, w] into per-object maps [G, h, w]."""
    out = torch.zeros(num_groups, *probs.shape[1:], device=probs.device, dtype=probs.dtype)
    return out.index_add_(0, group, probs * weights.to(probs.dtype)[:, None, None])


def merge_per_object(inst: dict, probs: torch.Tensor, mu: float = 5.0, mode: str = "iou", num_objects: int | None = None):
    """Group the mask-head instances by the object they belong to and merge their masks ``probs``
    [N, h, w] with the positive weights. Returns (object ids (``gt_global``) [G], object index of each
    instance [N], weights [N], merged maps [G, h, w]). The groups are the objects with instances, or,
    given ``num_objects``, every object of the batch (those without instances get zero maps; no
    data-dependent shapes, so no host sync)."""
    if num_objects is not None:
        group = inst["gt_global"]
        groups = torch.arange(num_objects, device=group.device)
        weights = positive_weights(inst["pred_box"], inst["box"], group, num_objects, mu, mode)
        return groups, group, weights, merge_masks(probs, weights, group, num_objects)
    groups, group = torch.unique(inst["gt_global"], return_inverse=True)
    weights = positive_weights(inst["pred_box"], inst["box"], group, groups.numel(), mu, mode)
    return groups, group, weights, merge_masks(probs, weights, group, groups.numel())


def rival_maps(maps: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
    """Per object, the strongest map of the other objects of its image, pixel by pixel: [G, h, w] from
    the in-box instance maps ``maps`` [G, h, w] and each object's image index ``image`` [G].

    A per-image max and runner-up (O(G h w), not the G x G pairs): an object that holds the image's max
    at a pixel sees the runner-up there, the others see the max."""
    g, h, w = maps.shape
    if g == 0:
        return maps
    image = image.long()
    idx = image[:, None, None].expand(g, h, w)
    first = maps.new_full((num_images, h, w), -1.0).scatter_reduce(0, idx, maps, "amax")[image]
    top = maps >= first
    second = maps.new_full((num_images, h, w), -1.0).scatter_reduce(0, idx, torch.where(top, -1.0, maps), "amax")[image]
    return torch.where(top, second, first).clamp_min(0.0)


def claimed_by_rivals(own: torch.Tensor, box: torch.Tensor, image: torch.Tensor, num_images: int,
                      confident: float) -> torch.Tensor:
    """Pixels of each object's box that another object of the image claims: that object's in-box instance
    map is confident there (> ``confident``) and above this object's. The pseudo label makes them
    background, which separates touching instances that colour and class cannot (same-class overlaps)."""
    inbox = own * (box > 0)
    rival = rival_maps(inbox, image, num_images)
    return (rival > confident) & (rival > own) & (box > 0)
