"""`boxmask pseudo-label`: a mask for every GT box of a COCO json, to train any downstream model.

For each box the mask head runs with the parameters of the positive locations assigned to that box,
their masks merged with the self-correction weights (softmax of mu x IoU of predicted and GT box),
pasted at the original image size and restricted to the box. Every input annotation comes back with its
id, box and category; an object whose mask is empty (or that got no positive location) gets its filled
box, and is counted.

Each mask gets a quality score in [0, 1] from what can be checked without GT masks (``mask_quality``): a
mask that fills its box, spills outside it, misses some of its rows or columns, or changes with the
threshold scores low. The mean probability inside the mask is no such measure: a model that has learnt
nothing but boxes predicts them with confidence."""
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
from .evaluation.diagnostics import FULL_FILL
from .modeling.condinst import encode_rle, paste_probs
from .modeling.sim.copy_paste import box_pixel_masks
from .modeling.sim.self_correction import merge_per_object

BOX_LIKE_FILL = 0.8  # from this box fill on, a mask looks more and more like its box (an ellipse fills 0.79)
SPILL_FLAG = 0.5  # masks reaching more than half a box area outside their box (before cropping) spill
STABILITY_THRESHOLDS = (0.3, 0.7)
COMPONENTS = ("fill", "spill", "projection", "stability")


@torch.no_grad()
def mask_quality(prob: torch.Tensor, box: torch.Tensor, thresh: float = 0.5) -> dict:
    """Quality of one object's mask probabilities ``prob`` [H, W] (the whole image, before cropping to
    ``box``, a boolean [H, W]): a dict of floats

    - ``fill``: mask area inside the box / box area (a filled box: 1.0);
    - ``spill``: mask area outside the box / box area;
    - ``projection``: the smaller of the shares of the box's rows and of its columns that the mask
      touches (a tight box is touched by its object in every row and column);
    - ``stability``: IoU of the masks at probability 0.3 and 0.7 inside the box;
    - ``quality``: their product, with fill counting from ``BOX_LIKE_FILL`` (1) down to a filled box (0)
      and spill as 1 - spill. A truly rectangular object scores low too: no box-only signal tells it
      from a mask that learnt nothing but the box."""
    box = box.bool()
    box_area = box.sum().clamp_min(1).float()
    full = prob > thresh
    mask = full & box
    fill = mask.sum() / box_area
    spill = (full & ~box).sum() / box_area
    rows, cols = box.any(1), box.any(0)
    projection = torch.minimum(mask.any(1)[rows].float().mean(), mask.any(0)[cols].float().mean())
    low, high = ((prob > t) & box for t in STABILITY_THRESHOLDS)
    stability = (low & high).sum() / (low | high).sum().clamp_min(1)
    fill_term = ((1.0 - fill) / (1.0 - BOX_LIKE_FILL)).clamp(0.0, 1.0)
    quality = fill_term * projection.nan_to_num(0.0) * stability * (1.0 - spill).clamp_min(0.0)
    out = {k: float(v) for k, v in zip(("quality",) + COMPONENTS, (quality, fill, spill, projection, stability))}
    return {k: (0.0 if v != v else v) for k, v in out.items()}


@torch.no_grad()
def pseudo_label(model, dataset: CocoDataset, device: torch.device, mask_thresh: float = 0.5, min_quality: float = 0.0,
                 progress: bool = True) -> tuple[dict[int, dict], dict]:
    """Per annotation id: {"segmentation" (RLE), "area", "quality", the ``COMPONENTS`` of
    ``mask_quality``, "box_shaped", "fallback": None | "empty" | "no_positive"}; and counts."""
    cfg = model.cfg
    stride = cfg.model.mask_out_stride
    loader = DataLoader(EvalDataset(dataset, cfg.data.min_size_test, cfg.data.max_size, with_targets=True),
                        batch_size=1, collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility))
    model.eval()
    out: dict[int, dict] = {}
    counts = {"objects": 0, "empty": 0, "no_positive": 0, "low_quality": 0, "box_shaped": 0, "spilling": 0}
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
                mask, p = box, box.float()  # the filled box, scored as one (quality 0)
                counts[fallback] += 1
            rec = mask_quality(p, box, mask_thresh)
            rle = encode_rle(mask)
            rec.update(segmentation=rle, area=float(mask_util.area(rle)), fallback=fallback,
                       box_shaped=rec["fill"] > FULL_FILL)
            counts["box_shaped"] += rec["box_shaped"] and fallback is None
            counts["spilling"] += rec["spill"] > SPILL_FLAG
            counts["low_quality"] += rec["quality"] < min_quality
            out[ann["id"]] = rec
            counts["objects"] += 1
    return out, counts


