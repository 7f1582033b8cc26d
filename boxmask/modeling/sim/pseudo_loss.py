"""Fusion of the semantic and instance maps into a pseudo mask, its thresholds, and the pseudo loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from ..color import unfold_neighbours


def fuse(m_s: torch.Tensor | None, m_i: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """P = (1 - alpha) M_S + alpha M_I (a missing map drops out)."""
    if m_s is None:
        return m_i
    if m_i is None:
        return m_s
    return (1.0 - alpha) * m_s + alpha * m_i


def adaptive_high_threshold(prob: torch.Tensor, box: torch.Tensor, n_pos: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per object: the in-box value of ``prob`` at rank ``n_pos`` (descending), clamped to [lo, hi].

    The foreground area then follows the confident area of the instance map, re-ranked by the fused score."""
    g = prob.shape[0]
    vals = torch.where(box > 0, prob, torch.full_like(prob, -1.0)).flatten(1)
    ordered = vals.sort(dim=1, descending=True).values
    rank = (n_pos.long() - 1).clamp(min=0, max=ordered.shape[1] - 1)
    t = ordered[torch.arange(g, device=prob.device), rank]
    t = torch.where(n_pos > 0, t, torch.full_like(t, hi))
    return t.clamp(lo, hi)


def pseudo_targets(prob: torch.Tensor, box: torch.Tensor, tau_high: torch.Tensor, tau_low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target M_hat = (P > tau_high) in the box; weight 1 on confident pixels (P > tau_high or
    P < tau_low) inside the box, 0 in the ignore band and outside the box."""
    high = prob > tau_high[:, None, None]
    target = (high & (box > 0)).float()
    weight = ((high | (prob < tau_low)) & (box > 0)).float()
    return target, weight


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, h, w] masks -> bool: the cells within ``radius`` cells (a square) of a nonzero one."""
    return F.max_pool2d(masks.float()[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def margin_ignored(target: torch.Tensor, weight: torch.Tensor, margin: int) -> torch.Tensor:
    """The weight with the pseudo background within ``margin`` cells of the pseudo foreground ignored: the
    teacher's boundary on the mask grid is often a cell inside the object (its masks shrink under
    self-training), and a confident background rim would pull the student's mask in with it."""
    if margin <= 0:
        return weight
    near_fg = F.max_pool2d((target * weight)[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0]
    return weight * (1.0 - near_fg * (1.0 - target))


def soft_targets(prob: torch.Tensor, box: torch.Tensor, claimed: torch.Tensor | None = None) -> torch.Tensor:
    """The fused map itself as the pseudo loss's target on the confident pixels (a distillation target that
    keeps the teacher's confidence at the boundary, where M_hat's 0/1 rounds it): its value inside the box,
    0 outside it and where a rival claims the pixel (instance competition)."""
    soft = prob.clamp(0.0, 1.0) * (box > 0)
    return soft if claimed is None else soft.masked_fill(claimed, 0.0)


def rim_targets(target: torch.Tensor, weight: torch.Tensor, box: torch.Tensor, soft: torch.Tensor,
                width: int = 1, rest: str = "hard") -> torch.Tensor:
    """Targets that treat the rim of the confident background apart: the confident background within
    ``width`` cells of the rest of the box (the pseudo foreground or the ignore band) takes the soft target
    ``soft``. ``rest``: hard = M_hat's 0/1 elsewhere; soft = the soft target elsewhere too, except the
    confident background beyond the rim, pulled to 0 (a colour-matched region deep in the box is pushed out
    as with hard targets, while the object's own boundary keeps the teacher's values)."""
    bg = (weight > 0) & (target == 0)
    near = dilate((box > 0) & ~bg, width)
    if rest == "soft":
        return soft.masked_fill(bg & ~near, 0.0)
    return torch.where(bg & near, soft, target)


def split_pairs(target: torch.Tensor, weight: torch.Tensor, size: int = 3, dilation: int = 2) -> torch.Tensor:
    """[N, h, w] pseudo target and weight -> [N, K, h, w]: 1 where a pixel and its neighbour are both
    confident and the pseudo label puts them on different sides (one foreground, one background)."""
    fg = (target * weight)[:, None]
    bg = ((1.0 - target) * weight)[:, None]
    fg_n = unfold_neighbours(fg, size, dilation)[:, 0]
    bg_n = unfold_neighbours(bg, size, dilation)[:, 0]
    return fg * bg_n + bg * fg_n  # [N, 1, h, w] broadcast over the K neighbours


def cut_sides(target: torch.Tensor, weight: torch.Tensor, fused: torch.Tensor, claimed: torch.Tensor | None,
              high: float = 0.0, low: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo target and weight the pairwise cut uses: foreground where the pseudo label's is and the
    fused map is >= ``high``; background where the pseudo label's is and the map is <= ``low``, or where a
    rival claims the pixel (``claimed``). The defaults (0, 1) return the pseudo label as it is."""
    if high <= 0.0 and low >= 1.0:
        return target, weight
    fg = target * weight * (fused >= high)
    bg = (1.0 - target) * weight * (fused <= low)
    if claimed is not None:
        bg = torch.maximum(bg, claimed.to(bg.dtype) * weight)
    return fg, fg + bg


def region_weight(target: torch.Tensor, weight: torch.Tensor, region: str = "all") -> torch.Tensor:
    """The weight restricted to the supervised region: ``all`` keeps it, ``background`` keeps only the
    confident pixels the pseudo label makes background."""
    if region == "background":
        return weight * (1.0 - target)
    return weight


def pseudo_mask_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str = "bce_dice") -> torch.Tensor:
    """Per-instance loss on the confident pixels: BCE (mean over them) + Dice (over them); ``bce`` the
    BCE alone; ``focal`` the released code's focal-only form, normalised by the weight sum. Returns [N]."""
    logits = logits.float()
    if kind == "focal":
        fl = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
        return (fl * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)
    if kind == "bce":
        return bce
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1.0 - 2.0 * (p * t).flatten(1).sum(1) / ((p * p).flatten(1).sum(1) + (t * t).flatten(1).sum(1) + 1e-5)
    # Dice is constant (1) for an object with no confident foreground: leave it out there.
    dice = dice * (t.flatten(1).sum(1) > 0).float()
    return (bce + dice) * (weight.flatten(1).sum(1) > 0).float()
