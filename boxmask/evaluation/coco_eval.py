"""COCO-style evaluation helpers built on pycocotools.

Every AP number here comes from ``pycocotools.cocoeval.COCOeval``; this module
only converts detections to COCO result dicts, guards the corner cases
pycocotools handles badly (empty results, GT without masks) and adds a simple
matched-mask-IoU diagnostic that is useful for box-supervised training, where
AP alone hides how good the masks of correctly detected objects are.

Conventions
-----------
* Detections are dicts of CPU tensors (numpy arrays also work) in original
  image coordinates: ``boxes`` float[N,4] xyxy, ``scores`` float[N],
  ``labels`` int64[N] contiguous in ``0..C-1``, optional ``masks`` [N,H,W].
* Contiguous label ``i`` maps to COCO category id ``label_to_cat[i]``.
* AP values are in ``[0, 1]``. pycocotools reports ``-1`` when a metric is
  undefined (e.g. no GT objects of that size); it is returned as ``NaN`` so
  that it can never be mistaken for a real score or averaged in silently.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "AP_KEYS",
    "detections_to_coco",
    "evaluate",
    "matched_mask_iou",
    "format_table",
]

# Order of the first six entries of COCOeval.stats.
AP_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor or array-like -> numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binarize(masks: np.ndarray) -> np.ndarray:
    """Bool/uint8 (or float probability) masks -> uint8 {0,1}."""
    if np.issubdtype(masks.dtype, np.floating):
        # Soft masks: 0.5 is the usual decision threshold; "!= 0" would turn
        # every tiny probability into foreground.
        return (masks >= 0.5).astype(np.uint8)
    return (masks != 0).astype(np.uint8)


def detections_to_coco(image_id: int, det: dict, label_to_cat: list[int]) -> list[dict]:
    """Convert one image's detections to COCO result dicts.

    Each dict has ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
    ``score`` and, when ``det`` has ``masks``, ``segmentation`` as compressed
    RLE whose ``counts`` is a ``str`` (so the results are JSON-serialisable).
    """
    boxes = _to_numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _to_numpy(det["scores"]).astype(np.float64).reshape(-1)
    labels = _to_numpy(det["labels"]).astype(np.int64).reshape(-1)
    n = boxes.shape[0]
    if scores.shape[0] != n or labels.shape[0] != n:
        raise ValueError(f"boxes/scores/labels lengths differ: {n}, {scores.shape[0]}, {labels.shape[0]}")
    if n and (labels.min() < 0 or labels.max() >= len(label_to_cat)):
        # A negative label would otherwise silently index from the end.
        raise ValueError(f"labels must be in [0, {len(label_to_cat)}), got {labels.min()}..{labels.max()}")

    rles: list[dict] | None = det.get("rles")
    masks = det.get("masks")
    if rles is not None and len(rles) != n:
        raise ValueError(f"rles must hold one RLE per detection ({n}), got {len(rles)}")
    if rles is None and masks is not None:
        masks = _to_numpy(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:  # tolerate [N,1,H,W]
            masks = masks[:, 0]
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be [N,H,W] with N={n}, got shape {tuple(masks.shape)}")
        rles = []
        if n:
            # pycocotools wants a Fortran-ordered HxWxN uint8 array.
            rles = mask_util.encode(np.asfortranarray(_binarize(masks).transpose(1, 2, 0)))
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")

    results: list[dict] = []
    for i in range(n):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        res = {
            "image_id": int(image_id),
            "category_id": int(label_to_cat[int(labels[i])]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if rles is not None:
            res["segmentation"] = rles[i]
        results.append(res)
    return results


def _gt_has_segmentation(coco_gt: COCO) -> bool:
    return any(ann.get("segmentation") for ann in coco_gt.dataset.get("annotations", []))


def _empty_res(coco_gt: COCO) -> COCO:
    """A result COCO object with no detections (``loadRes([])`` raises)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def _stat(v: float) -> float:
    v = float(v)
    return float("nan") if v < 0 else v


