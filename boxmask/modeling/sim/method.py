"""SIM's training-time machinery around a CondInst student: teacher, prototypes, pseudo masks, losses.

The student stays a plain CondInst (inference is unchanged); this module only adds loss terms and owns
the state that must survive a resume (teacher weights, prototypes)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import Config
from .. import boxinst_loss
from ..color import unfold_neighbours
from ..condinst import CondInst, box_masks_on_grid
from ..dynamic_mask_head import aligned_bilinear
from .prototypes import Prototypes
from .pseudo_loss import adaptive_high_threshold, fuse, pseudo_mask_loss, pseudo_targets
from .self_correction import merge_masks, merge_per_object
from .teacher import EMATeacher


class SIM(nn.Module):
    def __init__(self, cfg: Config, student: CondInst, num_classes: int):
        super().__init__()
        s = cfg.sim
        self.cfg = cfg
        self.teacher = EMATeacher(student, s.ema_momentum)
        self.prototypes = Prototypes(num_classes, s.num_prototypes, cfg.model.mask_out_channels, s.proto_momentum,
                                     s.sinkhorn_eps, s.sinkhorn_iters)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        self.teacher.update(student)

    def _upsampled(self, mask_feats: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Stride-8 mask features -> mask resolution (aligned bilinear x2)."""
        factor = self.cfg.model.fpn_strides[0] // self.cfg.model.mask_out_stride
        return aligned_bilinear(mask_feats, factor)[:, :, : hw[0], : hw[1]]

    @torch.no_grad()
    def pseudo_masks(self, batch: dict, aux: dict) -> dict:
        """Per-object maps on the mask grid: instance map M_I (teacher masks of the positives, weighted),
        semantic map M_S, fused P, pseudo target/weights, and the student's own merged masks."""
        s = self.cfg.sim
        inst = aux["inst"]
        logits = aux["mask_logits"]
        h, w = logits.shape[-2:]
        t_out = self.teacher(batch["images"])
        t_probs = self.teacher.model.instance_mask_logits(t_out, inst["image"], inst["loc"]).float().sigmoid()[:, 0]
        groups, group, weights, m_i = merge_per_object(inst, t_probs, s.mu, s.weighting)
        num_g = groups.numel()
        # per-object facts: image, class, box
        first = torch.zeros(num_g, dtype=torch.long, device=logits.device).scatter_(0, group, torch.arange(group.numel(), device=logits.device))
        g_img, g_cls, g_box = inst["image"][first], inst["label"][first], inst["box"][first]
        box = box_masks_on_grid(g_box, h, w, self.cfg.model.mask_out_stride)
        t_feats = self._upsampled(t_out["mask_feats"].float(), (h, w))
        z_t = F.normalize(t_feats, dim=1)
        m_s = self.prototypes.semantic_map(z_t[g_img], g_cls, s.tau) if s.semantic else None
        fused = fuse(m_s, m_i if s.self_correction else None, s.alpha if s.semantic else 1.0)
        n_pos = ((m_i > s.fg_thresh) & (box > 0)).flatten(1).sum(1)
        tau_high = adaptive_high_threshold(fused, box, n_pos, s.tau_high_min, s.tau_high_max)
        target, weight = pseudo_targets(fused, box, tau_high, s.tau_low)
        student = merge_masks(logits.detach().float().sigmoid()[:, 0], weights, group, num_g)
        return {"groups": groups, "group": group, "image": g_img, "cls": g_cls, "box": box, "m_i": m_i, "m_s": m_s,
                "fused": fused, "target": target, "weight": weight, "tau_high": tau_high, "student": student,
                "teacher_feats": t_feats, "teacher_z": z_t}

    def losses(self, batch: dict, aux: dict, pseudo_on: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """SIM's loss terms (unweighted) and a few statistics for the log; updates the prototypes."""
        s = self.cfg.sim
        logits = aux["mask_logits"]
        out: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if logits.shape[0] == 0:
            zero = logits.sum() * 0.0
            return {"loss_pseudo": zero}, stats
        pm = self.pseudo_masks(batch, aux)
        if pseudo_on:
            per_inst = pseudo_mask_loss(logits[:, 0], pm["target"][pm["group"]], pm["weight"][pm["group"]], s.pseudo_loss)
            out["loss_pseudo"] = per_inst.mean()
        else:
            out["loss_pseudo"] = logits.sum() * 0.0
        if s.pairwise_feat_sim:
            out["loss_pairwise"] = self._feature_pairwise(aux, pm["teacher_feats"])
        if s.semantic:
            self._update_prototypes(aux, pm)
        # fractions of in-box pixels that are pseudo foreground / ignored (tensors: no host sync here)
        in_box = pm["box"].sum().clamp_min(1)
        stats["pseudo_fg"] = pm["target"].sum() / in_box
        stats["pseudo_ignored"] = 1 - pm["weight"].sum() / in_box
        return out, stats

    def _feature_pairwise(self, aux: dict, f: torch.Tensor) -> torch.Tensor:
        """The released code's pairwise term: colour x teacher-feature similarity >= threshold
        (``f``: the teacher's mask features at mask resolution, not normalised)."""
        lc = self.cfg.loss
        logits = aux["mask_logits"]
        diff = f[:, :, None] - unfold_neighbours(f, lc.pairwise_size, lc.pairwise_dilation)
        feat_sim = torch.exp(-torch.linalg.vector_norm(diff, dim=1))
        sim = aux["color_sim"] * feat_sim
        img = aux["inst"]["image"]
        return boxinst_loss.pairwise_loss(logits, sim[img], aux["box_masks"], self.cfg.sim.pairwise_feat_thresh,
                                          lc.pairwise_size, lc.pairwise_dilation)

    @torch.no_grad()
    def _update_prototypes(self, aux: dict, pm: dict) -> None:
        """Per class: pixels of its objects (pseudo foreground, or teacher M_I > threshold), Sinkhorn on
        teacher similarities, centroids of student features, EMA; then sync across ranks."""
        s = self.cfg.sim
        h, w = pm["box"].shape[-2:]
        if s.proto_pixels == "mi":
            sel = (pm["m_i"] > s.fg_thresh) & (pm["box"] > 0)
        else:
            sel = pm["target"] > 0
        z_s = F.normalize(self._upsampled(aux["out"]["mask_feats"].detach().float(), (h, w)), dim=1)
        z_t = pm["teacher_z"]
        for c in pm["cls"].unique().tolist():
            objs = torch.nonzero(pm["cls"] == c).squeeze(1)
            m = sel[objs]  # [k, h, w]
            if not m.any():
                continue
            k_idx, ys, xs = torch.nonzero(m, as_tuple=True)
            imgs = pm["image"][objs][k_idx]
            feats_s = z_s[imgs, :, ys, xs]  # [N, D]
            feats_t = z_t[imgs, :, ys, xs]
            scores = feats_t @ self.prototypes.protos[c].t()
            self.prototypes.update(scores, feats_s, c)
        self.prototypes.sync()
