"""Metrics per hard-case split, from the per-object ``"cases"`` flags of ``boxmask synth`` data.

A split is a set of GT objects: ``all``, ``plain`` (no case), ``near_colour`` and
``same_class_overlap`` (an object may be in both hard splits).  For each split this module reports
COCO box and mask AP over the split's objects and the mean per-object mask IoU over them.

How objects outside the split are kept out of its AP
----------------------------------------------------
The images are not cut: a split's objects share their images with other objects, and deleting those
would turn every good detection of them into a false positive.  Instead, in an evaluation copy:

1. each detection is first matched to a GT object of its image and category, greedily by score, on
   *box* IoU >= 0.5 (one detection per object, the usual COCO rule).  A detection matched to an object
   outside the split is removed: it counts neither as TP nor as FP.  Matching on boxes rather than
   masks matters: with masks, a bad mask of an out-of-split object (say a near-colour one) would fail
   to match, stay in, and count as a false positive against the plain split;
2. objects outside the split are marked ``iscrowd = 1``.  COCOeval then ignores them as GT (not
   counted as missed) and also ignores any further detection that lies on them (duplicates).  It
   cannot be done with an ``ignore`` field alone: COCOeval overwrites ``ignore`` from ``iscrowd``.

Detections matched to nothing stay in and are false positives in every split, as they are in the
whole-set AP.  An empty split has no AP (NaN).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Mapping

import numpy as np
from pycocotools.coco import COCO

from ..data.synth import HARD_CASES
from .coco_eval import _xywh_iou, evaluate

__all__ = ["SPLITS", "object_splits", "split_metrics", "format_split_table"]

# An annotation's "cases" name its hard splits; "all" and "plain" (no case) are derived.
SPLITS: tuple[str, ...] = ("all", "plain") + HARD_CASES
MATCH_IOU = 0.5  # box IoU that assigns a detection to an object before evaluation


def object_splits(coco_gt_dict: Mapping[str, Any]) -> dict[str, set[int]]:
    """The annotation ids of each split.  Crowd annotations belong to none.

    Raises ValueError naming the annotation id when an annotation has no ``cases`` list or an unknown case.
    """
    out: dict[str, set[int]] = {s: set() for s in SPLITS}
    for ann in coco_gt_dict.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        cases = ann.get("cases")
        if not isinstance(cases, list):
            raise ValueError(f"annotation {ann.get('id')} has no 'cases' list (data from 'boxmask synth' carries one)")
        unknown = set(cases) - set(HARD_CASES)
        if unknown:
            raise ValueError(f"annotation {ann.get('id')} has unknown cases {sorted(unknown)}; "
                             f"known: {', '.join(HARD_CASES)}")
        aid = int(ann["id"])
        out["all"].add(aid)
        if not cases:
            out["plain"].add(aid)
        for case in cases:
            out[case].add(aid)
    return out


def _matched_gt(coco_gt_dict: Mapping[str, Any], results: list[dict]) -> list[int | None]:
    """For each result, the id of the GT object it is matched to on box IoU (or None)."""
    gts: dict[tuple[int, int], list[dict]] = {}
    for ann in coco_gt_dict.get("annotations", []):
        if not ann.get("iscrowd", 0):
            gts.setdefault((int(ann["image_id"]), int(ann["category_id"])), []).append(ann)
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(results):
        by_key.setdefault((int(r["image_id"]), int(r["category_id"])), []).append(i)

    matched: list[int | None] = [None] * len(results)
    for key, idx in by_key.items():
        cand = gts.get(key, [])
        if not cand:
            continue
        idx = sorted(idx, key=lambda i: -float(results[i]["score"]))
        iou = _xywh_iou(np.array([results[i]["bbox"] for i in idx], np.float64).reshape(-1, 4),
                        np.array([g["bbox"] for g in cand], np.float64).reshape(-1, 4))
        taken = np.zeros(len(cand), bool)
        for row, i in enumerate(idx):
            scores = np.where(taken, -1.0, iou[row])
            j = int(np.argmax(scores))
            if scores[j] >= MATCH_IOU:
                taken[j] = True
                matched[i] = int(cand[j]["id"])
    return matched


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        coco.createIndex()
    return coco


def split_metrics(coco_gt_dict: Mapping[str, Any], results: list[dict],
                  per_object_iou: Mapping[int, float] | None = None) -> dict[str, dict[str, Any]]:
    """Box and mask AP, and the mean per-object mask IoU, of every split in ``SPLITS``.

    ``coco_gt_dict``: a COCO dict whose annotations carry ``cases`` (``val.json`` of ``boxmask synth``).
    ``results``: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, optional
    ``segmentation`` RLE), as ``coco_eval.detections_to_coco`` makes them; every result needs a ``bbox``.
    ``per_object_iou``: annotation id -> mask IoU of the model's mask made for that GT box (keys may be
    strings, as after a JSON round trip); it must cover every non-crowd object.

    Returns ``{split: {"num_objects", "box_AP", "mask_AP", "mean_iou", "bbox": {...}, "segm": {...}}}``
    with AP in [0, 1] (``bbox``/``segm`` hold COCOeval's AP, AP50, ... as ``coco_eval.evaluate`` gives
    them; ``segm`` and ``mask_AP`` are absent / NaN without GT masks), ``mean_iou`` NaN without
    ``per_object_iou`` or for an empty split.
    """
    splits = object_splits(coco_gt_dict)
    for i, r in enumerate(results):
        if "bbox" not in r:
            raise ValueError(f"result {i} (image {r.get('image_id')}) has no 'bbox'")
    ious: dict[int, float] | None = None
    if per_object_iou is not None:
        ious = {int(k): float(v) for k, v in per_object_iou.items()}
        missing = sorted(splits["all"] - ious.keys())
        if missing:
            raise ValueError(f"per_object_iou lacks {len(missing)} GT objects, e.g. annotation ids {missing[:5]}")

    matched = _matched_gt(coco_gt_dict, results)
    out: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        members = splits[name]
        gt = copy.deepcopy(dict(coco_gt_dict))
        for ann in gt["annotations"]:
            if int(ann["id"]) not in members:
                ann["iscrowd"] = 1
        dts = [r for r, m in zip(results, matched) if m is None or m in members]
        ap = evaluate(_coco(gt), dts)
        nan = float("nan")
        out[name] = {
            "num_objects": len(members),
            "box_AP": ap["bbox"]["AP"] if members else nan,
            "mask_AP": ap["segm"]["AP"] if members and "segm" in ap else nan,
            "mean_iou": float(np.mean([ious[a] for a in members])) if ious is not None and members else nan,
            **ap,
        }
    return out


def format_split_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per split: objects, box AP, mask AP (x100) and mean per-object IoU."""
    def fmt(v: float, scale: float = 100.0) -> str:
        return "-" if v is None or math.isnan(v) else f"{scale * v:.1f}"

    lines = [f"{'split':<20}{'objects':>8}{'box AP':>8}{'mask AP':>8}{'mIoU':>7}", "-" * 51]
    for name, m in metrics.items():
        lines.append(f"{name:<20}{m['num_objects']:>8}{fmt(m['box_AP']):>8}{fmt(m['mask_AP']):>8}"
                     f"{fmt(m['mean_iou']):>7}")
    return "\n".join(lines)
