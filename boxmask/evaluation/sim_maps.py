"""How well SIM's maps separate an object from its box's background, measured against GT masks.

Inside each GT box (on the mask grid): the ROC AUC of the semantic map M_S, the instance map M_I, the
texture map M_T and the fused map against the GT mask (pooled over the objects' pixels, and the mean of the
per-object AUCs), and the precision and recall of the pseudo labels (pseudo foreground pixels that are GT
foreground / GT foreground pixels labelled pseudo foreground; the same for background; the ignored band
counts as neither).
Objects are grouped by the ``cases`` their annotation lists (an object with two cases counts in both;
one with none is ``plain``); every object counts in ``all``."""
from __future__ import annotations

import math

import torch

MAPS = ("m_s", "m_i", "m_t", "fused")
BINS = 1 << 16  # pooled AUC: scores in [0, 1] on a 1/65535 grid (memory stays bounded on COCO-size sets)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ROC AUC of each row of ``scores`` [G, P] against boolean ``labels`` [G, P], over the pixels
    where ``valid`` [G, P]: the Mann-Whitney U statistic with average ranks for ties (a tie counts 1/2).
    [G], NaN for a row without both a positive and a negative."""
    if scores.dim() == 1:
        return roc_auc(scores[None], labels[None], None if valid is None else valid[None])[0]
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.bool()
    s = torch.where(valid, scores.double(), math.inf)  # invalid pixels rank after every valid one
    srt = s.sort(dim=1).values
    less = torch.searchsorted(srt, s, right=False)
    less_eq = torch.searchsorted(srt, s, right=True)
    rank = (less + less_eq + 1).double() / 2  # 1-based average rank: less + (ties + 1) / 2
    pos = labels.bool() & valid
    n_pos = pos.sum(1).double()
    n_neg = valid.sum(1).double() - n_pos
    u = torch.where(pos, rank, 0.0).sum(1) - n_pos * (n_pos + 1) / 2
    return torch.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg).clamp_min(1), math.nan)


class PooledAuc:
    """ROC AUC over every pixel added, from counts of positives and negatives per score bin."""

    def __init__(self):
        self.pos = torch.zeros(BINS, dtype=torch.float64)
        self.neg = torch.zeros(BINS, dtype=torch.float64)

    def add(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        b = (scores.double().clamp(0, 1) * (BINS - 1)).round().long().cpu()
        labels = labels.bool().cpu()
        self.pos += torch.bincount(b[labels], minlength=BINS).double()
        self.neg += torch.bincount(b[~labels], minlength=BINS).double()

    def auc(self) -> float:
        n_pos, n_neg = float(self.pos.sum()), float(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan
        below = torch.cumsum(self.neg, 0) - self.neg  # negatives in lower bins
        return float((self.pos * (below + 0.5 * self.neg)).sum()) / (n_pos * n_neg)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


class _Split:
    def __init__(self):
        self.objects = 0
        self.pooled = {m: PooledAuc() for m in MAPS}
        self.per_object: dict[str, list[float]] = {m: [] for m in MAPS}
        # pixel counts: pseudo fg, GT fg, both; pseudo bg, GT bg, both; in-box pixels, ignored
        self.counts = torch.zeros(8, dtype=torch.float64)


class SimMapStats:
    """Accumulates the diagnostics over batches of objects; ``summary`` gives them per split."""

    def __init__(self):
        self.splits: dict[str, _Split] = {}

    def add(self, splits: list[list[str]], maps: dict[str, torch.Tensor | None], target: torch.Tensor,
            weight: torch.Tensor, box: torch.Tensor, gt: torch.Tensor) -> None:
        """One batch of G objects: ``splits`` (the split names of each), ``maps`` (M_S, M_I, M_T, fused, each
        [G, h, w] or None), the pseudo ``target`` and ``weight``, the ``box`` region and the GT mask."""
        inside, gt = box > 0, gt.bool()
        fg = (target > 0) & inside
        bg = (weight > 0) & (target <= 0) & inside
        counts = torch.stack([fg.sum((1, 2)), (gt & inside).sum((1, 2)), (fg & gt).sum((1, 2)),
                              bg.sum((1, 2)), (~gt & inside).sum((1, 2)), (bg & ~gt).sum((1, 2)),
                              inside.sum((1, 2)), (inside & ~fg & ~bg).sum((1, 2))], dim=1).double().cpu()
        aucs = {m: roc_auc(v.flatten(1), gt.flatten(1), inside.flatten(1)).cpu() for m, v in maps.items() if v is not None}
        for k, names in enumerate(splits):
            for name in names:
                sp = self.splits.setdefault(name, _Split())
                sp.objects += 1
                sp.counts += counts[k]
                for m, a in aucs.items():
                    sp.pooled[m].add(maps[m][k][inside[k]], gt[k][inside[k]])
                    if not math.isnan(float(a[k])):
                        sp.per_object[m].append(float(a[k]))

    def summary(self) -> dict:
        out = {}
        for name, sp in self.splits.items():
            c = sp.counts.tolist()
            rec = {"objects": sp.objects, "auc": {}}
            for m in MAPS:
                if float(sp.pooled[m].pos.sum() + sp.pooled[m].neg.sum()) > 0:  # the map was given
                    vals = sp.per_object[m]
                    rec["auc"][m] = {"pooled": sp.pooled[m].auc(),
                                     "per_object": sum(vals) / len(vals) if vals else math.nan}
            rec["pseudo_fg"] = {"precision": _ratio(c[2], c[0]), "recall": _ratio(c[2], c[1])}
            rec["pseudo_bg"] = {"precision": _ratio(c[5], c[3]), "recall": _ratio(c[5], c[4])}
            rec["pseudo_ignored"] = _ratio(c[7], c[6])
            out[name] = rec
        return out


def object_splits(annotations: list[dict]) -> tuple[list[list[str]], bool]:
    """The split names of each (non-crowd) annotation: ``all``, then its ``cases`` or ``plain``; and
    whether any annotation carries ``cases``."""
    flagged = any("cases" in a for a in annotations)
    if not flagged:
        return [["all"] for _ in annotations], False
    return [["all", *(list(a.get("cases") or []) or ["plain"])] for a in annotations], True


def format_sim_maps(summary: dict) -> str:
    """A compact table of ``summary`` (one row per split)."""
    head = (f"{'split':<20}{'objects':>8}  {'AUC M_S':>11}  {'AUC M_I':>11}  {'AUC M_T':>11}  {'AUC fused':>11}"
            f"  {'fg prec':>7} {'fg rec':>7} {'bg prec':>7} {'bg rec':>7} {'ignored':>7}")
    lines = ["SIM maps inside the GT boxes vs the GT masks (ROC AUC pooled/mean per object; pseudo labels' "
             "pixel precision and recall):", head]

    def auc(rec: dict, m: str) -> str:
        a = rec["auc"].get(m)
        return f"{a['pooled']:.3f}/{a['per_object']:.3f}" if a else "-"

    for name, rec in summary.items():
        lines.append(f"{name:<20}{rec['objects']:>8}  {auc(rec, 'm_s'):>11}  {auc(rec, 'm_i'):>11}  {auc(rec, 'm_t'):>11}"
                     f"  {auc(rec, 'fused'):>11}"
                     f"  {rec['pseudo_fg']['precision']:>7.3f} {rec['pseudo_fg']['recall']:>7.3f}"
                     f" {rec['pseudo_bg']['precision']:>7.3f} {rec['pseudo_bg']['recall']:>7.3f}"
                     f" {rec['pseudo_ignored']:>7.3f}")
    return "\n".join(lines)
