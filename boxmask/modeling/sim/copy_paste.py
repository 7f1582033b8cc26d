"""Online weakly-supervised Copy-Paste (SIM, spec section 2.6).

A FIFO memory bank keeps recent training images with a paste mask per object (the teacher's merged
instance map > 0.7, inside the box, at full resolution) and a quality score. Objects of a bank image are
pasted at the same position into a new image, which manufactures occlusions between instances; the
objects underneath lose the covered pixels and their boxes shrink to what remains."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..condinst import box_cells, host_to_device


def box_pixel_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[K, h, w] bool: pixels whose centre lies inside each xyxy box (the mask grid's rule at stride 1)."""
    return box_cells(boxes, h, w, 1)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) of boolean masks [K, h, w]; an empty mask gives (0, 0, 0, 0).
    Row/column reductions rather than ``masks_to_boxes`` (a nonzero per mask): no host sync."""
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, 4, device=masks.device)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [K, w], [K, h]
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    x0 = torch.where(cols, xs, float(w)).amin(dim=1)
    x1 = torch.where(cols, xs + 1, 0.0).amax(dim=1)
    y0 = torch.where(rows, ys, float(h)).amin(dim=1)
    y1 = torch.where(rows, ys + 1, 0.0).amax(dim=1)
    empty = ~cols.any(dim=1)
    return torch.where(empty[:, None], 0.0, torch.stack([x0, y0, x1, y1], dim=1))


def select_objects(scores: torch.Tensor, fraction: float, min_n: int, max_n: int, replacement: bool,
                   power: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the objects to paste: floor(fraction * #objects) clamped to [min_n, max_n], drawn in
    proportion to score**power among the objects with a positive score (without replacement: each at
    most once, and no more than there are)."""
    weights = scores.float().clamp_min(0) ** power
    weights = torch.where(scores > 0, weights, torch.zeros_like(weights))
    n_valid = int((weights > 0).sum())
    if n_valid == 0:
        return torch.zeros(0, dtype=torch.long)
    n = min(max(math.floor(fraction * scores.numel()), min_n), max_n)
    if not replacement:
        n = min(n, n_valid)
    return torch.multinomial(weights.cpu(), n, replacement=replacement, generator=generator)


class MemoryBank(nn.Module):
    """FIFO bank of recent samples (CPU copies, never views of a batch): each entry holds the raw uint8
    image at its training size, the objects' boxes and classes, a paste mask per object (cropped to its
    tight box, with the crop's top-left corner) and a quality score (0 = nothing to paste). The entries
    are part of the module's state dict, so a checkpoint restores the bank exactly."""

    def __init__(self, length: int = 100):
        super().__init__()
        if length < 1:
            raise ValueError(f"memory bank length must be >= 1, got {length}")
        self.length = length
        self.entries: list[dict] = []

    def __len__(self) -> int:
        return len(self.entries)

    def full(self) -> bool:
        return len(self.entries) >= self.length

    @torch.no_grad()
    def push(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
             scores: torch.Tensor) -> None:
        """Add one sample: ``image`` [3, h, w] uint8, ``masks`` [K, h, w] bool; the oldest entry goes
        when the bank is full. Works on CPU copies (one transfer, then no device syncs per object)."""
        masks = masks.to("cpu")
        crops, offsets = [], []
        for m in masks:
            if m.any():
                x0, y0, x1, y1 = tight_boxes(m[None])[0].long().tolist()
                crops.append(m[y0:y1, x0:x1].to("cpu", copy=True))
                offsets.append((y0, x0))
            else:
                crops.append(torch.zeros(0, 0, dtype=torch.bool))
                offsets.append((0, 0))
        nonempty = torch.tensor([c.numel() > 0 for c in crops], dtype=torch.bool)
        self.entries.append({
            "image": image.to("cpu", copy=True).contiguous(),
            "boxes": boxes.to("cpu", torch.float32, copy=True),
            "labels": labels.to("cpu", copy=True),
            "masks": crops,
            "offsets": torch.tensor(offsets, dtype=torch.long).reshape(-1, 2),
            "scores": torch.where(nonempty, scores.to("cpu", torch.float32), torch.zeros(len(crops))),
        })
        while len(self.entries) > self.length:
            self.entries.pop(0)

    @staticmethod
    def object_mask(entry: dict, k: int, h: int, w: int, device=None) -> torch.Tensor:
        """Object ``k``'s paste mask on an [h, w] canvas (cropped where the canvas is smaller)."""
        out = torch.zeros(h, w, dtype=torch.bool)
        crop = entry["masks"][k]
        y0, x0 = entry["offsets"][k].tolist()
        ch, cw = min(crop.shape[0], max(h - y0, 0)), min(crop.shape[1], max(w - x0, 0))
        if ch > 0 and cw > 0:
            out[y0:y0 + ch, x0:x0 + cw] = crop[:ch, :cw]
        return out if device is None else out.to(device)

    def get_extra_state(self) -> dict:
        return {"length": self.length, "entries": self.entries}

    def set_extra_state(self, state: dict) -> None:
        self.entries = list(state["entries"])[-self.length:]


