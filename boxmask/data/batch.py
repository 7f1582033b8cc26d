"""Datasets over a CocoDataset, a resumable training sampler, and collation into a padded batch."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .coco import CocoDataset
from .transforms import apply_transforms


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


class TrainSampler(Sampler):
    """Yields, for iteration i = start, start+1, ..., the batch [(index, aug_seed), ...].

    Everything is a function of (seed, iteration), so a resumed run sees exactly the batches an
    uninterrupted run would, without storing sampler state."""

    def __init__(self, size: int, batch_size: int, seed: int, start_iter: int = 0, max_iters: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.max_iters = start_iter, max_iters
        self.rank, self.world_size = rank, world_size

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, epoch, self.size)

    def batch_for(self, it: int) -> list[tuple[int, int]]:
        global_bs = self.batch_size * self.world_size
        first = it * global_bs + self.rank * self.batch_size
        out = []
        for k in range(first, first + self.batch_size):
            epoch, pos = divmod(k, self.size)
            out.append((int(self._epoch_perm(epoch)[pos]), int(np.random.default_rng([self.seed, 1 << 20, k]).integers(1 << 31))))
        return out

    def __iter__(self):
        it = self.start_iter
        while self.max_iters is None or it < self.max_iters:
            yield self.batch_for(it)
            it += 1

    def __len__(self) -> int:
        return max((self.max_iters or 0) - self.start_iter, 0)


class TrainDataset(Dataset):
    def __init__(self, coco: CocoDataset, min_sizes: list[int], max_size: int, hflip: float, with_masks: bool):
        self.coco, self.min_sizes, self.max_size, self.hflip, self.with_masks = coco, min_sizes, max_size, hflip, with_masks

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, aug_seed = key
        rng = np.random.default_rng(aug_seed)
        short = int(self.min_sizes[int(rng.integers(len(self.min_sizes)))])
        flip = bool(rng.random() < self.hflip)
        return apply_transforms(self.coco.load(index, self.with_masks), short, self.max_size, flip)


class EvalDataset(Dataset):
    """Test-size samples in file order; ``with_targets`` also loads GT masks (for mask-quality checks)."""

    def __init__(self, coco: CocoDataset, min_size: int, max_size: int, with_targets: bool = False):
        self.coco, self.min_size, self.max_size, self.with_targets = coco, min_size, max_size, with_targets

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, index: int) -> dict:
        return apply_transforms(self.coco.load(index, self.with_targets, for_eval=True), self.min_size, self.max_size, False)


def collate(samples: list[dict], size_divisibility: int = 32) -> dict:
    """Pad images (uint8 raw colours) to a common size divisible by ``size_divisibility``.

    Returns {"images" [B,3,H,W] uint8, "image_sizes", "orig_sizes", "image_ids", "targets": [{boxes,
    labels}], and "gt_masks_padded" (list of [G,H,W]) when the samples carry masks}."""
    max_h = max(s["image"].shape[1] for s in samples)
    max_w = max(s["image"].shape[2] for s in samples)
    d = max(size_divisibility, 1)
    H, W = int(math.ceil(max_h / d) * d), int(math.ceil(max_w / d) * d)
    images = torch.zeros(len(samples), 3, H, W, dtype=torch.uint8)
    for i, s in enumerate(samples):
        h, w = s["image"].shape[1:]
        images[i, :, :h, :w] = s["image"]
    batch = {
        "images": images,
        "image_sizes": [s["image_size"] for s in samples],
        "orig_sizes": [s["orig_size"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
    }
    if all("masks" in s for s in samples):
        padded = []
        for s in samples:
            m = torch.zeros(s["masks"].shape[0], H, W, dtype=torch.uint8)
            m[:, : s["masks"].shape[1], : s["masks"].shape[2]] = s["masks"]
            padded.append(m)
        batch["gt_masks_padded"] = padded
        for t, s in zip(batch["targets"], samples):
            t["has_mask"] = s["has_mask"]
    return batch


def batch_to(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    out = dict(batch)
    out["images"] = batch["images"].to(device, non_blocking=nb)
    out["targets"] = [{k: v.to(device, non_blocking=nb) for k, v in t.items()} for t in batch["targets"]]
    if "gt_masks_padded" in batch:
        out["gt_masks_padded"] = [m.to(device, non_blocking=nb) for m in batch["gt_masks_padded"]]
    return out


def boxes_only(batch: dict) -> dict:
    """The batch without any GT mask (targets keep boxes and labels): what a box-supervised model may see
    when its masks are measured against, or made for, the GT boxes."""
    out = {k: v for k, v in batch.items() if k != "gt_masks_padded"}
    out["targets"] = [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch["targets"]]
    return out
