"""Which colour-linked neighbour pairs pull a box's background into the mask, and can SIM's signals tell
them from the pairs inside one side? A probe on trained SIM runs.

    python benchmarks/pairwise_probe.py --runs RUN [RUN ...] --data DATA

BoxInst's pairwise term pulls two neighbours (3 x 3, dilation 2, on the mask grid) towards one label when
their colours are alike. On a near-colour object some of those pairs cross the true boundary: they are what
drags a colour-matched background region into the mask. SIM can only undo that where it can tell such a
pair from a pair inside one side. Per object split, over the colour-linked in-box pairs of the val objects
(GT masks as the judge; the model and SIM see boxes only):

* ``gt_split``: the share of the pairs that cross the GT boundary (the harmful links);
* the pairwise cut (``sim.pairwise_pseudo_cut``): how many pairs the pseudo label splits, and how many of
  those the GT splits too (``cut_right``) or not (``cut_wrong``, a pair inside one side left out);
* a feature similarity (``--features mask``: cosine of the teacher's normalised mask features, as a
  feature-gated affinity would use it; ``c3``: of the student backbone's stride-8 features, as
  ``sim.pairwise_texture_thresh`` uses it; ``c2``: of its stride-4 ones; ``c2tex`` / ``c3tex``: 1 - the step of the object's texture contrast
  between the two cells where they fall on opposite sides of it, 1 elsewhere, so that ``< t`` is what
  ``sim.pairwise_texture_split=1-t`` leaves out): for each threshold, the share of GT-crossing pairs and of
  same-side pairs below it. A signal that separates the two removes many more of the first than of the
  second. ``--edge-protect``: a pair with a cell next to a colour edge counts as similar (a gate that
  would only act away from colour edges).

Results: benchmarks/results/NAME.{json,md} (``--name``, default pairwise_probe). Not a test.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from boxmask.data.batch import EvalDataset, boxes_only, collate  # noqa: E402
from boxmask.data.coco import CocoDataset  # noqa: E402
from boxmask.engine.trainer import model_from_checkpoint, sim_from_checkpoint  # noqa: E402
from boxmask.evaluation.sim_maps import object_splits  # noqa: E402
from boxmask.modeling.color import neighbour_cosine, unfold_neighbours  # noqa: E402
from boxmask.modeling.condinst import gt_masks_on_grid  # noqa: E402
from boxmask.modeling.sim.method import erode  # noqa: E402
from boxmask.modeling.sim.pseudo_loss import split_pairs  # noqa: E402

THRESHOLDS = (0.2, 0.4, 0.5, 0.6, 0.7)
COUNTS = ("linked", "gt_split", "cut", "cut_right", "cut_wrong")


def pair_counts(linked: torch.Tensor, gt_split: torch.Tensor, cut: torch.Tensor, cos: torch.Tensor,
                thresholds=THRESHOLDS, rim: torch.Tensor | None = None, deep: torch.Tensor | None = None
                ) -> dict[str, float]:
    """Counts over one object's neighbour pairs (each [K, h, w], booleans but ``cos``): the colour-linked
    in-box pairs, those the GT splits, those the pseudo label splits (right or wrong by the GT), and per
    threshold the GT-split and same-side linked pairs whose feature cosine is below it; with ``rim`` and
    ``deep`` (pairs inside the GT object near its boundary / further in) the same for those two."""
    out = {"linked": int(linked.sum()), "gt_split": int((linked & gt_split).sum()),
           "cut": int((linked & cut).sum()), "cut_right": int((linked & cut & gt_split).sum()),
           "cut_wrong": int((linked & cut & ~gt_split).sum())}
    inside = {} if rim is None else {"rim": linked & rim, "deep": linked & deep}
    out.update({k: int(v.sum()) for k, v in inside.items()})
    for t in thresholds:
        low = cos < t
        out[f"cos<{t}:gt_split"] = int((linked & gt_split & low).sum())
        out[f"cos<{t}:same_side"] = int((linked & ~gt_split & low).sum())
        for k, v in inside.items():
            out[f"cos<{t}:{k}"] = int((v & low).sum())
    return out


def rim_and_deep(gt: torch.Tensor, size: int, dilation: int, width: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object ([N, h, w] GT masks), the neighbour pairs ([N, K, h, w]) with both cells inside the object:
    those with a cell within ``width`` cells of its boundary (rim) and the others (deep)."""
    inner = erode(gt > 0, width)
    g_q = unfold_neighbours(gt[:, None], size, dilation)[:, 0] > 0
    i_q = unfold_neighbours(inner.float()[:, None], size, dilation)[:, 0] > 0
    both = (gt[:, None] > 0) & g_q
    deep = both & inner[:, None] & i_q
    return both & ~deep, deep


