"""Degenerate-mask diagnostics: box fill of predicted masks, and the warnings that explain it.

Box-supervised masks that fill their boxes are the most common failure users report ("my masks come
out box-shaped", "mask AP is 0"); these figures make it visible during training and evaluation."""
from __future__ import annotations

import torch

FULL_FILL = 0.95  # a mask filling more than this share of its box counts as box-shaped

DEGENERATE_CAUSES = (
    "likely causes to check: (1) the pairwise colour threshold (loss.pairwise_color_thresh): too low and "
    "every neighbour counts as similar; (2) the colour input of the pairwise term: images must reach the "
    "model as raw RGB 0-255 (not BGR, not already normalised); (3) the pairwise warm-up "
    "(loss.pairwise_warmup_frac): too long and the projection loss alone teaches boxes; (4) the learning "
    "rate: too low and the mask head has not moved yet, too high and it collapsed"
)


@torch.no_grad()
def fill_from_logits(mask_logits: torch.Tensor, box_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean box fill (mask area inside the box / box area) of the instances' masks (logit > 0) and the
    fraction of them above ``FULL_FILL``; 0-d tensors (no host sync), NaN without instances."""
    if mask_logits.shape[0] == 0:
        nan = mask_logits.new_tensor(float("nan")).float()
        return nan, nan
    box = box_masks.float().flatten(1)
    inside = ((mask_logits[:, 0].detach() > 0).float().flatten(1) * box).sum(1)
    fill = inside / box.sum(1).clamp_min(1.0)
    return fill.mean(), (fill > FULL_FILL).float().mean()


def fill_of_fills(fills: list[float]) -> tuple[float, float]:
    """(mean, fraction above FULL_FILL) of per-mask fills; NaN when there are none."""
    if not fills:
        return float("nan"), float("nan")
    t = torch.tensor(fills, dtype=torch.float64)
    return float(t.mean()), float((t > FULL_FILL).double().mean())


def degenerate_warning(fill: float, thresh: float) -> str | None:
    if thresh > 0 and fill == fill and fill > thresh:
        return (f"predicted masks fill {fill:.0%} of their boxes on average after the pairwise warm-up "
                f"(warning threshold {thresh:.0%}): they are still box-shaped; " + DEGENERATE_CAUSES)
    return None


def ap_gap_warning(metrics: dict, ratio: float = 0.5, min_box_ap: float = 0.05) -> str | None:
    """A warning when mask AP is far below box AP (the boxes are found but the masks are not)."""
    box_ap = metrics.get("bbox", {}).get("AP", float("nan"))
    mask_ap = metrics.get("segm", {}).get("AP", float("nan"))
    if box_ap == box_ap and mask_ap == mask_ap and box_ap >= min_box_ap and mask_ap < ratio * box_ap:
        fill = metrics.get("box_fill", float("nan"))
        return (f"mask AP {mask_ap:.3f} is far below box AP {box_ap:.3f} (box fill {fill:.2f}): the detector "
                "finds the objects but the masks are poor; " + DEGENERATE_CAUSES)
    return None