def summary(counts: dict, labels: dict[int, dict], min_quality: float) -> str:
    """The printed account of a pseudo-labelling run."""
    n = counts["objects"]
    made = n - counts["empty"] - counts["no_positive"]
    q = np.array([r["quality"] for r in labels.values()]) if labels else np.zeros(1)
    return (f"{n} objects: {made} masks from the model, {counts['empty']} empty masks and {counts['no_positive']} "
            f"objects without a positive location given their filled box (pseudo_fallback); "
            f"{counts['box_shaped']} of the {made} masks are box-shaped (fill > {FULL_FILL:.0%} of the box, "
            f"pseudo_box_shaped), {counts['spilling']} spill outside their box (> {SPILL_FLAG} box areas before "
            f"cropping); quality median {np.median(q):.2f} (pseudo_quality: box fill, spill, projections, "
            f"stability); {counts['low_quality']} below --min-quality {min_quality} (pseudo_low_quality)")


def write_pseudo_labels(json_path: str | Path, labels: dict[int, dict], out_path: str | Path, min_quality: float) -> dict:
    """The input json with ``segmentation`` (RLE), ``area``, ``pseudo_quality`` and its components
    (``pseudo_fill``, ``pseudo_spill``, ``pseudo_projection``, ``pseudo_stability``) set per annotation,
    and ``pseudo_fallback`` / ``pseudo_box_shaped`` / ``pseudo_low_quality`` where they apply; validated
    with pycocotools before it is written atomically. Returns the output dict."""
    data = read_json(json_path)
    out = copy.deepcopy(data)
    for a in out["annotations"]:
        rec = labels.get(a["id"])
        if rec is None:
            continue  # crowd regions are left as they are
        a["segmentation"] = rec["segmentation"]
        a["area"] = rec["area"]
        a["pseudo_quality"] = round(rec["quality"], 4)
        for k in COMPONENTS:
            a[f"pseudo_{k}"] = round(rec[k], 4)
        if rec["fallback"]:
            a["pseudo_fallback"] = rec["fallback"]
        if rec["box_shaped"]:
            a["pseudo_box_shaped"] = True
        if rec["quality"] < min_quality:
            a["pseudo_low_quality"] = True
    coco = coco_from_dict(out)  # validation: pycocotools must read every mask
    for a in out["annotations"]:
        if a["id"] in labels:
            coco.annToRLE(a)
    atomic_write_text(out_path, json.dumps(out))
    return out


def compare_with_gt(dataset: CocoDataset, labels: dict[int, dict]) -> dict | None:
    """Mean IoU against the GT masks, where the input json has them, of the pseudo masks and of the filled
    boxes (the baseline a mask must beat); None without GT masks."""
    pseudo, boxes = [], []
    for image_id, anns in dataset.annotations.items():
        info = dataset.coco.imgs[image_id]
        for a in anns:
            if a.get("iscrowd", 0) or "segmentation" not in a or a["id"] not in labels:
                continue
            gt = dataset.coco.annToRLE(a)
            x, y, w, h = a["bbox"]
            box = encode_rle(box_pixel_masks(torch.tensor([[x, y, x + w, y + h]]), info["height"], info["width"])[0])
            pseudo.append(float(mask_util.iou([labels[a["id"]]["segmentation"]], [gt], [0])[0, 0]))
            boxes.append(float(mask_util.iou([box], [gt], [0])[0, 0]))
    if not pseudo:
        return None
    return {"pseudo_mIoU": float(np.mean(pseudo)), "box_mIoU": float(np.mean(boxes)), "objects": len(pseudo)}


def gt_comparison_line(cmp: dict, json_path) -> str:
    p, b = cmp["pseudo_mIoU"], cmp["box_mIoU"]
    verdict = ("these masks are no better than the boxes" if p < b + 0.02
               else f"the masks add {p - b:+.3f} over the boxes")
    return (f"pseudo masks vs the GT masks of {json_path} ({cmp['objects']} objects): mIoU {p:.3f}; "
            f"filled boxes would score {b:.3f}: {verdict}")


def save_pictures(dataset: CocoDataset, labels: dict[int, dict], n: int, out_dir: str | Path) -> list[Path]:
    """The ``n`` images whose worst pseudo mask has the lowest quality, worst first: the photo beside its
    pseudo masks and boxes, each labelled with its quality. Returns the written paths."""
    from .data.coco import load_image
    from .predict import preview
    from .visualize import draw_instances, save_png, side_by_side

    label = {c: i for i, c in enumerate(dataset.cat_ids)}
    worst = []
    for image_id, anns in dataset.annotations.items():
        anns = [a for a in anns if a["id"] in labels]
        if anns:
            worst.append((min(labels[a["id"]]["quality"] for a in anns), image_id, anns))
    worst.sort(key=lambda t: (t[0], t[1]))
    paths = []
    for rank, (q, image_id, anns) in enumerate(worst[:n], start=1):
        info = dataset.coco.imgs[image_id]
        image = load_image(dataset.image_root / info["file_name"])
        det = {"boxes": torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                      for a in anns], dtype=torch.float32),
               "scores": torch.tensor([labels[a["id"]]["quality"] for a in anns]),
               "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.long),
               "rles": [labels[a["id"]]["segmentation"] for a in anns]}
        img, det = preview(image, det, 0.0)
        drawn = draw_instances(img, det, dataset.class_names, score_thresh=0.0)
        path = Path(out_dir) / f"{rank:03d}_{Path(info['file_name']).stem}_quality{q:.2f}.png"
        save_png(path, side_by_side(img, drawn))
        paths.append(path)
    return paths
