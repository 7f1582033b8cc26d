"""Tests for boxmask.evaluation.coco_eval on a tiny in-memory COCO dataset."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from boxmask.evaluation.coco_eval import (
    detections_to_coco,
    evaluate,
    format_table,
    matched_mask_iou,
)

H = W = 64
LABEL_TO_CAT = [3, 7]  # non-contiguous COCO ids on purpose
CAT_TO_LABEL = {c: i for i, c in enumerate(LABEL_TO_CAT)}

# Image 1: rectangle (cat 3, compressed RLE) + circle (cat 7, compressed RLE).
RECT = (4, 6, 24, 20)  # x1, y1, x2, y2 pixel edges -> 20 x 14 pixels
CIRCLE = (46, 44, 10)  # cx, cy, r
# Image 2: polygon (cat 3) + crowd region (cat 7, uncompressed RLE).
POLY = [10.0, 30.0, 50.0, 30.0, 50.0, 60.0, 10.0, 60.0]  # 40x30 = 1200 px: 'medium'
CROWD = (44, 2, 62, 20)
# Image 3: no annotations.


def _rect_mask(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _circle_mask(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8)


def _rle_ann(mask: np.ndarray, uncompressed: bool = False) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask))
    ann = {"bbox": mask_util.toBbox(rle).tolist(), "area": float(mask_util.area(rle))}
    if uncompressed:
        # COCO's crowd format: column-major run lengths as a plain list.
        flat = mask.flatten(order="F")
        counts, prev, run = [], 0, 0
        for v in flat:
            if v != prev:
                counts.append(run)
                prev, run = v, 0
            run += 1
        counts.append(run)
        ann["segmentation"] = {"size": [H, W], "counts": counts}
    else:
        ann["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    return ann


def _load(tmp_path, dataset: dict) -> COCO:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture()
def coco_gt(tmp_path) -> COCO:
    anns = []
    a = _rle_ann(_rect_mask(*RECT))
    a.update(id=1, image_id=1, category_id=3, iscrowd=0)
    anns.append(a)
    a = _rle_ann(_circle_mask(*CIRCLE))
    a.update(id=2, image_id=1, category_id=7, iscrowd=0)
    anns.append(a)
    xs, ys = POLY[0::2], POLY[1::2]
    anns.append(
        {
            "id": 3,
            "image_id": 2,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": [POLY],
            "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            "area": (max(xs) - min(xs)) * (max(ys) - min(ys)),
        }
    )
    a = _rle_ann(_rect_mask(*CROWD), uncompressed=True)
    a.update(id=4, image_id=2, category_id=7, iscrowd=1)
    anns.append(a)
    dataset = {
        "images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in (1, 2, 3)],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": anns,
    }
    return _load(tmp_path, dataset)


def _perfect_dets(coco: COCO, shift_rect: int = 0) -> dict[int, dict]:
    """GT boxes + GT masks (score 1) per image; optionally shift the rectangle's mask right."""
    dets = {}
    for img_id in coco.getImgIds():
        boxes, labels, masks = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=False)):
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(CAT_TO_LABEL[ann["category_id"]])
            m = coco.annToMask(ann)
            if ann["id"] == 1 and shift_rect:
                m = np.roll(m, shift_rect, axis=1)  # rect is far from the border: no wrap
            masks.append(m)
        n = len(boxes)
        dets[img_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "scores": torch.ones(n),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks).astype(bool)) if n else torch.zeros((0, H, W), dtype=torch.bool),
        }
    return dets


def _results(dets: dict[int, dict], label_to_cat=LABEL_TO_CAT) -> list[dict]:
    out = []
    for img_id, det in dets.items():
        out.extend(detections_to_coco(img_id, det, label_to_cat))
    return out


