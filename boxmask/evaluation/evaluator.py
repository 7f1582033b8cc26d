"""Run a model over a dataset and score it with pycocotools."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..data.batch import EvalDataset, batch_to, boxes_only, collate
from ..data.coco import CocoDataset
from .coco_eval import detections_to_coco, evaluate, matched_mask_iou


@torch.no_grad()
def predict_dataset(model, dataset: CocoDataset, min_size: int, max_size: int, device: torch.device,
                    batch_size: int = 4, progress: bool = True, label_to_cat: list[int] | None = None,
                    size_divisibility: int = 32, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """COCO result dicts (boxes + RLE masks) for every image of ``dataset`` (with ``shard`` = (rank,
    world size): for every world-size-th image, starting at rank)."""
    label_to_cat = label_to_cat or dataset.cat_ids
    images = EvalDataset(dataset, min_size, max_size)
    if shard[1] > 1:
        images = Subset(images, list(range(shard[0], len(images), shard[1])))
    loader = DataLoader(images, batch_size=batch_size, shuffle=False,
                        collate_fn=functools.partial(collate, size_divisibility=size_divisibility))
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


def box_fill(results: list[dict]) -> tuple[float, float]:
    """Mean mask area / box area of the predictions (score >= 0.3) and the fraction of masks filling
    more than 95% of their box: near 1 means box-shaped masks."""
    from pycocotools import mask as mask_utils

    from .diagnostics import fill_of_fills

    fills = [
        float(mask_utils.area(r["segmentation"])) / max(r["bbox"][2] * r["bbox"][3], 1e-6)
        for r in results if "segmentation" in r and r["score"] >= 0.3
    ]
    return fill_of_fills(fills)


@torch.no_grad()
def gt_box_mask_quality(model, dataset: CocoDataset, cfg, device: torch.device, sim=None, progress: bool = True,
                        per_object: bool = False) -> dict:
    """Mean IoU against the GT masks of the masks made for each GT box, on the mask grid: the model's
    (its positives' masks merged with the self-correction weights; with their mean precision and recall, which
    tell a mask too large from one too small) and, for SIM, the pseudo mask M_hat;
    for SIM also ``sim_maps``, the diagnostics of its maps per split (``evaluation/sim_maps.py``). Where
    annotations carry ``cases``, ``splits`` gives the mIoUs per case as well. With ``per_object``,
    ``per_object`` maps every non-crowd annotation id to its IoU ("model", and "pseudo" for SIM; 0 for an
    object without a positive location, which gets no mask)."""
    from ..data.batch import EvalDataset
    from ..modeling.condinst import gt_masks_on_grid
    from ..modeling.sim.self_correction import merge_per_object
    from .sim_maps import SimMapStats, object_splits

    stride = cfg.model.mask_out_stride
    loader = DataLoader(EvalDataset(dataset, cfg.data.min_size_test, cfg.data.max_size, with_targets=True),
                        batch_size=4, collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility))
    was_training = model.training
    model.eval()
    ious: dict[str, dict[str, list[float]]] = {}  # split -> model / pseudo / precision / recall -> values
    num_gt: dict[str, int] = {}
    maps = SimMapStats()
    flagged = False
    by_id: dict[str, dict[int, float]] = {"model": {}, "pseudo": {}}
    try:
        for batch in tqdm(loader, desc="gt-box masks", disable=not progress, leave=False):
            # the split names of each object, in target order (CocoDataset.load's: non-crowd annotations)
            anns = [a for i in batch["image_ids"] for a in dataset.annotations[i] if not a.get("iscrowd", 0)]
            splits, has_cases = object_splits(anns)
            flagged = flagged or has_cases
            for a in anns:
                by_id["model"][a["id"]] = 0.0
                if sim is not None:
                    by_id["pseudo"][a["id"]] = 0.0
            for names in splits:
                for name in names:
                    num_gt[name] = num_gt.get(name, 0) + 1
            batch = batch_to(batch, device)
            # the GT masks are what the masks are measured against: the model and SIM see boxes only
            no_masks = boxes_only(batch)
            _, aux = model.forward_train(no_masks, return_aux=True)
            inst = aux["inst"]
            if inst["image"].numel() == 0:
                continue
            h, w = aux["mask_logits"].shape[-2:]
            gt = gt_masks_on_grid(batch, stride, (h, w)).bool()
            pseudo = None
            if sim is not None:
                pm = sim.pseudo_masks(no_masks, aux)
                covered = pm["has_pos"]  # the objects with positives (the others have no masks)
                groups, student = pm["groups"][covered], pm["student"][covered]
                gt_g = gt[groups]  # each covered object's GT mask
                pseudo = _iou(pm["target"][covered] > 0, gt_g).tolist()
                maps.add([splits[g] for g in groups.tolist()],
                         {"m_s": None if pm["m_s"] is None else pm["m_s"][covered], "m_i": pm["m_i"][covered],
                          "m_t": None if pm["m_t"] is None else pm["m_t"][covered], "fused": pm["fused"][covered]},
                         pm["target"][covered], pm["weight"][covered], pm["box"][covered], gt_g)
            else:
                groups, _, _, student = merge_per_object(inst, aux["mask_logits"].float().sigmoid()[:, 0],
                                                         cfg.sim.mu, cfg.sim.weighting)
                gt_g = gt[groups]
            pred = student > cfg.model.mask_thresh
            model_iou = _iou(pred, gt_g).tolist()
            precision, recall = _precision_recall(pred, gt_g)
            for k, g in enumerate(groups.tolist()):
                by_id["model"][anns[g]["id"]] = model_iou[k]
                if pseudo is not None:
                    by_id["pseudo"][anns[g]["id"]] = pseudo[k]
                for name in splits[g]:
                    rec = ious.setdefault(name, _no_values())
                    rec["model"].append(model_iou[k])
                    rec["precision"].append(precision[k])
                    rec["recall"].append(recall[k])
                    if pseudo is not None:
                        rec["pseudo"].append(pseudo[k])
    finally:
        model.train(was_training)

    def quality(name: str) -> dict:
        rec = ious.get(name) or _no_values()
        q = {"num_gt": num_gt.get(name, 0), "covered": len(rec["model"]), "model_mIoU": _mean(rec["model"]),
             "model_precision": _mean(rec["precision"]), "model_recall": _mean(rec["recall"])}
        if sim is not None:
            q["pseudo_mIoU"] = _mean(rec["pseudo"])
        return q

    out = quality("all")
    if flagged:
        out["splits"] = {name: quality(name) for name in num_gt if name != "all"}
    if sim is not None:
        out["sim_maps"] = maps.summary()
    if per_object:
        out["per_object"] = by_id if sim is not None else {"model": by_id["model"]}
    return out


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def _no_values() -> dict[str, list[float]]:
    """One split's per-object values in gt_box_mask_quality, before any object."""
    return {"model": [], "pseudo": [], "precision": [], "recall": []}