@torch.no_grad()
def paste_batch(batch: dict, bank: MemoryBank, generator: torch.Generator, fraction: float = 0.25,
                min_n: int = 1, max_n: int = 3, replacement: bool = False, power: float = 1.0) -> dict:
    """Paste objects of one random bank entry into each image of ``batch`` (same absolute position, before
    normalisation). Returns a new batch whose targets carry ``pasted`` flags and whose
    ``region_masks_padded`` give each object's supervision region: what remains of its box for the
    objects underneath (their boxes shrink to it; fully covered ones are dropped), the visible paste
    mask for the pasted ones (their box is its tight box). The input batch is not modified.

    The choice and cropping of the paste masks happen on the host (the bank lives there); on the device
    everything is elementwise, and which objects survive is read back once for the whole batch."""
    images = batch["images"].clone()
    hp, wp = images.shape[-2:]
    dev = images.device
    gt_masks = batch.get("gt_masks_padded")  # mixed supervision: the GT masks lose the pasted pixels too
    staged = []  # per image: (boxes, labels, pasted, has_mask, region, changed, gt, whether anything was pasted)
    for i, t in enumerate(batch["targets"]):
        h, w = batch["image_sizes"][i]
        boxes, labels = t["boxes"], t["labels"]
        gt = gt_masks[i] if gt_masks is not None else None
        has_mask = t.get("has_mask")
        region = box_pixel_masks(boxes, hp, wp)
        changed = torch.zeros(len(boxes), dtype=torch.bool, device=dev)
        entry = bank.entries[int(torch.randint(len(bank), (1,), generator=generator))]
        chosen = select_objects(entry["scores"], fraction, min_n, max_n, replacement, power, generator)
        src = entry["image"]
        sh, sw = min(src.shape[1], hp), min(src.shape[2], wp)
        masks, new_labels = [], []
        for k in chosen.tolist():
            m = MemoryBank.object_mask(entry, k, hp, wp)  # host
            m[min(h, sh):] = False
            m[:, min(w, sw):] = False
            if m.any():
                masks.append(m)
                new_labels.append(entry["labels"][k])
        num_old = len(boxes)
        if masks:
            ms = torch.stack(masks).to(dev, non_blocking=True)
            src_d = torch.zeros(3, hp, wp, dtype=images.dtype)
            src_d[:, :sh, :sw] = src[:, :sh, :sw]
            src_d = src_d.to(dev, non_blocking=True)
            for m in ms:  # later pastes cover earlier ones
                images[i] = torch.where(m, src_d, images[i])
                changed = changed | (region & m).flatten(1).any(1)
                region = torch.cat([region & ~m, m[None]])
                changed = torch.cat([changed, changed.new_zeros(1)])
                if gt is not None:
                    # pasted objects are supervised by the paste loss, not as GT-mask objects
                    gt = torch.cat([gt * (~m).to(gt.dtype), m[None].to(gt.dtype)])
            boxes = torch.cat([boxes, tight_boxes(ms).to(boxes.dtype)])
            labels = torch.cat([labels, torch.stack(new_labels).to(dev, labels.dtype)])
            if has_mask is not None:
                has_mask = torch.cat([has_mask, has_mask.new_zeros(len(masks))])
        pasted = torch.arange(len(boxes), device=dev) >= num_old
        staged.append((boxes, labels, pasted, has_mask, region, changed, gt, bool(masks)))
    if not any(st[-1] for st in staged):
        return batch
    # one read-back for the batch: which objects keep some region (the rest are fully covered)
    keep_all = torch.cat([st[4].flatten(1).any(1) for st in staged]).tolist()
    targets, regions, new_gt, a = [], [], [], 0
    for boxes, labels, pasted, has_mask, region, changed, gt, _ in staged:
        keep_list = [j for j in range(len(boxes)) if keep_all[a + j]]
        a += len(boxes)
        keep = host_to_device(keep_list, dev)
        # objects that lost pixels shrink to what remains of their box
        boxes = torch.where(changed[:, None], tight_boxes(region).to(boxes.dtype), boxes)
        new_t = {"boxes": boxes[keep], "labels": labels[keep], "pasted": pasted[keep]}
        if has_mask is not None:
            new_t["has_mask"] = has_mask[keep]
        targets.append(new_t)
        regions.append(region[keep])
        if gt is not None:
            new_gt.append(gt[keep])
    out = dict(batch)
    out.update(images=images, targets=targets, region_masks_padded=regions)
    if gt_masks is not None:
        out["gt_masks_padded"] = new_gt
    return out
