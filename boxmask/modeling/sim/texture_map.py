"""SIM's texture map: per object, whether a box cell looks like the object's own cells or like its background
in the backbone's low-level (stride-8) features.

Class prototypes of the mask features (the paper's semantic map) did not rank a box's cells better than the
instance map on our benchmark; an object's own appearance against its own surroundings does, where a
background region of the object's colour but the background's texture hugs the object (README, SIM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..color import unfold_neighbours
from .pseudo_loss import dilate


def background_ring(box: torch.Tensor, width: int) -> torch.Tensor:
    """[G, h, w] box masks -> the cells within ``width`` cells outside each box (certain background for it)."""
    return dilate(box, width) & ~(box > 0)


def texture_contrast(feats: torch.Tensor, image: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                     min_cells: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``feats`` [B, C, h, w] per image, ``image`` [G] each object's image, ``fg`` / ``bg`` [G, h, w] the
    cells taken as the object's own and as its background. Per object, with p_fg, p_bg the mean unit
    feature of those cells (unit length), the contrast ``cos(f, p_fg) - cos(f, p_bg)`` at every cell
    ([G, h, w], in [-2, 2]: > 0 where a cell looks more like the object than like its surroundings). Also
    [G] bool: both sets have at least ``min_cells`` cells (elsewhere the contrast means nothing).
    Written without per-object gathers of the feature map (C can be 512 at R-50)."""
    b, c, h, w = feats.shape
    g = image.shape[0]
    f = F.normalize(feats.float(), dim=1).flatten(2)  # [B, C, P]
    rows = torch.arange(g, device=feats.device)

    def prototype(cells: torch.Tensor) -> torch.Tensor:
        sums = torch.einsum("bcp,gp->gbc", f, cells.flatten(1).float())[rows, image]  # [G, C]
        return F.normalize(sums, dim=1)

    direction = prototype(fg) - prototype(bg)  # cos(f, p_fg) - cos(f, p_bg) = f . (p_fg - p_bg)
    score = torch.einsum("bcp,gc->gbp", f, direction)[rows, image].view(g, h, w)
    valid = (fg.flatten(1).sum(1) >= min_cells) & (bg.flatten(1).sum(1) >= min_cells)
    return score, valid


def texture_map(feats: torch.Tensor, image: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, box: torch.Tensor,
                tau: float, min_cells: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``texture_contrast`` as a map: ``sigmoid(contrast / tau)`` in the box ([G, h, w]), 0 outside, and
    whether it means anything ([G])."""
    score, valid = texture_contrast(feats, image, fg, bg, min_cells)
    return torch.sigmoid(score / tau) * (box > 0), valid


def texture_split(contrast: torch.Tensor, valid: torch.Tensor, step: float, size: int, dilation: int) -> torch.Tensor:
    """[G, h, w] texture contrasts -> [G, K, h, w]: 1 for the neighbour pairs (``unfold_neighbours``' order)
    whose two cells fall on opposite sides of their object's contrast (one > 0, the other <= 0) with a step of
    at least ``step`` between them: one looks like the object, the other like its surroundings. 0 for the
    objects whose contrast means nothing (``valid`` false)."""
    d = contrast[:, None]
    dn = unfold_neighbours(d, size, dilation)[:, 0]
    in_image = unfold_neighbours(torch.ones_like(d[:1]), size, dilation)[:, 0] > 0  # no pair leaves the map
    split = ((d > 0) != (dn > 0)) & ((d - dn).abs() >= step) & in_image & valid[:, None, None, None]
    return split.to(contrast.dtype)
