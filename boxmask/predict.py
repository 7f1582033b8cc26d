"""Images -> detections -> overlay PNGs and a COCO results json (RLE masks)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm import tqdm

from .data.batch import batch_to, collate
from .data.coco import DatasetError, load_image
from .data.transforms import apply_transforms
from .atomic_io import atomic_write_text
from .evaluation.coco_eval import detections_to_coco
from .visualize import draw_instances, save_png

log = logging.getLogger("boxmask")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is an error."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"input not found: {p}")
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def readable(image: np.ndarray, det: dict, score_thresh: float, min_side: int = 512) -> tuple[np.ndarray, dict]:
    """Small images are drawn at an integer upscale (nearest) so that labels stay legible; only the
    detections that will be drawn are kept."""
    keep = det["scores"] >= score_thresh
    det = {k: v[keep] for k, v in det.items()}
    s = max(1, math.ceil(min_side / max(image.shape[:2])))
    if s == 1:
        return image, det
    image = np.repeat(np.repeat(image, s, axis=0), s, axis=1)
    det["boxes"] = det["boxes"] * s
    if "masks" in det:
        det["masks"] = det["masks"].repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    return image, det


def preview(image: np.ndarray, det: dict, score_thresh: float, max_side: int = 2048) -> tuple[np.ndarray, dict]:
    """The picture to draw for detections with RLE masks: huge images are drawn downscaled (their masks
    decoded and shrunk one at a time, so memory stays bounded), small ones upscaled by ``readable``."""
    import cv2
    from pycocotools import mask as mask_util

    keep = (det["scores"] >= score_thresh).nonzero().flatten().tolist()
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    ph, pw = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
    if f < 1.0:
        image = cv2.resize(image, (pw, ph), interpolation=cv2.INTER_AREA)
    masks = np.zeros((len(keep), ph, pw), dtype=bool)
    for n, j in enumerate(keep):
        m = mask_util.decode(det["rles"][j])
        masks[n] = (cv2.resize(m, (pw, ph), interpolation=cv2.INTER_NEAREST) if f < 1.0 else m) > 0
    small = {"boxes": det["boxes"][keep] * f, "scores": det["scores"][keep], "labels": det["labels"][keep],
             "masks": torch.from_numpy(masks)}
    return readable(image, small, score_thresh)


@torch.no_grad()
def predict_images(model, state: dict, inputs: list[str | Path], out_dir: str | Path, device: torch.device,
                   score_thresh: float = 0.3, progress: bool = True) -> Path:
    """Write ``OUT/<name>.png`` overlays and ``OUT/results.json``; returns the json path."""
    cfg = model.cfg
    files = collect_images(inputs)
    out_dir = Path(out_dir)
    results: list[dict] = []
    class_names = state["class_names"]
    label_to_cat = state["cat_ids"]
    for image_id, path in enumerate(tqdm(files, desc="predict", disable=not progress), start=1):
        try:
            image = load_image(path)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from None
        sample = {"image": image, "boxes": torch.zeros(0, 4).numpy(), "labels": torch.zeros(0, dtype=torch.long).numpy(),
                  "image_id": image_id, "orig_size": image.shape[:2]}
        sample = apply_transforms(sample, cfg.data.min_size_test, cfg.data.max_size, False)
        det = model.inference(batch_to(collate([sample], cfg.data.size_divisibility), device), rle=True)[0]
        det = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in det.items()}
        for r in detections_to_coco(image_id, det, label_to_cat):
            r["file_name"] = path.name
            results.append(r)
        del sample
        save_png(out_dir / f"{path.stem}.png", draw_instances(*preview(image, det, score_thresh), class_names, score_thresh=score_thresh))
    json_path = out_dir / "results.json"
    atomic_write_text(json_path, json.dumps(results))
    return json_path