def contrast_step(contrast: torch.Tensor, size: int, dilation: int) -> torch.Tensor:
    """[G, h, w] texture contrasts (``SIM.pseudo_texture_contrast``) -> [G, K, h, w]: ``1 - |d_i - d_j|`` for
    the neighbour pairs whose cells fall on opposite sides of it, 1 for the others, so that ``< t`` is what
    ``texture_split`` with a step of ``1 - t`` leaves out."""
    d = contrast[:, None]
    dq = unfold_neighbours(d, size, dilation)[:, 0]
    opposite = (d > 0) != (dq > 0)
    return torch.where(opposite, 1.0 - (d - dq).abs(), torch.ones_like(dq))


def colour_edge_protected(color_sim: torch.Tensor, thresh: float, size: int, dilation: int) -> torch.Tensor:
    """[B, K, h, w] colour similarities -> [B, K, h, w]: the pairs with a cell that has a neighbour it is not
    colour-linked to (a colour edge within one pair's reach), which the edge-protected gate never unlinks."""
    edge = (color_sim < thresh).any(dim=1, keepdim=True).float()
    return (edge > 0) | (unfold_neighbours(edge, size, dilation)[:, 0] > 0)


def probe_run(run: Path, data: Path, max_images: int, features: str = "mask", edge_protect: bool = False
              ) -> dict[str, dict[str, float]]:
    """Per split, the pair counts summed over the val objects with positives (the first ``max_images``);
    ``features``: the cosines of the teacher's mask features (``mask``), of the student backbone's stride-8
    features (``c3``, what ``sim.pairwise_texture_thresh`` gates on) or of its stride-4 ones (``c2``)."""
    model, state = model_from_checkpoint(run, "cpu")
    sim = sim_from_checkpoint(model, state)
    if sim is None:
        raise SystemExit(f"{run}: not a SIM run (the probe needs its teacher and pseudo labels)")
    cfg = model.cfg
    lc = cfg.loss
    ds = CocoDataset(data / "val.json", data / "images")
    samples = EvalDataset(ds, cfg.data.min_size_test, cfg.data.max_size, with_targets=True)
    if 0 < max_images < len(samples):
        samples = Subset(samples, range(max_images))
    loader = DataLoader(samples, batch_size=4,
                        collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility))
    totals: dict[str, dict[str, float]] = {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            anns = [a for i in batch["image_ids"] for a in ds.annotations[i] if not a.get("iscrowd", 0)]
            splits, _ = object_splits(anns)
            no_masks = boxes_only(batch)
            _, aux = model.forward_train(no_masks, return_aux=True)
            if aux["inst"]["image"].numel() == 0:
                continue
            h, w = aux["mask_logits"].shape[-2:]
            pm = sim.pseudo_masks(no_masks, aux, teacher_features=True)
            in_box = pm["box"] > 0
            gt = gt_masks_on_grid(batch, cfg.model.mask_out_stride, (h, w)).float() * in_box
            size, dil = lc.pairwise_size, lc.pairwise_dilation
            cut = split_pairs(pm["target"], pm["weight"], size, dil).expand(-1, size * size - 1, -1, -1) > 0
            gt_split = split_pairs(gt, in_box.float(), size, dil).expand_as(cut) > 0
            linked = (aux["color_sim"][pm["image"]] >= lc.pairwise_color_thresh) & in_box[:, None]
            if features.endswith("tex"):
                contrast, valid = sim.pseudo_texture_contrast(aux, pm, features[:2])
                cos = torch.where(valid[:, None, None, None], contrast_step(contrast, size, dil), 1.0)
            else:
                f = pm["teacher_feats"] if features == "mask" else sim.low_level(aux, features, (h, w))
                z = F.normalize(f[pm["image"]], dim=1)
                cos = neighbour_cosine(z, size, dil)
            if edge_protect:
                prot = colour_edge_protected(aux["color_sim"], lc.pairwise_color_thresh, size, dil)[pm["image"]]
                cos = torch.where(prot, torch.full_like(cos, 2.0), cos)
            rim, deep = rim_and_deep(gt, size, dil)
            for g in torch.nonzero(pm["has_pos"]).flatten().tolist():
                counts = pair_counts(linked[g], gt_split[g], cut[g], cos[g], rim=rim[g], deep=deep[g])
                for name in splits[g]:
                    acc = totals.setdefault(name, {"objects": 0})
                    acc["objects"] += 1
                    for k, v in counts.items():
                        acc[k] = acc.get(k, 0) + v
    return totals


def shares(c: dict[str, float]) -> dict[str, float]:
    """The counts as the shares the markdown table shows."""
    same = c["linked"] - c["gt_split"]
    out = {"gt_split": c["gt_split"] / max(c["linked"], 1), "cut": c["cut"] / max(c["linked"], 1),
           "cut_right": c["cut_right"] / max(c["cut"], 1), "cut_catches": c["cut_right"] / max(c["gt_split"], 1)}
    for t in THRESHOLDS:
        out[f"cos<{t}"] = (c[f"cos<{t}:gt_split"] / max(c["gt_split"], 1), c[f"cos<{t}:same_side"] / max(same, 1))
        out[f"cos<{t}:inside"] = (c[f"cos<{t}:rim"] / max(c["rim"], 1), c[f"cos<{t}:deep"] / max(c["deep"], 1))
    return out


def to_markdown(results: dict, data: Path, features: str = "mask") -> str:
    lines = ["# Colour-linked pairs across the true boundary, and what SIM's signals make of them", "",
             f"Val objects of `{data.name}`, GT masks as the judge. Pairs: the colour-linked in-box neighbour pairs "
             "of BoxInst's pairwise term. *crossing*: share of them the GT splits (what pulls background into "
             "the mask); *cut*: share of them the pairwise cut leaves out; *cut right*: share of the pseudo "
             "label's cut that the GT splits too; *cut catches*: share of the crossing pairs the cut leaves out; "
             "*cos < t*: share of the crossing pairs / of the same-side pairs whose feature cosine is below t; "
             + {"mask": "the teacher's mask features.", "c3": "the student backbone's stride-8 features (C3).",
                "c2": "the student backbone's stride-4 features (C2).",
                "c2tex": "1 - the texture contrast's step between the two cells where they fall on opposite sides "
                         "of it (1 elsewhere), in the stride-4 features (C2).",
                "c3tex": "the same in the stride-8 features (C3)."}[features]
             + " Second table: of the linked pairs with both cells inside the GT object, the share below t near "
             "its boundary (a cell within 2 mask cells of it) / further in.", ""]
    for run, by_split in results.items():
        lines += [f"## {run}", "", "| split | objects | pairs | crossing | cut | cut right | cut catches | "
                  + " | ".join(f"cos < {t}" for t in THRESHOLDS) + " |", "|---|" + "---|" * (6 + len(THRESHOLDS))]
        for split, c in by_split.items():
            s = shares(c)
            gates = " | ".join(f"{s[f'cos<{t}'][0]:.2f} / {s[f'cos<{t}'][1]:.2f}" for t in THRESHOLDS)
            lines.append(f"| {split} | {c['objects']} | {c['linked']} | {s['gt_split']:.3f} | {s['cut']:.3f} | "
                         f"{s['cut_right']:.2f} | {s['cut_catches']:.2f} | {gates} |")
        lines += ["", "| split | pairs inside near the boundary | further in | "
                  + " | ".join(f"cos < {t}" for t in THRESHOLDS) + " |", "|---|---|---|" + "---|" * len(THRESHOLDS)]
        for split, c in by_split.items():
            s = shares(c)
            gates = " | ".join(f"{s[f'cos<{t}:inside'][0]:.3f} / {s[f'cos<{t}:inside'][1]:.3f}" for t in THRESHOLDS)
            lines.append(f"| {split} | {c['rim']} | {c['deep']} | {gates} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="SIM run folders")
    ap.add_argument("--data", required=True, help="a `boxmask synth --kind textured` folder (val.json with masks)")
    ap.add_argument("--max-images", type=int, default=0, help="the first N val images (0: all)")
    ap.add_argument("--results", default=str(ROOT / "results"), help="folder for NAME.json and .md")
    ap.add_argument("--name", default="pairwise_probe")
    ap.add_argument("--features", choices=("mask", "c3", "c2", "c2tex", "c3tex"), default="mask",
                    help="whose cosines: the teacher's mask features or the backbone's stride-8 features")
    ap.add_argument("--edge-protect", action="store_true",
                    help="a pair with a cell next to a colour edge counts as similar whatever its cosine")
    args = ap.parse_args()
    data = Path(args.data)
    results = {Path(r).name: probe_run(Path(r), data, args.max_images, args.features, args.edge_protect) for r in args.runs}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"data": str(data), "features": args.features,
                                                       "thresholds": THRESHOLDS, "results": results}, indent=2))
    md = to_markdown(results, data, args.features)
    (out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
