"""TensorBoard event files and the training pictures that go into them.

Scalars: every loss term, the learning rate, box fill, SIM's pseudo-label statistics and the evaluation
metrics. Pictures (every ``tb_image_period`` iterations): training images with the masks predicted for
their objects; for SIM each object's semantic map, instance map, fused map and pseudo label; copy-paste
composites with their updated boxes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..modeling.sim.self_correction import merge_per_object
from ..predict import readable
from ..visualize import draw_instances, grid, sim_maps_picture


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class EventWriter:
    """Writes to ``RUN/events.out.tfevents.*`` on rank 0; does nothing when disabled or on other ranks.
    A resumed run drops the events the killed run logged after its checkpoint (``purge_step``)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.writer = None
        if enabled and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step or None)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in _flat(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _image(batch: dict, i: int) -> np.ndarray:
    h, w = batch["image_sizes"][i]
    return batch["images"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def prediction_pictures(batch: dict, aux: dict, stride: int, class_names: list[str], max_images: int = 4) -> np.ndarray | None:
    """Training images with the masks the mask head predicts for their GT objects (positives merged)."""
    logits = aux["mask_logits"]
    if logits.shape[0] == 0:
        return None
    inst = aux["inst"]
    groups, group, _, merged = merge_per_object(inst, logits.float().sigmoid()[:, 0], mode="mean")
    first = torch.zeros(groups.numel(), dtype=torch.long, device=logits.device).scatter_(
        0, group, torch.arange(group.numel(), device=logits.device))
    g_img = inst["image"][first]
    pictures = []
    for i in range(min(max_images, batch["images"].shape[0])):
        sel = torch.nonzero(g_img == i).flatten()
        h, w = batch["image_sizes"][i]
        masks = merged[sel].repeat_interleave(stride, 1).repeat_interleave(stride, 2)[:, :h, :w] > 0.5
        det = {"boxes": aux["gt_boxes"][groups[sel]].cpu(), "labels": inst["label"][first[sel]].cpu(),
               "masks": masks.cpu(), "scores": torch.ones(sel.numel())}
        image, det = readable(_image(batch, i), det, 0.0, min_side=256)
        det.pop("scores")
        pictures.append(draw_instances(image, det, class_names))
    return grid(pictures)


@torch.no_grad()
def sim_pictures(batch: dict, pm: dict, stride: int, max_objects: int = 4) -> np.ndarray | None:
    """Per object (up to ``max_objects``): image, M_S, M_I, fused map and pseudo label, cropped around the box."""
    rows = []
    for g in torch.nonzero(pm["has_pos"]).flatten()[:max_objects].tolist():
        box = pm["box"][g] > 0
        if not box.any():
            continue
        ys, xs = torch.nonzero(box, as_tuple=True)
        h, w = box.shape
        y0, y1 = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 3, h)
        x0, x1 = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 3, w)
        img = batch["images"][pm["image"][g], :, stride // 2 :: stride, stride // 2 :: stride][:, :h, :w]
        crop = lambda t: t[y0:y1, x0:x1].float().cpu().numpy()  # noqa: E731
        m_s = crop(pm["m_s"][g]) if pm.get("m_s") is not None else None
        rows.append(sim_maps_picture(img[:, y0:y1, x0:x1].permute(1, 2, 0).cpu().numpy(), m_s, crop(pm["m_i"][g]),
                                     crop(pm["fused"][g]), crop(pm["target"][g]), crop(pm["weight"][g]), crop(pm["box"][g])))
    return grid(rows, columns=1) if rows else None


def paste_picture(batch: dict, i: int, class_names: list[str]) -> np.ndarray:
    """A copy-paste composite with its updated boxes and supervision regions (pasted objects labelled)."""
    t = batch["targets"][i]
    h, w = batch["image_sizes"][i]
    names = list(class_names) + [f"pasted {n}" for n in class_names]
    det = {"boxes": t["boxes"].cpu(), "labels": (t["labels"] + len(class_names) * t["pasted"].long()).cpu(),
           "scores": torch.ones(len(t["boxes"])), "masks": batch["region_masks_padded"][i][:, :h, :w].cpu()}
    image, det = readable(_image(batch, i), det, 0.0)
    det.pop("scores")
    return draw_instances(image, det, names)