def test_perfect_predictions(coco_gt):
    results = _results(_perfect_dets(coco_gt))
    assert len(results) == 3
    metrics = evaluate(coco_gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert metrics[t]["AP"] == pytest.approx(1.0)
        assert metrics[t]["AP50"] == pytest.approx(1.0)
        assert metrics[t]["AP75"] == pytest.approx(1.0)
        assert metrics[t]["APs"] == pytest.approx(1.0)
        assert metrics[t]["APm"] == pytest.approx(1.0)
        # 64x64 images cannot hold a "large" (> 96^2) object: undefined -> NaN.
        assert math.isnan(metrics[t]["APl"])
    miou = matched_mask_iou(coco_gt, results)
    assert miou == {"mIoU": 1.0, "mIoU_matched": 1.0, "recall": 1.0, "num_gt": 3}


def test_evaluate_does_not_mutate_results(coco_gt):
    results = _results(_perfect_dets(coco_gt))
    before = json.dumps(results, sort_keys=True)
    evaluate(coco_gt, results)
    assert json.dumps(results, sort_keys=True) == before


def test_shifted_mask_gives_known_iou(coco_gt):
    s = 5
    results = _results(_perfect_dets(coco_gt, shift_rect=s))
    w, h = RECT[2] - RECT[0], RECT[3] - RECT[1]
    # Rectangle shifted by s columns: overlap (w - s) * h, union (w + s) * h.
    rect_iou = (w - s) / (w + s)
    miou = matched_mask_iou(coco_gt, results)
    assert miou["num_gt"] == 3
    assert miou["recall"] == 1.0
    assert miou["mIoU"] == pytest.approx((rect_iou + 1.0 + 1.0) / 3)
    assert miou["mIoU_matched"] == pytest.approx(miou["mIoU"])
    # Boxes are untouched, so bbox AP stays perfect while segm AP drops:
    # rect IoU 0.6 passes IoU thresholds 0.50..0.60 only (3 of 10).
    metrics = evaluate(coco_gt, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP50"] == pytest.approx(1.0)
    assert metrics["segm"]["AP75"] < 1.0
    assert metrics["segm"]["AP"] < 1.0


def test_unmatched_gt_counts_as_zero(coco_gt):
    dets = _perfect_dets(coco_gt)
    # Move the circle's box far away: no box IoU >= 0.5, so the circle GT is unmatched.
    circle_idx = int((dets[1]["labels"] == CAT_TO_LABEL[7]).nonzero()[0, 0])
    dets[1]["boxes"][circle_idx] = torch.tensor([0.0, 40.0, 10.0, 50.0])
    miou = matched_mask_iou(coco_gt, _results(dets))
    assert miou["recall"] == pytest.approx(2 / 3)
    assert miou["mIoU"] == pytest.approx(2 / 3)
    assert miou["mIoU_matched"] == pytest.approx(1.0)


def test_greedy_matching_by_score(coco_gt):
    # Two predictions for the rectangle: the higher-scoring one (with a bad mask)
    # takes the GT, the better low-scoring mask is not used.
    x1, y1, x2, y2 = RECT
    det = {
        "boxes": torch.tensor([[x1, y1, x2, y2], [x1, y1, x2, y2]], dtype=torch.float32),
        "scores": torch.tensor([0.4, 0.9]),
        "labels": torch.tensor([0, 0]),
        "masks": torch.from_numpy(np.stack([_rect_mask(*RECT), _rect_mask(x1, y1, x1 + 10, y2)])),
    }
    miou = matched_mask_iou(coco_gt, detections_to_coco(1, det, LABEL_TO_CAT))
    assert miou["mIoU_matched"] == pytest.approx(0.5)
    assert miou["recall"] == pytest.approx(1 / 3)


def test_empty_results(coco_gt):
    metrics = evaluate(coco_gt, [])
    assert set(metrics) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm"):
            assert metrics[t][k] == 0.0
        assert math.isnan(metrics[t]["APl"])  # no large GT: undefined, as for non-empty results
    miou = matched_mask_iou(coco_gt, [])
    assert miou["mIoU"] == 0.0 and miou["recall"] == 0.0 and miou["num_gt"] == 3
    assert math.isnan(miou["mIoU_matched"])


def test_results_without_masks(coco_gt):
    dets = _perfect_dets(coco_gt)
    for d in dets.values():
        del d["masks"]
    results = _results(dets)
    assert all("segmentation" not in r for r in results)
    metrics = evaluate(coco_gt, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == 0.0  # no mask predictions at all
    assert matched_mask_iou(coco_gt, results)["recall"] == 0.0


def test_wrong_label_mapping_gives_zero_ap(coco_gt):
    results = _results(_perfect_dets(coco_gt), label_to_cat=list(reversed(LABEL_TO_CAT)))
    metrics = evaluate(coco_gt, results)
    assert metrics["bbox"]["AP"] == 0.0
    assert metrics["segm"]["AP"] == 0.0
    assert matched_mask_iou(coco_gt, results)["mIoU"] == 0.0


def test_gt_without_segmentation_skips_segm(tmp_path):
    dataset = {
        "images": [{"id": 1, "width": W, "height": H}],
        "categories": [{"id": 3, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [4, 6, 20, 14], "area": 280}],
    }
    gt = _load(tmp_path, dataset)
    det = {"boxes": torch.tensor([[4.0, 6.0, 24.0, 20.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])}
    metrics = evaluate(gt, detections_to_coco(1, det, [3]))
    assert set(metrics) == {"bbox"}
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert matched_mask_iou(gt, [])["num_gt"] == 0


def test_unknown_image_id_raises(coco_gt):
    det = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="image ids"):
        evaluate(coco_gt, detections_to_coco(99, det, LABEL_TO_CAT))


def test_quiet_flag(coco_gt, capsys):
    results = _results(_perfect_dets(coco_gt))
    evaluate(coco_gt, results, quiet=True)
    assert capsys.readouterr().out == ""
    evaluate(coco_gt, results, iou_types=("bbox",), quiet=False)
    assert "Average Precision" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_detections_to_coco_roundtrip(dtype):
    m0 = _rect_mask(2, 3, 12, 9)
    m1 = _circle_mask(30, 30, 7)
    det = {
        "boxes": torch.tensor([[2.0, 3.0, 12.0, 9.0], [23.5, 23.0, 37.0, 38.25]]),
        "scores": torch.tensor([0.9, 0.25]),
        "labels": torch.tensor([1, 0]),
        "masks": torch.from_numpy(np.stack([m0, m1])).to(dtype),
    }
    res = detections_to_coco(5, det, LABEL_TO_CAT)
    json.dumps(res)  # must be JSON-serialisable (str counts, python numbers)
    assert [r["category_id"] for r in res] == [7, 3]
    assert [r["image_id"] for r in res] == [5, 5]
    assert res[0]["bbox"] == pytest.approx([2.0, 3.0, 10.0, 6.0])
    assert res[1]["bbox"] == pytest.approx([23.5, 23.0, 13.5, 15.25])
    assert res[1]["score"] == pytest.approx(0.25)
    for r, m in zip(res, (m0, m1)):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [H, W]
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), m)


def test_detections_to_coco_edge_cases():
    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros((0, H, W), dtype=torch.bool)}
    assert detections_to_coco(1, empty, LABEL_TO_CAT) == []
    det = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([2])}
    with pytest.raises(ValueError):
        detections_to_coco(1, det, LABEL_TO_CAT)


def test_format_table(coco_gt):
    metrics = evaluate(coco_gt, _results(_perfect_dets(coco_gt)))
    metrics["mask_iou"] = {"mIoU": 1.0}  # non-AP entries are ignored
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["type", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[2].startswith("bbox") and lines[3].startswith("segm")
    assert "100.0" in lines[3]
    assert "mask_iou" not in table
    assert len({len(line) for line in lines}) == 1  # fixed width
