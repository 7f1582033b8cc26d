"""FCOS target assignment: centre sampling, per-level size ranges, smallest-box tie break."""
from __future__ import annotations

import torch

INF = 1e8


def compute_locations(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """Centres of a stride-``stride`` feature map in image coordinates, [h*w, 2] as (x, y)."""
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def level_size_ranges(sizes_of_interest: list[int], num_levels: int) -> list[tuple[float, float]]:
    """[(lo, hi)] per level: level i takes objects whose largest regression target is in (lo, hi]."""
    bounds = [-1.0] + [float(s) for s in sizes_of_interest[: num_levels - 1]] + [INF]
    return [(bounds[i], bounds[i + 1]) for i in range(num_levels)]


@torch.no_grad()
def assign_image(
    locations: torch.Tensor,
    level_of_loc: torch.Tensor,
    strides: torch.Tensor,
    ranges: torch.Tensor,
    boxes: torch.Tensor,
    radius: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every location of one image to a GT box or to background.

    ``locations`` [L, 2]; ``level_of_loc`` [L] level index; ``strides``/``ranges`` per location [L] /
    [L, 2]; ``boxes`` [G, 4] xyxy. Returns (gt index per location, -1 = background; ltrb targets [L, 4]).
    """
    num_loc = locations.shape[0]
    if boxes.numel() == 0:
        return torch.full((num_loc,), -1, dtype=torch.long, device=locations.device), locations.new_zeros(num_loc, 4)
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    l = xs - boxes[None, :, 0]
    t = ys - boxes[None, :, 1]
    r = boxes[None, :, 2] - xs
    b = boxes[None, :, 3] - ys
    ltrb = torch.stack([l, t, r, b], dim=2)  # [L, G, 4]

    # Centre sampling: a location is a candidate if it lies within radius*stride of the box centre
    # (and inside the box).
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    rad = strides[:, None].float() * radius
    x0 = torch.maximum(cx[None] - rad, boxes[None, :, 0])
    y0 = torch.maximum(cy[None] - rad, boxes[None, :, 1])
    x1 = torch.minimum(cx[None] + rad, boxes[None, :, 2])
    y1 = torch.minimum(cy[None] + rad, boxes[None, :, 3])
    in_centre = (xs > x0) & (ys > y0) & (xs < x1) & (ys < y1)

    max_reg = ltrb.max(dim=2).values
    in_range = (max_reg > ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])
    # torch.where rather than boolean-mask writes: no host sync on a GPU
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(num_loc, -1)
    areas = torch.where(in_centre & in_range, areas, INF)
    min_area, gt_idx = areas.min(dim=1)
    gt_idx = torch.where(min_area == INF, -1, gt_idx)
    reg = ltrb[torch.arange(num_loc, device=locations.device), gt_idx.clamp(min=0)]
    return gt_idx, reg


def centerness_target(reg: torch.Tensor) -> torch.Tensor:
    lr = reg[:, [0, 2]]
    tb = reg[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-6)) * (tb.min(1).values / tb.max(1).values.clamp(min=1e-6))
    return ratio.clamp(min=0).sqrt()


def topk_per_gt(gt_idx: torch.Tensor, scores: torch.Tensor, total: int, gt_image: torch.Tensor | None = None,
                num_images: int = 1) -> torch.Tensor:
    """Boolean mask over the candidates keeping, for each GT, its ``total // n`` (>= 1) best-scored ones,
    n being the number of GTs with candidates in that GT's image, as CondInst does to bound the mask
    head's cost. ``gt_idx`` [K]: the candidate's GT (-1: not a candidate); ``gt_image`` [G]: the image of
    each GT (default: all in one image). No data-dependent shapes, so no host sync."""
    valid = gt_idx >= 0
    if gt_idx.numel() == 0 or total <= 0:
        return valid
    dev = gt_idx.device
    if gt_image is None:
        gt_image = torch.zeros(int(gt_idx.max().clamp(min=0)) + 1, dtype=torch.long, device=dev)
    if gt_image.numel() == 0:  # no GTs: no candidates
        return valid
    has = torch.zeros(gt_image.numel() + 1, device=dev).scatter_reduce(0, gt_idx + 1, valid.float(), "amax")[1:]
    num_gt = torch.zeros(num_images, device=dev).index_add_(0, gt_image, has)
    per_gt = torch.div(total, num_gt.clamp(min=1), rounding_mode="floor").clamp(min=1)
    cap = per_gt[gt_image[gt_idx.clamp(min=0)]]
    # Sort by GT, then by descending score, and take each GT's first ``cap``.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(gt_idx[order], stable=True)]
    sorted_gt = gt_idx[order]
    first = torch.ones_like(sorted_gt, dtype=torch.bool)
    first[1:] = sorted_gt[1:] != sorted_gt[:-1]
    pos = torch.arange(len(order), device=dev)
    rank = pos - torch.cummax(torch.where(first, pos, 0), 0).values
    keep = torch.zeros_like(valid)
    keep[order] = valid[order] & (rank < cap[order])
    return keep
