"""Images -> detections -> overlay PNGs and a COCO results json (RLE masks).

Output names: ``OUT/<stem>.png`` for an input ``<stem>.<ext>``; inputs that share a stem (``a.png`` and
``a.jpg``, or ``a.png`` in two folders) get ``<stem>_<ext>.png`` and then a number (``a_png_2.png``),
so no picture replaces another. ``OUT/results.json`` holds the detections with score
``>= score_thresh`` (COCO results, each with the input's ``file_name``); ``image_id`` is the image's id
in the ``ids_json`` COCO file (matched by file name) when given, else its position in the file order
(1, 2, ...). Pictures show the detections with score ``>= draw_thresh``."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm import tqdm

from .atomic_io import atomic_write_text
from .config import ConfigError
from .data.batch import batch_to, collate
from .data.coco import IMAGE_SUFFIXES, DatasetError, load_image, read_json
from .data.transforms import apply_transforms
from .evaluation.coco_eval import detections_to_coco
from .visualize import draw_instances, safe_file_name, save_png

log = logging.getLogger("boxmask")



def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted). Only regular files are read: anything
    else in a folder (a FIFO, a socket, a device) is skipped with a warning, since reading it could block
    for ever; named explicitly, it is an error, as is a missing path."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
                if f.is_file():  # follows symlinks; False for FIFOs, sockets, devices and folders
                    files.append(f)
                else:
                    log.warning("%s: not a regular file, skipped", f)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise DatasetError(f"{p}: not a regular file or a folder")
        else:
            raise DatasetError(f"input not found: {p}")
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def picture_names(files: list[Path]) -> list[str]:
    """One unique picture name per input (see the module docstring): ``<stem>.png`` where the stem is
    unique, else ``<stem>_<ext>.png``, numbered if still taken."""
    stems = [safe_file_name(f.stem) for f in files]
    count: dict[str, int] = {}
    for s in stems:
        count[s.lower()] = count.get(s.lower(), 0) + 1  # case-insensitive: macOS and Windows folders
    names: list[str | None] = [f"{s}.png" if count[s.lower()] == 1 else None for s in stems]
    used = {n.lower() for n in names if n}
    for k, (f, s) in enumerate(zip(files, stems)):
        if names[k] is not None:
            continue
        base = f"{s}_{safe_file_name(f.suffix.lstrip('.').lower())}"
        name, n = f"{base}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{base}_{n}.png"
        used.add(name.lower())
        names[k] = name
    return names  # type: ignore[return-value]


def check_out_dir(out_dir: Path, inputs: list[str | Path], files: list[Path]) -> None:
    """Refuse an output folder that is, or holds, a folder of input images (writing there could replace
    an input, and a later run would read the pictures as inputs)."""
    out = out_dir.resolve()
    folders = {Path(i).resolve() for i in inputs if Path(i).is_dir()} | {f.resolve().parent for f in files}
    for d in sorted(folders):
        if d == out or out in d.parents:
            raise ConfigError(f"--out {out_dir} {'is' if d == out else 'holds'} the input image folder {d}; "
                              "choose an output folder outside the inputs")


def image_ids_from_json(json_path: str | Path, files: list[Path]) -> list:
    """The id of each file in a COCO json, matched on its ``file_name`` (the longest trailing part of
    the path that matches, so ``train/a.jpg`` and ``val/a.jpg`` stay apart); a file the json does not
    list is an error."""
    data = read_json(json_path)
    by_name: dict[str, list] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{json_path}: image entry without 'id' and 'file_name': {str(im)[:80]}")
        parts = Path(im["file_name"].replace("\\", "/")).parts
        for k in range(len(parts)):
            by_name.setdefault("/".join(parts[k:]), []).append(im["id"])
    ids = []
    for f in files:
        parts = f.resolve().parts
        for k in range(max(len(parts) - 8, 1), len(parts)):  # longest suffix first
            found = by_name.get("/".join(parts[k:]))
            if found:
                break
        if not found:
            raise DatasetError(f"{f}: no image with file_name {f.name!r} in {json_path}")
        if len(set(map(str, found))) > 1:
            raise DatasetError(f"{f}: {json_path} lists {f.name!r} under several ids ({', '.join(map(str, found[:4]))})")
        ids.append(found[0])
    return ids


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
    if not keep and len(det["scores"]):
        keep = [int(det["scores"].argmax())]  # not drawn, but draw_instances notes the best score
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
    return readable(image, small, float("-inf"))  # already selected above


@torch.no_grad()
def predict_images(model, state: dict, inputs: list[str | Path], out_dir: str | Path, device: torch.device,
                   score_thresh: float = 0.3, progress: bool = True, draw_thresh: float = 0.5,
                   ids_json: str | Path | None = None) -> Path:
    """Write the overlays ``OUT/<name>.png`` (names by ``picture_names``) and ``OUT/results.json``;
    returns the json path. ``score_thresh`` selects the detections written to the json (and masks are
    only computed for those); ``draw_thresh`` the ones drawn."""
    cfg = model.cfg
    files = collect_images(inputs)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, inputs, files)
    names = picture_names(files)
    image_ids = image_ids_from_json(ids_json, files) if ids_json else list(range(1, len(files) + 1))
    results: list[dict] = []
    class_names = state["class_names"]
    label_to_cat = state["cat_ids"]
    # Detections below score_thresh are dropped before their masks are pasted. The model thresholds
    # cls * ctr, whose square root is the score (the small factor keeps a score of exactly
    # score_thresh, filtered exactly below).
    model_thresh = cfg.model.score_thresh
    cfg.model.score_thresh = max(model_thresh, score_thresh ** 2 * (1 - 1e-6))
    try:
        for image_id, path, name in zip(image_ids, tqdm(files, desc="predict", disable=not progress), names):
            try:
                image = load_image(path)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DatasetError(f"cannot read image {path}: {e}") from None
            sample = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                      "image_id": image_id, "orig_size": image.shape[:2]}
            sample = apply_transforms(sample, cfg.data.min_size_test, cfg.data.max_size, False)
            det = model.inference(batch_to(collate([sample], cfg.data.size_divisibility), device), rle=True)[0]
            det = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in det.items()}
            keep = (det["scores"] >= score_thresh).nonzero().flatten().tolist()
            det = {k: (v[keep] if torch.is_tensor(v) else [v[j] for j in keep]) for k, v in det.items()}
            for r in detections_to_coco(0, det, label_to_cat):
                r["image_id"] = image_id  # as the json gives it (COCO allows string ids)
                r["file_name"] = path.name
                results.append(r)
            del sample
            draw = max(draw_thresh, score_thresh)
            save_png(out_dir / name, draw_instances(*preview(image, det, draw), class_names, score_thresh=draw))
    finally:
        cfg.model.score_thresh = model_thresh
    json_path = out_dir / "results.json"
    atomic_write_text(json_path, json.dumps(results))
    return json_path
