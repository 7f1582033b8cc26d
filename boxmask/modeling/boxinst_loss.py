"""BoxInst's box-supervised mask losses and the dice loss of full supervision (pure functions).

All masks live on the stride-``mask_out_stride`` grid; ``logits`` is [N, 1, h, w] for N instances.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .color import unfold_neighbours


def dice_loss(scores: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-instance dice loss 1 - 2*sum(pq) / (sum p^2 + sum q^2 + eps), over all but the first dim."""
    scores = scores.flatten(1)
    targets = targets.flatten(1).to(scores.dtype)
    inter = (scores * targets).sum(1)
    union = (scores * scores).sum(1) + (targets * targets).sum(1) + eps
    return 1.0 - 2.0 * inter / union


def projection_loss(scores: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """Dice between the x/y max-projections of the predicted masks and of the box masks; [N]."""
    scores = scores.flatten(0, 1) if scores.dim() == 4 else scores
    box_masks = box_masks.flatten(0, 1) if box_masks.dim() == 4 else box_masks
    box_masks = box_masks.to(scores.dtype)
    loss_y = dice_loss(scores.amax(dim=1), box_masks.amax(dim=1))
    loss_x = dice_loss(scores.amax(dim=2), box_masks.amax(dim=2))
    return loss_x + loss_y


def pairwise_log_same(logits: torch.Tensor, size: int = 3, dilation: int = 2) -> torch.Tensor:
    """log P(pixel i and neighbour j share a label) for every pair; [N, K, h, w].

    P = m_i m_j + (1 - m_i)(1 - m_j), computed in log space for stability."""
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    fg_n = unfold_neighbours(log_fg, size, dilation)[:, 0]
    bg_n = unfold_neighbours(log_bg, size, dilation)[:, 0]
    return torch.logaddexp(log_fg + fg_n, log_bg + bg_n)


def pairwise_loss(
    logits: torch.Tensor,
    color_sim: torch.Tensor,
    box_masks: torch.Tensor,
    thresh: float = 0.3,
    size: int = 3,
    dilation: int = 2,
    pair_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """BoxInst's pairwise term, a scalar: -log P(same) averaged over the pairs whose colour
    similarity is >= ``thresh`` and whose centre pixel lies inside the instance's box.

    ``color_sim``: [N, K, h, w] (each instance's image similarity); ``box_masks``: [N, h, w];
    ``pair_keep``: an optional [N, K, h, w] weight per pair (0 leaves a pair out)."""
    weights = (color_sim >= thresh).to(logits.dtype) * box_masks[:, None].to(logits.dtype)
    if pair_keep is not None:
        weights = weights * pair_keep.to(logits.dtype)
    log_same = pairwise_log_same(logits, size, dilation)
    return -(log_same * weights).sum() / weights.sum().clamp(min=1.0)