def evaluate(
    coco_gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = ("bbox", "segm"),
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Run COCOeval for each IoU type and return ``{iou_type: {AP_KEY: value}}``.

    * Values are in ``[0, 1]``; pycocotools' ``-1`` ("undefined", e.g. no GT of
      that size) becomes ``NaN``.
    * Empty results (or no result with a mask for ``segm``) do not crash: an
      empty detection set is evaluated, giving ``0.0`` wherever GT exists
      (``NaN`` still marks size buckets without GT, as for non-empty results).
    * ``segm`` is skipped (absent from the output) when the GT has no
      segmentation at all.
    * ``quiet=True`` swallows pycocotools' stdout chatter.
    """
    gt_img_ids = set(coco_gt.getImgIds())
    unknown = {r["image_id"] for r in results} - gt_img_ids
    if unknown:
        # loadRes would fail with a bare assert; give a useful message instead.
        raise ValueError(f"results reference image ids not in GT: {sorted(unknown)[:10]}")

    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unsupported iou_type {iou_type!r}")
        if iou_type == "segm":
            if not _gt_has_segmentation(coco_gt):
                continue
            # Drop "bbox" for segm (as detectron2 does): with a bbox present,
            # loadRes sets the detection area from the box instead of the mask,
            # which puts detections into the wrong APs/APm/APl bucket.
            dts = [{k: v for k, v in r.items() if k != "bbox"} for r in results if r.get("segmentation")]
        else:
            # Shallow copies: loadRes/COCOeval write id/area/iscrowd/segmentation
            # into the dicts and must not mutate the caller's results.
            dts = [dict(r) for r in results]

        sink = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
        with sink:
            coco_dt = coco_gt.loadRes(dts) if dts else _empty_res(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {k: _stat(v) for k, v in zip(AP_KEYS, ev.stats[: len(AP_KEYS)])}
    return out


def _rle(segm: Any, h: int, w: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_util.frPyObjects(segm, h, w)
    return segm


def _segm_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """Any COCO segmentation -> HxW uint8 mask, checked against the image size."""
    m = mask_util.decode(_rle(segm, h, w))
    if m.shape != (h, w):
        raise ValueError(f"segmentation size {m.shape} does not match image size {(h, w)}")
    return m


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(bool)
    b = b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _xywh_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Box IoU matrix [len(dt), len(gt)] for xywh boxes."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_util.iou(dt.tolist(), gt.tolist(), [0] * len(gt)), dtype=np.float64)


def matched_mask_iou(coco_gt: COCO, results: list[dict], iou_thresh: float = 0.5) -> dict[str, float | int]:
    """Mean mask IoU of detections matched to GT objects (see ``gt_mask_ious``).

    Returns ``{"mIoU": mean over all GT, "mIoU_matched": mean over matched GT,
    "recall": matched fraction, "num_gt": int}``; means over nothing are NaN.
    """
    per_image = gt_mask_ious(coco_gt, results, iou_thresh)
    ious = [v for img in per_image.values() for v in img]
    matched_ious = [v for v in ious if v >= 0]
    ious = [max(v, 0.0) for v in ious]  # unmatched GT count as IoU 0
    num_gt = len(ious)
    nan = float("nan")
    return {
        "mIoU": float(np.mean(ious)) if num_gt else nan,
        "mIoU_matched": float(np.mean(matched_ious)) if matched_ious else nan,
        "recall": len(matched_ious) / num_gt if num_gt else nan,
        "num_gt": num_gt,
    }


def worst_images_first(coco_gt: COCO, results: list[dict], iou_thresh: float = 0.5) -> list[tuple[int, float]]:
    """(image id, mean mask IoU over its GT objects), lowest first; images without GT masks are left out."""
    per_image = gt_mask_ious(coco_gt, results, iou_thresh)
    scored = [(img_id, float(np.mean([max(v, 0.0) for v in v_list]))) for img_id, v_list in per_image.items() if v_list]
    return sorted(scored, key=lambda t: (t[1], t[0]))


def gt_mask_ious(coco_gt: COCO, results: list[dict], iou_thresh: float = 0.5) -> dict[int, list[float]]:
    """Mask IoU of each GT object with the detection matched to it.

    GT = non-crowd annotations with a segmentation. Per image and category,
    detections with a segmentation are visited in descending score order and
    each takes the still-unmatched GT with the highest *box* IoU
    ``>= iou_thresh`` (COCO-style greedy one-to-one matching). Matching on
    boxes, not masks, is deliberate: it measures mask quality of objects the
    detector found, independent of the mask itself.

    Returns, per image, one value per GT object: the mask IoU of its match, or -1 when unmatched.
    """
    # Index detections by (image, category), only those usable for mask IoU.
    dts_by_key: dict[tuple[int, int], list[dict]] = {}
    for r in results:
        if r.get("segmentation"):
            dts_by_key.setdefault((int(r["image_id"]), int(r["category_id"])), []).append(r)

    out: dict[int, list[float]] = {}
    for img_id in coco_gt.getImgIds():
        out[img_id] = []
        img = coco_gt.imgs[img_id]
        h, w = int(img["height"]), int(img["width"])
        gts_by_cat: dict[int, list[dict]] = {}
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[img_id])):
            if ann.get("iscrowd", 0) or not ann.get("segmentation"):
                continue
            gts_by_cat.setdefault(int(ann["category_id"]), []).append(ann)

        for cat_id, gts in gts_by_cat.items():
            dts = sorted(dts_by_key.get((img_id, cat_id), []), key=lambda r: -float(r["score"]))
            dt_boxes = np.array(
                [d["bbox"] if "bbox" in d else mask_util.toBbox(_rle(d["segmentation"], h, w)).tolist() for d in dts],
                dtype=np.float64,
            ).reshape(-1, 4)
            gt_boxes = np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4)
            box_iou = _xywh_iou(dt_boxes, gt_boxes)

            gt_iou = [-1.0] * len(gts)
            taken = np.zeros(len(gts), dtype=bool)
            for di in range(len(dts)):
                cand = np.where(~taken, box_iou[di], -1.0)
                gi = int(np.argmax(cand))
                if cand[gi] < iou_thresh:
                    continue
                taken[gi] = True
                # Decode lazily: only matched detections need their mask.
                gt_iou[gi] = _mask_iou(_segm_to_mask(dts[di]["segmentation"], h, w), coco_gt.annToMask(gts[gi]))
            out[img_id].extend(gt_iou)
    return out


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.1f}"


def format_table(metrics: dict, keys: Iterable[str] = AP_KEYS) -> str:
    """Fixed-width text table: one row per IoU type (bbox, segm, ...), AP x100.

    Entries of ``metrics`` that are not dicts with an ``"AP"`` key (e.g. a
    ``matched_mask_iou`` result stored alongside) are ignored; NaN prints "-".
    """
    keys = tuple(keys)
    rows = [(name, m) for name, m in metrics.items() if isinstance(m, dict) and "AP" in m]
    # bbox before segm regardless of dict order, others after.
    order = {"bbox": 0, "segm": 1}
    rows.sort(key=lambda r: order.get(r[0], 2))
    name_w = max([len("type")] + [len(n) for n, _ in rows])
    col_w = 7
    lines = ["type".ljust(name_w) + "".join(k.rjust(col_w) for k in keys)]
    lines.append("-" * len(lines[0]))
    for name, m in rows:
        lines.append(name.ljust(name_w) + "".join(_fmt(m.get(k, float("nan"))).rjust(col_w) for k in keys))
    return "\n".join(lines)
