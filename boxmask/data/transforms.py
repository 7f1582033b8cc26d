"""Resize (shorter side / max size, multi-scale), horizontal flip, with boxes and masks kept aligned.

Images stay uint8 RGB here: normalisation happens on the model's device, and the pairwise loss reads the
raw colours of the same batch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def target_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)


def apply_transforms(
    sample: dict, short: int, max_size: int, flip: bool
) -> dict:
    """numpy sample -> torch sample: image uint8 [3, h, w], boxes [N, 4], labels, masks uint8 [N, h, w]."""
    image = torch.from_numpy(np.require(sample["image"], requirements=["C", "W"])).permute(2, 0, 1)
    oh, ow = image.shape[-2:]
    nh, nw = target_size(oh, ow, short, max_size)
    if (nh, nw) != (oh, ow):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
    boxes = torch.from_numpy(sample["boxes"]).float().reshape(-1, 4)
    boxes = boxes * torch.tensor([nw / ow, nh / oh, nw / ow, nh / oh])
    masks = sample.get("masks")
    if masks is not None:
        masks = torch.from_numpy(masks)
        if masks.shape[0] and (nh, nw) != (oh, ow):
            masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
        elif not masks.shape[0]:
            masks = torch.zeros(0, nh, nw, dtype=torch.uint8)
    if flip:
        image = image.flip(-1)
        boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
        if masks is not None:
            masks = masks.flip(-1)
    out = {
        "image": image.contiguous(),
        "boxes": boxes,
        "labels": torch.from_numpy(sample["labels"]).long(),
        "image_id": sample["image_id"],
        "orig_size": tuple(int(v) for v in sample["orig_size"]),
        "image_size": (nh, nw),
    }
    if masks is not None:
        out["masks"] = masks.contiguous()
        out["has_mask"] = torch.from_numpy(np.asarray(sample.get("has_mask", np.ones(len(masks), bool)), dtype=bool))
    return out