def _precision_recall(pred: torch.Tensor, gt: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per mask: the share of its pixels inside the GT mask and the share of the GT mask it covers (an empty
    mask or GT mask counts 0)."""
    inter = (pred & gt).flatten(1).sum(1).float()
    return ((inter / pred.flatten(1).sum(1).clamp_min(1)).tolist(),
            (inter / gt.flatten(1).sum(1).clamp_min(1)).tolist())


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def save_worst_pictures(dataset: CocoDataset, results: list[dict], n: int, out_dir, score_thresh: float = 0.5) -> list:
    """The ``n`` images with the lowest mean mask IoU (GT objects vs their matched predictions), worst
    first: GT masks on the left, predictions with score >= ``score_thresh`` on the right (duplicates
    of one object shown once, as ``draw_instances`` does). Returns the written paths, named
    ``RANK_image<ID>_maskIoU<X>.png`` with the id made safe by ``picture_path``."""
    from pycocotools import mask as mask_utils

    from ..data.coco import load_image
    from ..predict import readable
    from ..visualize import draw_instances, picture_path, save_png, side_by_side
    from .coco_eval import worst_images_first

    label = {c: i for i, c in enumerate(dataset.cat_ids)}
    by_image: dict = {}
    for r in results:
        if r["score"] >= score_thresh and "segmentation" in r:
            by_image.setdefault(r["image_id"], []).append(r)
    paths = []
    for rank, (img_id, miou) in enumerate(worst_images_first(dataset.coco, results)[:n], start=1):
        info = dataset.coco.imgs[img_id]
        image = load_image(dataset.image_root / info["file_name"])
        gts = [a for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[img_id])) if not a.get("iscrowd", 0)]
        preds = by_image.get(img_id, [])
        pics = []
        for anns, masks, is_gt in ((gts, [dataset.coco.annToMask(a) for a in gts], True),
                                   (preds, [mask_utils.decode(r["segmentation"]) for r in preds], False)):
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                  for a in anns], dtype=torch.float32).reshape(-1, 4)
            det = {"boxes": boxes, "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.long),
                   "scores": torch.tensor([float(a.get("score", 1.0)) for a in anns]),
                   "masks": torch.from_numpy(np.stack(masks) > 0) if masks else torch.zeros(0, *image.shape[:2], dtype=torch.bool)}
            img, det = readable(image, det, 0.0)
            if is_gt:
                det.pop("scores")  # ground truth: every object, names only, no de-duplication
            pics.append(draw_instances(img, det, dataset.class_names, score_thresh=score_thresh))
        path = picture_path(out_dir, f"{rank:03d}", f"image{img_id}", f"maskIoU{miou:.2f}")
        save_png(path, side_by_side(*pics))
        paths.append(path)
    return paths
