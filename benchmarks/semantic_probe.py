"""Can a semantic map made of class prototypes tell an object from its box's background better than the
instance map does? An oracle probe on trained runs.

    python benchmarks/semantic_probe.py                       # the boxinst runs of sim_paired.py
    python benchmarks/semantic_probe.py --runs RUN [RUN ...] --data DATA

SIM's pseudo label fuses a semantic map M_S (similarity of each pixel's feature to its class's
prototypes) with the instance map M_I (the model's own mask for the object). The fusion can only help where
M_S ranks the pixels of a box better than M_I, or differently enough to add to it. This probe gives M_S
every advantage: prototypes fitted on the GT masks of half of the val images (per class: the foreground
pixels of its objects; background: the pixels outside every box), L = 1 (the mean) or L = 4 (spherical
k-means), then measured on the other half. M_S = sigmoid((max_l cos(z, p_class,l) - max_l cos(z, p_bg,l)) / 0.2)
(the softmax form of ``sim.semantic_softmax``). Per feature space (the mask branch's, where SIM's prototypes
live; the backbone's stride-4 and stride-8 levels; the FPN's stride-8 level) and per object split: the mean
per-object in-box ROC AUC against the GT mask of M_S, of M_I, of SIM's fusion 0.5 M_S + 0.5 M_I and of
the product M_S M_I. Results: benchmarks/results/semantic_probe.{json,md}. Not a test.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from boxmask.data.batch import EvalDataset, boxes_only, collate  # noqa: E402
from boxmask.data.coco import CocoDataset  # noqa: E402
from boxmask.engine.trainer import model_from_checkpoint  # noqa: E402
from boxmask.evaluation.sim_maps import object_splits, roc_auc  # noqa: E402
from boxmask.modeling.condinst import gt_masks_on_grid  # noqa: E402
from boxmask.modeling.dynamic_mask_head import aligned_bilinear  # noqa: E402
from boxmask.modeling.sim.self_correction import merge_per_object  # noqa: E402

SPACES = ("mask", "backbone_s4", "backbone_s8", "fpn_s8")
MAPS = ("m_s", "m_i", "linear", "product")
TAU = 0.2


def _features(model, batch, aux, hw) -> dict[str, torch.Tensor]:
    """Unit-norm features [B, D, h, w] on the mask grid (stride 4) in each space."""
    h, w = hw
    up = lambda f: F.normalize(aligned_bilinear(f.float(), 2)[:, :, :h, :w], dim=1)  # noqa: E731
    levels = model._probe_levels
    return {"mask": up(aux["out"]["mask_feats"]), "backbone_s4": F.normalize(levels["s4"].float()[:, :, :h, :w], dim=1),
            "backbone_s8": up(levels["s8"]), "fpn_s8": up(aux["out"]["fpn"][0])}


def _hook_backbone(model) -> None:
    """Keep the backbone's stride-4 and stride-8 outputs of the last forward (MobileNetV2: features 3 and 6;
    ResNet: layer1 and layer2)."""
    model._probe_levels = {}
    body = model.backbone.fpn.body
    names = ("3", "6") if hasattr(body, "6") else ("layer1", "layer2")
    for key, name in zip(("s4", "s8"), names):
        getattr(body, name).register_forward_hook(lambda m, i, o, key=key: model._probe_levels.__setitem__(key, o))


def collect(run: Path, data: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]], int]:
    """Per object: split names, class, image index, box cells, GT mask, M_I; per image: the features and
    its out-of-box cells."""
    model, _ = model_from_checkpoint(run, "cpu")
    cfg = model.cfg
    _hook_backbone(model)
    ds = CocoDataset(data / "val.json", data / "images")
    loader = DataLoader(EvalDataset(ds, cfg.data.min_size_test, cfg.data.max_size, with_targets=True), batch_size=4,
                        collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility))
    model.eval()
    objects, images = [], []
    with torch.no_grad():
        for batch in loader:
            anns = [a for i in batch["image_ids"] for a in ds.annotations[i] if not a.get("iscrowd", 0)]
            splits, _ = object_splits(anns)
            _, aux = model.forward_train(boxes_only(batch), return_aux=True)
            h, w = aux["mask_logits"].shape[-2:]
            gt = gt_masks_on_grid(batch, cfg.model.mask_out_stride, (h, w)).bool()
            _, _, _, m_i = merge_per_object(aux["inst"], aux["mask_logits"].float().sigmoid()[:, 0], cfg.sim.mu,
                                            cfg.sim.weighting, aux["gt_boxes"].shape[0])
            box = aux["object_box_masks"] > 0
            covered = torch.zeros(batch["images"].shape[0], h, w).index_add_(0, aux["gt_image"], box.float()) > 0
            feats = _features(model, batch, aux, (h, w))
            first = len(images)
            for i in range(batch["images"].shape[0]):
                ih, iw = batch["image_sizes"][i]
                inside = torch.zeros(h, w, dtype=torch.bool)
                inside[: math.ceil(ih / 4), : math.ceil(iw / 4)] = True
                images.append({"bg": inside & ~covered[i], **{k: v[i] for k, v in feats.items()}})
            for g in range(len(anns)):
                objects.append({"splits": splits[g], "cls": int(aux["gt_labels"][g]), "image": first + int(aux["gt_image"][g]),
                                "box": box[g], "gt": gt[g], "m_i": m_i[g]})
    return objects, images, len(ds.cat_ids)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """k unit centroids of unit rows ``x`` (cosine k-means, k-means++-free: k random rows to start)."""
    if x.shape[0] <= k:
        return F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = (x @ c.t()).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        c = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=1), c)
    return c


def probe(objects: list[dict], images: list[dict], num_classes: int, space: str, num_protos: int) -> dict:
    """Mean per-object AUC of each map, per split, on the half of the images the prototypes did not see."""
    half = len(images) // 2
    fit = [o for o in objects if o["image"] < half]
    cls_pix = [[] for _ in range(num_classes)]
    for o in fit:
        f = images[o["image"]][space]
        cls_pix[o["cls"]].append(f[:, o["gt"] & o["box"]].t())
    bg_pix = torch.cat([im[space][:, im["bg"]].t() for im in images[:half]])
    dim = bg_pix.shape[1]
    protos = [spherical_kmeans(torch.cat(p), num_protos) if p else torch.zeros(1, dim) for p in cls_pix]
    bg = spherical_kmeans(bg_pix, num_protos)
    aucs: dict[str, dict[str, list[float]]] = {}
    for o in objects:
        if o["image"] < half:
            continue
        f = images[o["image"]][space]
        s = torch.einsum("dhw,ld->lhw", f, protos[o["cls"]]).amax(0) - torch.einsum("dhw,ld->lhw", f, bg).amax(0)
        m_s = torch.sigmoid(s / TAU)
        maps = {"m_s": m_s, "m_i": o["m_i"], "linear": 0.5 * m_s + 0.5 * o["m_i"], "product": m_s * o["m_i"]}
        sel = o["box"]
        for name in o["splits"]:
            for key, m in maps.items():
                aucs.setdefault(name, {}).setdefault(key, []).append(float(roc_auc(m[sel], o["gt"][sel])))
    return {split: {k: _nanmean(v) for k, v in by.items()} | {"num_objects": len(by["m_i"])} for split, by in aucs.items()}


def _nanmean(v: list[float]) -> float:
    v = [x for x in v if x == x]
    return sum(v) / len(v) if v else math.nan


def _mean_sd(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan)


def to_markdown(results: dict, runs: list[str]) -> str:
    lines = ["# Semantic-map oracle probe", "",
             f"Runs: {', '.join(runs)}. Prototypes fitted on the GT masks of half of the val images, measured "
             "on the other half. Cells: mean per-object in-box ROC AUC against the GT mask, mean ± sd over the "
             f"runs. M_S = sigmoid((best class similarity - best background similarity) / {TAU}); linear = "
             "0.5 M_S + 0.5 M_I (SIM's fusion at alpha 0.5); product = M_S M_I.", ""]
    for key, by in results.items():
        space, num = key.split("/")
        splits = list(next(iter(by.values())).keys())
        lines += [f"## {space}, L = {num}", "", "| split | objects | " + " | ".join(MAPS) + " |",
                  "|---|---|" + "---|" * len(MAPS)]
        for split in splits:
            cells = []
            for m in MAPS:
                mean, sd = _mean_sd([r[split][m] for r in by.values()])
                cells.append(f"{mean:.3f} ± {sd:.3f}" if sd == sd else f"{mean:.3f}")
            n = next(iter(by.values()))[split]["num_objects"]
            lines.append(f"| {split} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = ROOT / "work"
    ap.add_argument("--runs", nargs="+", type=Path,
                    default=sorted((work / "runs").glob("sim_paired_boxinst_s*")))
    ap.add_argument("--data", type=Path, default=work / "textured_600_200_192_0")
    ap.add_argument("--protos", default="1,4", help="prototypes per class (and for the background)")
    ap.add_argument("--name", default="semantic_probe")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="where NAME.json and NAME.md go")
    args = ap.parse_args()
    if not args.runs:
        ap.error("no runs: train them with sim_paired.py or pass --runs")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, dict[str, dict]] = {}
    for run in args.runs:
        objects, images, num_classes = collect(run, args.data)
        for space in SPACES:
            for num in (int(n) for n in args.protos.split(",")):
                results.setdefault(f"{space}/{num}", {})[run.name] = probe(objects, images, num_classes, space, num)
        print(f"{run.name}: done", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(
        {"runs": [str(r) for r in args.runs], "data": str(args.data), "tau": TAU, "results": results}, indent=2))
    md = to_markdown(results, [r.name for r in args.runs])
    (args.results / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
