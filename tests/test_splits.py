"""Per-split metrics from per-object hard-case flags (boxmask.evaluation.splits), on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from boxmask.evaluation.splits import SPLITS, format_split_table, object_splits, split_metrics

H = W = 100


def _rle(x0: int, y0: int, w: int, h: int) -> dict:
    m = np.zeros((H, W), np.uint8)
    m[y0:y0 + h, x0:x0 + w] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


def _gt() -> dict:
    """A plain object (id 1), a near-colour one (id 2) and a same-class-overlap one (id 3), masks = boxes."""
    anns = []
    objects = ((1, (10, 10), []), (2, (50, 50), ["near_colour"]), (3, (10, 50), ["same_class_overlap"]))
    for aid, (x, y), cases in objects:
        anns.append({"id": aid, "image_id": 1, "category_id": 1, "bbox": [x, y, 20, 20], "area": 400.0, "iscrowd": 0,
                     "segmentation": _rle(x, y, 20, 20), "cases": cases})
    return {"images": [{"id": 1, "width": W, "height": H, "file_name": "a.png"}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}]}


def _det(box: list[int], mask: dict, score: float) -> dict:
    return {"image_id": 1, "category_id": 1, "bbox": [float(v) for v in box], "score": score, "segmentation": mask}


def _leaky() -> dict:
    """The near-colour object's mask plus 300 px outside its box: mask IoU 400 / 700 = 0.57."""
    m = mask_utils.decode(_rle(50, 50, 20, 20)) | mask_utils.decode(_rle(70, 50, 15, 20))
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


def _results() -> list[dict]:
    # The leaky detection scores highest: counted as a false positive against the plain object it
    # would lower the plain split's mask AP.
    return [_det([10, 10, 20, 20], _rle(10, 10, 20, 20), 0.9), _det([50, 50, 20, 20], _leaky(), 0.95)]


def test_object_splits() -> None:
    gt = _gt()
    gt["annotations"][2]["cases"] = ["near_colour", "same_class_overlap"]
    s = object_splits(gt)
    assert s == {"all": {1, 2, 3}, "plain": {1}, "near_colour": {2, 3}, "same_class_overlap": {3}}


def test_known_values() -> None:
    m = split_metrics(_gt(), _results(), {1: 0.9, 2: 0.5, 3: 0.2})
    assert list(m) == list(SPLITS)
    # Plain: its one object is found with an exact mask; the leaky detection belongs to another object.
    assert m["plain"]["box_AP"] == pytest.approx(1.0) and m["plain"]["mask_AP"] == pytest.approx(1.0)
    # Near-colour: exact box; the mask (IoU 0.57) is a TP at IoU 0.5 and 0.55 only: 2 of 10 thresholds.
    assert m["near_colour"]["box_AP"] == pytest.approx(1.0) and m["near_colour"]["mask_AP"] == pytest.approx(0.2)
    # Same-class overlap: nothing detected; the other objects' detections are not false positives here.
    assert m["same_class_overlap"]["box_AP"] == 0.0 and m["same_class_overlap"]["mask_AP"] == 0.0
    # All: 2 of 3 found in score order -> 67 of COCO's 101 recall points at precision 1.
    assert m["all"]["box_AP"] == pytest.approx(67 / 101)
    # Masks: at IoU 0.5, 0.55 as for boxes; above, the top-scored detection is a FP -> 34 points at 0.5.
    assert m["all"]["mask_AP"] == pytest.approx((2 * 67 + 8 * 17) / 1010)
    assert [m[s]["num_objects"] for s in SPLITS] == [3, 1, 1, 1]
    assert [m[s]["mean_iou"] for s in SPLITS] == pytest.approx([1.6 / 3, 0.9, 0.5, 0.2])
    assert m["plain"]["segm"]["AP50"] == pytest.approx(1.0)
    table = format_split_table(m)
    assert "near_colour" in table and "20.0" in table


def test_duplicates_of_ignored_objects_are_ignored_and_false_positives_count_everywhere() -> None:
    dup = _det([10, 10, 20, 20], _rle(10, 10, 20, 20), 0.97)  # a second detection of the plain object
    m = split_metrics(_gt(), _results() + [dup], None)
    assert m["near_colour"]["box_AP"] == pytest.approx(1.0) and m["near_colour"]["mask_AP"] == pytest.approx(0.2)
    assert math.isnan(m["plain"]["mean_iou"])
    fp = _det([75, 5, 20, 20], _rle(75, 5, 20, 20), 0.99)  # on no object, scored first
    m = split_metrics(_gt(), _results() + [fp], None)
    assert m["plain"]["box_AP"] == pytest.approx(0.5) and m["near_colour"]["box_AP"] == pytest.approx(0.5)


def test_empty_split_and_boxes_only_gt() -> None:
    gt = _gt()
    for a in gt["annotations"]:
        a["cases"] = []
        del a["segmentation"]
    m = split_metrics(gt, _results(), {"1": 1.0, "2": 0.5, "3": 0.0})  # JSON keys are strings
    assert m["near_colour"]["num_objects"] == 0 and math.isnan(m["near_colour"]["box_AP"])
    assert math.isnan(m["near_colour"]["mean_iou"]) and math.isnan(m["plain"]["mask_AP"]) and "segm" not in m["plain"]
    assert m["plain"]["mean_iou"] == pytest.approx(0.5)
    json.dumps(m)  # NaN aside, plain JSON types


@pytest.mark.parametrize("bad", ["no_cases", "unknown_case", "missing_iou", "no_bbox"])
def test_bad_input(bad: str) -> None:
    gt, results, ious = _gt(), _results(), {1: 0.9, 2: 0.5, 3: 0.2}
    if bad == "no_cases":
        del gt["annotations"][1]["cases"]
    elif bad == "unknown_case":
        gt["annotations"][1]["cases"] = ["shiny"]
    elif bad == "missing_iou":
        del ious[3]
    else:
        del results[0]["bbox"]
    with pytest.raises(ValueError, match="annotation 2|lacks 1 GT|result 0"):
        split_metrics(gt, results, ious)
