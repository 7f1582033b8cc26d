"""Run a model over a dataset and score it with pycocotools."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.batch import EvalDataset, batch_to, collate
from ..data.coco import CocoDataset
from .coco_eval import detections_to_coco, evaluate, matched_mask_iou


@torch.no_grad()
def predict_dataset(model, dataset: CocoDataset, min_size: int, max_size: int, device: torch.device,
                    batch_size: int = 4, progress: bool = True, label_to_cat: list[int] | None = None,
                    size_divisibility: int = 32) -> list[dict]:
    """COCO result dicts (boxes + RLE masks) for every image of ``dataset``."""
    label_to_cat = label_to_cat or dataset.cat_ids
    loader = DataLoader(EvalDataset(dataset, min_size, max_size), batch_size=batch_size, shuffle=False,
                        collate_fn=lambda s: collate(s, size_divisibility))
    was_training = model.training
    model.eval()
    results: list[dict] = []
    try:
        for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
            dets = model(batch_to(batch, device))
            for image_id, det in zip(batch["image_ids"], dets):
                det = {k: v.cpu() for k, v in det.items()}
                results.extend(detections_to_coco(image_id, det, label_to_cat))
    finally:
        model.train(was_training)
    return results


def score(dataset: CocoDataset, results: list[dict]) -> dict:
    """Box and mask AP (pycocotools) and the mean mask IoU of predictions matched to GT."""
    metrics = evaluate(dataset.coco, results)
    if dataset.has_masks:
        metrics["mask_iou"] = matched_mask_iou(dataset.coco, results)
    return metrics


def box_fill(results: list[dict]) -> float:
    """Mean mask area / box area of the predictions: near 1 means box-shaped masks."""
    from pycocotools import mask as mask_utils

    fills = [
        mask_utils.area(r["segmentation"]) / max(r["bbox"][2] * r["bbox"][3], 1e-6)
        for r in results if "segmentation" in r and r["score"] >= 0.3
    ]
    return float(np.mean(fills)) if fills else float("nan")
