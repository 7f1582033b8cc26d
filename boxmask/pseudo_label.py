"""`boxmask pseudo-label`: a mask for every GT box of a COCO json, to train any downstream model.

For each box the mask head runs with the parameters of the positive locations assigned to that box,
their masks merged with the self-correction weights (softmax of mu x IoU of predicted and GT box),
pasted at the original image size and restricted to the box. Every input annotation comes back with its
id, box and category; an object whose mask is empty (or that got no positive location) gets its filled
box, and is counted."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic_io import atomic_write_text
from .data.batch import EvalDataset, batch_to, boxes_only, collate
from .data.coco import CocoDataset, coco_from_dict, read_json
from .modeling.condinst import encode_rle, paste_probs
from .modeling.sim.copy_paste import box_pixel_masks
from .modeling.sim.self_correction import merge_per_object


@torch.no_grad()
def pseudo_label(model, dataset: CocoDataset, device: torch.device, mask_thresh: float = 0.5, min_quality: float = 0.0,
                 progress: bool = True) -> tuple[dict[int, dict], dict]:
    """Per annotation id: {"segmentation" (RLE), "area", "quality", "fallback": None | "empty" |
    "no_positive"}; and counts."""
    cfg = model.cfg
    stride = cfg.model.mask_out_stride
    loader = DataLoader(EvalDataset(dataset, cfg.data.min_size_test, cfg.data.max_size, with_targets=True),
                        batch_size=1, collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility))
    model.eval()
    out: dict[int, dict] = {}
    counts = {"objects": 0, "empty": 0, "no_positive": 0, "low_quality": 0}
    for batch in tqdm(loader, desc="pseudo-label", disable=not progress):
        batch = batch_to(batch, device)
        image_id = batch["image_ids"][0]
        anns = [a for a in dataset.annotations[image_id] if not a.get("iscrowd", 0)]
        if not anns:
            continue
        _, aux = model.forward_train(boxes_only(batch), return_aux=True)
        ih, iw = batch["image_sizes"][0]
        oh, ow = batch["orig_sizes"][0]
        merged_by_obj: dict[int, torch.Tensor] = {}
        if aux["mask_logits"].shape[0]:
            groups, _, _, merged = merge_per_object(aux["inst"], aux["mask_logits"].float().sigmoid()[:, 0],
                                                    cfg.sim.mu, cfg.sim.weighting)
            merged_by_obj = {int(g): merged[k] for k, g in enumerate(groups.tolist())}
        for k, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            box = box_pixel_masks(torch.tensor([[x, y, x + w, y + h]], device=device, dtype=torch.float32), oh, ow)[0]
            prob = merged_by_obj.get(k)
            fallback = None
            if prob is None:
                fallback = "no_positive"
            else:
                # one object at a time at the original size: memory stays bounded on large images
                p = paste_probs(prob[None], stride, (ih, iw), (oh, ow))[0]
                mask = (p > mask_thresh) & box
                if not mask.any():
                    fallback = "empty"
            if fallback is not None:
                mask, quality = box, 0.0
                counts[fallback] += 1
            else:
                quality = float((p * mask).sum() / mask.sum())
            rle = encode_rle(mask)
            rec = {"segmentation": rle, "area": float(mask_util.area(rle)), "quality": quality, "fallback": fallback}
            if quality < min_quality:
                counts["low_quality"] += 1
            out[ann["id"]] = rec
            counts["objects"] += 1
    return out, counts


def write_pseudo_labels(json_path: str | Path, labels: dict[int, dict], out_path: str | Path, min_quality: float) -> dict:
    """The input json with ``segmentation`` (RLE), ``area`` and ``pseudo_quality`` set per annotation (and
    ``pseudo_fallback`` / ``pseudo_low_quality`` where they apply), validated with pycocotools before it
    is written atomically. Returns the output dict."""
    data = read_json(json_path)
    out = copy.deepcopy(data)
    for a in out["annotations"]:
        rec = labels.get(a["id"])
        if rec is None:
            continue  # crowd regions are left as they are
        a["segmentation"] = rec["segmentation"]
        a["area"] = rec["area"]
        a["pseudo_quality"] = round(rec["quality"], 4)
        if rec["fallback"]:
            a["pseudo_fallback"] = rec["fallback"]
        if rec["quality"] < min_quality:
            a["pseudo_low_quality"] = True
    coco = coco_from_dict(out)  # validation: pycocotools must read every mask
    for a in out["annotations"]:
        if a["id"] in labels:
            coco.annToRLE(a)
    atomic_write_text(out_path, json.dumps(out))
    return out


def gt_miou(dataset: CocoDataset, labels: dict[int, dict]) -> float | None:
    """Mean IoU of the pseudo masks against the GT masks where the input json has them."""
    ious = []
    for anns in dataset.annotations.values():
        for a in anns:
            if a.get("iscrowd", 0) or "segmentation" not in a or a["id"] not in labels:
                continue
            gt = dataset.coco.annToRLE(a)
            ious.append(float(mask_util.iou([labels[a["id"]]["segmentation"]], [gt], [0])[0, 0]))
    return float(np.mean(ious)) if ious else None
