"""Degenerate-mask diagnostics: box fill and spill of predicted masks, the training budget, and the
warnings that explain them.

Box-supervised masks that fill their boxes, or that spill over the whole image, are the most common
failures users report ("my masks come out box-shaped", "mask AP is 0"); these figures make them visible
during training and evaluation."""
from __future__ import annotations

import math

import torch

FULL_FILL = 0.95  # a mask filling more than this share of its box counts as box-shaped
SPILL_WARN = 0.5  # masks with more than half a box area outside their box spill (training)
EVAL_SPILL_FILL = 1.5  # eval box fill (whole mask area / box area) above this: the masks spill
# The CPU presets (tiny, mobilenet_v2_192: 600 iterations x 8 images) reach usable masks on small data at
# about this many images seen; larger data needs about as many epochs as the 1x schedule on COCO.
REFERENCE_IMAGES_SEEN = 4800
REFERENCE_EPOCHS = 12
SHORT_RUN = 0.5  # a run with fewer than this share of the images it needs is too short

DEGENERATE_CAUSES = (
    "likely causes to check: (1) the pairwise colour threshold (loss.pairwise_color_thresh): too low and "
    "every neighbour counts as similar; (2) the colour input of the pairwise term: images must reach the "
    "model as raw RGB 0-255 (not BGR, not already normalised); (3) the pairwise warm-up "
    "(loss.pairwise_warmup_frac): too long and the projection loss alone teaches boxes; (4) the learning "
    "rate: too low and the mask head has not moved yet, too high and it collapsed"
)


@torch.no_grad()
def fill_and_spill_from_logits(mask_logits: torch.Tensor,
                               box_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of the instances' masks (logit > 0): the mean box fill (mask area inside the box / box area), the
    fraction of masks above ``FULL_FILL``, and the mean spill (mask area outside the box / box area);
    0-d tensors (no host sync), NaN without instances."""
    if mask_logits.shape[0] == 0:
        nan = mask_logits.new_tensor(float("nan")).float()
        return nan, nan, nan
    box = box_masks.float().flatten(1)
    mask = (mask_logits[:, 0].detach() > 0).float().flatten(1)
    area = box.sum(1).clamp_min(1.0)
    inside = (mask * box).sum(1)
    fill = inside / area
    spill = (mask.sum(1) - inside) / area
    return fill.mean(), (fill > FULL_FILL).float().mean(), spill.mean()


def fill_from_logits(mask_logits: torch.Tensor, box_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean box fill and the fraction of masks above ``FULL_FILL`` (see ``fill_and_spill_from_logits``)."""
    return fill_and_spill_from_logits(mask_logits, box_masks)[:2]


def fill_of_fills(fills: list[float]) -> tuple[float, float]:
    """(mean, fraction above FULL_FILL) of per-mask fills; NaN when there are none."""
    if not fills:
        return float("nan"), float("nan")
    t = torch.tensor(fills, dtype=torch.float64)
    return float(t.mean()), float((t > FULL_FILL).double().mean())


def images_needed(dataset_size: int) -> int:
    """About how many images a run must see before box-supervised masks are usable."""
    return max(REFERENCE_IMAGES_SEEN, REFERENCE_EPOCHS * dataset_size)


def short_run_warning(iterations: int, images_per_step: int, dataset_size: int) -> str | None:
    """"N iterations (~E epochs of this data) is far too short: ..." when a run sees fewer than
    ``SHORT_RUN`` of the images it needs (``images_needed``); None otherwise."""
    if iterations <= 0 or images_per_step <= 0 or dataset_size <= 0:
        return None
    seen, need = iterations * images_per_step, images_needed(dataset_size)
    if seen >= SHORT_RUN * need:
        return None
    need_iters = math.ceil(need / images_per_step)
    how = "far too short" if seen < need / 4 else "too short"
    return (f"{iterations} iterations (~{seen / dataset_size:.3g} epochs of these {dataset_size} images) is {how}: "
            f"masks need about {need_iters} iterations at {images_per_step} images per step (~{need} images seen, "
            f"~{need / dataset_size:.3g} epochs); train with --max-iters {need_iters}")


def degenerate_warning(fill: float, thresh: float, short_run: str | None = None) -> str | None:
    """Training masks still box-shaped after the pairwise warm-up (in-box fill above ``thresh``)."""
    if thresh > 0 and fill == fill and fill > thresh:
        return (f"predicted masks fill {fill:.0%} of their boxes on average after the pairwise warm-up "
                f"(warning threshold {thresh:.0%}): they are still box-shaped; " + (short_run or DEGENERATE_CAUSES))
    return None


def spill_warning(spill: float, fill: float, short_run: str | None = None, thresh: float = SPILL_WARN) -> str | None:
    """Training masks that reach far outside their boxes (spill: area outside / box area)."""
    if spill == spill and spill > thresh:
        cause = short_run or ("the projection term has not taught the mask head where the box ends yet; check "
                              "the learning rate (solver.lr) and that the boxes match the images")
        return (f"predicted masks spill outside their boxes: {spill:.1f} box areas outside each box on average "
                f"(in-box fill {fill:.0%}); they are not object masks yet; " + cause)
    return None


def ap_gap_warning(metrics: dict, ratio: float = 0.5, min_box_ap: float = 0.05,
                   short_run: str | None = None) -> str | None:
    """A warning when mask AP is far below box AP (the boxes are found but the masks are not), with the
    reason the box fill gives and ``short_run`` (see ``short_run_warning``) when the run was too short."""
    box_ap = metrics.get("bbox", {}).get("AP", float("nan"))
    mask_ap = metrics.get("segm", {}).get("AP", float("nan"))
    if not (box_ap == box_ap and mask_ap == mask_ap and box_ap >= min_box_ap and mask_ap < ratio * box_ap):
        return None
    fill = metrics.get("box_fill", float("nan"))
    shape = mask_shape(metrics)
    what = {"spill": f"they spill outside their boxes (mask area {fill:.1f}x the box area)",
            "box": f"they are box-shaped (box fill {fill:.2f})"}.get(shape, f"box fill {fill:.2f}")
    return (f"mask AP {mask_ap:.3f} is far below box AP {box_ap:.3f}: the detector finds the objects but the "
            f"masks are poor; {what}; " + (short_run or DEGENERATE_CAUSES))


def mask_shape(metrics: dict) -> str | None:
    """"spill" or "box" when an evaluation's box fill (mask area / box area) says the masks spill outside
    their boxes or fill them; None otherwise."""
    fill = metrics.get("box_fill", float("nan"))
    over = metrics.get("box_fill_over_95", float("nan"))
    if fill == fill and fill > EVAL_SPILL_FILL:
        return "spill"
    if (fill == fill and fill > FULL_FILL) or (over == over and over > 0.5):
        return "box"
    return None
