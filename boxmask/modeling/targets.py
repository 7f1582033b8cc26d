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
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(num_loc, -1).clone()
    areas[~(in_centre & in_range)] = INF
    min_area, gt_idx = areas.min(dim=1)
    gt_idx[min_area == INF] = -1
    reg = ltrb[torch.arange(num_loc, device=locations.device), gt_idx.clamp(min=0)]
    return gt_idx, reg


def centerness_target(reg: torch.Tensor) -> torch.Tensor:
    lr = reg[:, [0, 2]]
    tb = reg[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-6)) * (tb.min(1).values / tb.max(1).values.clamp(min=1e-6))
    return ratio.clamp(min=0).sqrt()


def topk_per_gt(gt_idx: torch.Tensor, scores: torch.Tensor, total: int) -> torch.Tensor:
    """Indices into the positives keeping at most ``total // num_gt`` (>= 1) per GT, best score first,
    as CondInst does to bound the mask head's cost."""
    if gt_idx.numel() == 0 or total <= 0:
        return torch.arange(gt_idx.numel(), device=gt_idx.device)
    num_gt = int(gt_idx.unique().numel())
    per_gt = max(total // num_gt, 1)
    # Sort by GT, then by descending score, and take each GT's first ``per_gt``.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(gt_idx[order], stable=True)]
    sorted_gt = gt_idx[order]
    first = torch.ones_like(sorted_gt, dtype=torch.bool)
    first[1:] = sorted_gt[1:] != sorted_gt[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(len(order), device=order.device), 0), 0).values
    rank = torch.arange(len(order), device=order.device) - group_start
    return order[rank < per_gt]
